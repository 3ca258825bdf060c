"""``gradlore bench pretrain``: the same small LLaMA, corpus, token budget, schedule, seed and data order
for every optimizer, each at its best learning rate from a small sweep.

Methods: AdamW (arXiv:1711.05101), GaLore/SVD (arXiv:2403.03507), SVD-free DCT (arXiv:2505.17967),
Fira (arXiv:2410.01623), FRUGAL (arXiv:2411.07837), and the authors' ``galore-torch`` package. Every
run is a separate ``gradlore train`` process, so its peak RSS is its own. Reported per method, at its
best LR: final validation perplexity exp(L_val) on the held-out tail of the corpus, training throughput
(tokens/s over optimizer steps, evaluation excluded), optimizer-state bytes and peak RSS; plus the whole
sweep and one overlaid loss-curve plot. A finished run (its ``summary.json`` with the same config) is
reused, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gradlore.errors import UserError
from gradlore.optim.build import check_optimizer
from gradlore.train.rundir import ema, read_losses

METHODS = ["adamw", "galore", "dct", "fira", "frugal", "galore-torch"]
DEFAULT_LRS = {
    "adamw": [1e-3, 3e-3],
    "galore": [3e-3, 1e-2],
    "dct": [3e-3, 1e-2],
    "fira": [3e-3, 1e-2],
    "frugal": [3e-3, 1e-2],
    "galore-torch": [3e-3, 1e-2],
}


def parse_lrs(text: str | None, methods: list[str]) -> dict[str, list[float]]:
    """``"adamw=1e-3,3e-3;dct=1e-2"`` or ``"1e-3,1e-2"`` (for every method) -> {method: [lr, ...]}."""
    lrs = {m: list(DEFAULT_LRS.get(m, [1e-3, 3e-3])) for m in methods}
    if not text:
        return lrs
    try:
        if "=" not in text:
            grid = [float(x) for x in text.split(",")]
            return {m: grid for m in methods}
        for part in text.split(";"):
            name, _, values = part.partition("=")
            lrs[name.strip()] = [float(x) for x in values.split(",")]
    except ValueError:
        raise UserError(f"--lrs {text!r}: expected 'M=LR,LR;M=LR' or 'LR,LR'. Fix: e.g. --lrs 1e-3,3e-3") from None
    return lrs


def _train_args(args: argparse.Namespace, method: str, lr: float, out: Path) -> list[str]:
    sets = {
        "data.vocab_size": args.vocab_size, "data.block_size": args.block_size,
        "train.batch_size": args.batch_size, "train.eval_every": args.eval_every, "train.eval_batches": 0,
        "train.ckpt_every": args.steps, "train.save_final_model": "false", "train.progress": "false",
        "train.threads": args.threads, "optim.update_proj_gap": args.gap, "optim.grad_clip": args.grad_clip,
        "schedule.warmup_steps": args.warmup,
    }
    cmd = ["train", "--preset", "default", "--data", args.data, "--model", args.model, "--optimizer", method,
           "--lr", repr(lr), "--rank", str(args.rank), "--steps", str(args.steps), "--seed", str(args.seed),
           "--out", str(out), "--overwrite"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def run_one(args: argparse.Namespace, method: str, lr: float) -> dict[str, Any]:
    out = Path(args.out) / "runs" / f"{method}-lr{lr:g}"
    cmd = _train_args(args, method, lr, out)
    summary_path = out / "summary.json"
    key = " ".join(cmd)
    if args.reuse and summary_path.exists() and (out / "bench_cmd.txt").exists() \
            and (out / "bench_cmd.txt").read_text() == key:
        summary = json.loads(summary_path.read_text())
    else:
        t0 = time.time()
        done = subprocess.run([sys.executable, "-m", "gradlore.cli", *cmd], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if done.returncode not in (0, 1) or not summary_path.exists():
            print(done.stderr[-3000:], file=sys.stderr)
            raise RuntimeError(f"run {method} lr={lr} failed (exit {done.returncode})")
        summary = json.loads(summary_path.read_text())
        summary["wall_seconds"] = time.time() - t0
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        (out / "bench_cmd.txt").write_text(key)
    summary["lr"], summary["method"], summary["run_dir"] = lr, method, str(out)
    ppl = summary["final_val_ppl"]
    print(f"  {method:13s} lr={lr:<8g} val ppl {ppl:8.2f}  {summary['tokens_per_s']:7.0f} tok/s  "
          f"state {summary['opt_state_bytes'] / 2**20:6.2f} MiB  peak RSS {summary['peak_rss_bytes'] / 2**20:6.0f} MiB"
          f"  ({summary['status']})", flush=True)
    return summary


def _ppl(s: dict[str, Any]) -> float:
    p = s["final_val_ppl"]
    return p if s["status"] == "completed" and isinstance(p, float) and math.isfinite(p) else math.inf


def tables(results: list[dict[str, Any]], methods: list[str]) -> tuple[str, str, dict[str, dict]]:
    """(best-LR table, sweep table) in Markdown, and the best run per method."""
    best: dict[str, dict] = {}
    for m in methods:
        runs = [r for r in results if r["method"] == m]
        if runs:
            best[m] = min(runs, key=_ppl)
    lines = ["| method | best LR | val loss | val ppl | tokens/s | optimizer state | peak RSS |",
             "|---|---|---|---|---|---|---|"]
    for m, r in best.items():
        lines.append(f"| {m} | {r['lr']:g} | {r['final_val_loss']:.4f} | {r['final_val_ppl']:.2f} | "
                     f"{r['tokens_per_s']:.0f} | {r['opt_state_bytes'] / 2**20:.2f} MiB | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} MiB |")
    lrs = sorted({r["lr"] for r in results})
    sweep = ["| method | " + " | ".join(f"LR {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for m in methods:
        cells = []
        for lr in lrs:
            hit = [r for r in results if r["method"] == m and r["lr"] == lr]
            cells.append(f"{_ppl(hit[0]):.2f}" if hit and math.isfinite(_ppl(hit[0])) else
                         ("diverged" if hit else "–"))
        sweep.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines), "\n".join(sweep), best


def plot(best: dict[str, dict], path: Path) -> None:
    """Overlaid curves of each method at its best LR: smoothed training loss and validation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (m, r) in enumerate(best.items()):
        train, val = read_losses(Path(r["run_dir"]) / "metrics.jsonl")
        color = f"C{i}"
        if train:
            steps, losses = zip(*train, strict=True)
            ax1.plot(steps, ema(list(losses), 0.95), color=color, lw=1.4, label=f"{m} (lr {r['lr']:g})")
        if val:
            vs, vl = zip(*val, strict=True)
            ax2.plot(vs, [math.exp(v) for v in vl], "o-", color=color, lw=1.4, ms=3, label=m)
    ax1.set(xlabel="step", ylabel="training loss (EMA 0.95)", title="training loss, best LR per method")
    ax2.set(xlabel="step", ylabel="validation perplexity", yscale="log", title="validation perplexity")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--data", default="shakespeare", help="corpus (default: the shakespeare corpus)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated (default: {','.join(METHODS)})")
    p.add_argument("--lrs", help="LR sweep: 'LR,LR' for all methods or 'adamw=1e-3,3e-3;dct=1e-2'")
    p.add_argument("--model", default="small")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--gap", type=int, default=50, help="projector refresh interval (steps)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=-1, help="warmup steps (-1: 10%% of steps)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench-pretrain")
    p.add_argument("--no-reuse", dest="reuse", action="store_false", help="rerun finished runs")
    return p


def run(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        check_optimizer(m)
    lrs = parse_lrs(args.lrs, methods)
    unknown = set(lrs) - set(methods)
    if unknown:
        raise UserError(f"--lrs names {sorted(unknown)}, not in --methods. Fix: list them in --methods.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokens = args.steps * args.batch_size * args.block_size
    print(f"bench pretrain: {args.model} on {args.data}, {args.steps} steps x {args.batch_size}x{args.block_size} "
          f"tokens = {tokens:,} tokens, rank {args.rank}, refresh every {args.gap}, seed {args.seed}", flush=True)
    results = [run_one(args, m, lr) for m in methods for lr in lrs[m]]
    best_table, sweep_table, best = tables(results, methods)
    plot(best, out / "loss_curves.png")
    command = "gradlore bench pretrain " + " ".join(sys.argv[sys.argv.index("pretrain") + 1:]) \
        if "pretrain" in sys.argv else "gradlore bench pretrain"
    report = (f"Command: `{command}`\n\n{args.model} LLaMA, {args.data}, {args.steps} steps of "
              f"{args.batch_size}x{args.block_size} tokens ({tokens:,} tokens), rank {args.rank}, refresh every "
              f"{args.gap} steps, warmup {'10%' if args.warmup < 0 else args.warmup} + cosine to 10%, "
              f"clip {args.grad_clip}, seed {args.seed}, {args.threads} threads.\n\n"
              f"Best LR per method (validation perplexity on the held-out tail):\n\n{best_table}\n\n"
              f"LR sweep (validation perplexity):\n\n{sweep_table}\n\nPlot: {out / 'loss_curves.png'}\n")
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n" + report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argparse.ArgumentParser(prog="gradlore bench pretrain", description=__doc__))
    return run(parser.parse_args(argv))
