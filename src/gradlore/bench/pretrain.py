"""``gradlore bench pretrain``: the same small LLaMA, corpus, token budget and schedule for every optimizer, each
at its best learning rate from a small sweep, over several seeds, with paired differences.

Methods: AdamW (arXiv:1711.05101), GaLore/SVD (arXiv:2403.03507), the SVD-free DCT method as published
(``dct``: columns re-selected every step, moments that follow them, α = 1; arXiv:2505.17967) and in GaLore's
recipe (``dct-galore``), plain coordinate selection with the same machinery (``columns-remap``: the identity
basis instead of the DCT), Fira (arXiv:2410.01623), FRUGAL (arXiv:2411.07837), and the authors' ``galore-torch``
package. Every run is a separate ``gradlore train`` process, so its peak RSS is its own.

Protocol: the LR grid of every method runs on the first seed; each method's best LR (lowest validation
perplexity) then runs on the other seeds. A seed fixes the initial weights and the data order, so two methods
on one seed see the same model and the same batches: differences are *paired* by seed. Reported per method,
at its best LR: final validation perplexity exp(L_val) on the held-out tail (mean ± sample standard deviation
over seeds, and each seed), throughput, optimizer-state bytes and peak RSS; the paired relative difference of
each method's perplexity to a reference method's, ppl_m/ppl_ref - 1, seed by seed, with its mean ± s.d.; the
sweep; and one overlaid loss-curve plot. A finished run (its ``summary.json`` from the same command) is reused,
so the benchmark can be run in chunks (``--methods``/``--seeds`` subsets, then everything to build the tables).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gradlore.errors import UserError
from gradlore.optim.build import check_optimizer
from gradlore.optim.presets import PRESETS
from gradlore.train.rundir import ema, read_losses

METHODS = ["adamw", "galore", "dct", "dct-galore", "columns-remap", "fira", "galore-torch"]
# Named variants: a label for an optimizer with some of its group's keys changed (``optim.overrides``).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "columns-remap": ("dct", {"projector": "columns"}),  # the published recipe on the identity basis
    "dct-row": ("dct", {"remap_bias": "row"}),  # new rows corrected by their own age
    "dct-ef": ("dct", {"residual": "ef"}),  # with the authors' error feedback (DCTAdamW's use_ef)
}
DEFAULT_LRS = {"adamw": [1e-3, 3e-3], "dct": [1e-3, 3e-3], "columns-remap": [1e-3, 3e-3], "dct-row": [1e-3, 3e-3],
               "dct-ef": [1e-3, 3e-3]}


def parse_variant(text: str) -> tuple[str, tuple[str, dict[str, Any]]]:
    """``'LABEL=OPTIMIZER {"key": value}'`` -> (label, (optimizer, overrides))."""
    label, _, rest = text.partition("=")
    name, _, raw = rest.strip().partition(" ")
    try:
        overrides = json.loads(raw) if raw.strip() else {}
        if not isinstance(overrides, dict):
            raise ValueError
    except ValueError:
        raise UserError(f"--variant {text!r}: expected 'LABEL=OPTIMIZER {{JSON object}}'. "
                        "Fix: e.g. --variant 'dct-l2=dct {\"dct_norm\": \"l2\"}'.") from None
    check_optimizer(name)
    return label.strip(), (name, overrides)


def parse_lrs(text: str | None, methods: list[str]) -> dict[str, list[float]]:
    """``"adamw=1e-3,3e-3;dct=1e-2"`` or ``"1e-3,1e-2"`` (for every method) -> {method: [lr, ...]}."""
    lrs = {m: list(DEFAULT_LRS.get(m, [3e-3, 1e-2])) for m in methods}
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


def own_gap(optimizer: str, overrides: dict[str, Any]) -> int | None:
    """The refresh interval a gradlore preset sets itself (None for AdamW and the peers)."""
    return PRESETS[optimizer](rank=1, **overrides).get("update_proj_gap") if optimizer in PRESETS else None


def _train_args(args: argparse.Namespace, method: str, lr: float, seed: int, out: Path) -> list[str]:
    optimizer, overrides = args.variants.get(method, (method, {}))
    sets: dict[str, Any] = {
        "data.vocab_size": args.vocab_size, "data.block_size": args.block_size,
        "train.batch_size": args.batch_size, "train.eval_every": args.eval_every, "train.eval_batches": 0,
        "train.ckpt_every": args.steps, "train.save_final_model": "false", "train.progress": "false",
        "train.threads": args.threads, "optim.grad_clip": args.grad_clip, "schedule.warmup_steps": args.warmup,
    }
    if own_gap(optimizer, overrides) != 1:  # methods that re-select every step keep doing so
        sets["optim.update_proj_gap"] = args.gap
    if overrides:
        sets["optim.overrides"] = json.dumps(overrides, separators=(",", ":"))
    cmd = ["train", "--preset", "default", "--data", args.data, "--model", args.model, "--optimizer", optimizer,
           "--lr", repr(lr), "--rank", str(args.rank), "--steps", str(args.steps), "--seed", str(seed),
           "--out", str(out), "--overwrite"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def run_one(args: argparse.Namespace, method: str, lr: float, seed: int) -> dict[str, Any]:
    out = Path(args.out) / "runs" / f"{method}-lr{lr:g}-s{seed}"
    cmd = _train_args(args, method, lr, seed, out)
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
            raise RuntimeError(f"run {method} lr={lr} seed={seed} failed (exit {done.returncode})")
        summary = json.loads(summary_path.read_text())
        summary["wall_seconds"] = time.time() - t0
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        (out / "bench_cmd.txt").write_text(key)
    summary.update(lr=lr, method=method, seed=seed, run_dir=str(out))
    print(f"  {method:14s} lr={lr:<8g} seed={seed} val ppl {_ppl(summary):8.2f}  {summary['tokens_per_s']:7.0f} tok/s  "
          f"state {summary['opt_state_bytes'] / 2**20:6.2f} MiB  peak RSS {summary['peak_rss_bytes'] / 2**20:6.0f} MiB"
          f"  ({summary['status']})", flush=True)
    return summary


def _ppl(s: dict[str, Any]) -> float:
    p = s.get("final_val_ppl")
    return p if s.get("status") == "completed" and isinstance(p, float) and math.isfinite(p) else math.inf


def best_lrs(results: list[dict[str, Any]], methods: list[str], seed: int) -> dict[str, float]:
    """Each method's LR with the lowest validation perplexity on ``seed`` (the sweep seed)."""
    out = {}
    for m in methods:
        runs = [r for r in results if r["method"] == m and r["seed"] == seed]
        if runs:
            out[m] = min(runs, key=_ppl)["lr"]
    return out


def _mean_sd(xs: list[float]) -> str:
    if not xs:
        return "–"
    if any(not math.isfinite(x) for x in xs):
        return "diverged"
    return f"{statistics.fmean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def tables(results: list[dict[str, Any]], methods: list[str], seeds: list[int], reference: str | None
           ) -> tuple[str, str, str, dict[str, list[dict]]]:
    """(best-LR table over seeds, paired-difference table, sweep table) in Markdown, and the best runs per method."""
    best_lr = best_lrs(results, methods, seeds[0])
    best = {m: sorted((r for r in results if r["method"] == m and r["lr"] == lr), key=lambda r: r["seed"])
            for m, lr in best_lr.items()}
    lines = ["| method | best LR | val ppl, mean ± s.d. | " + " | ".join(f"seed {s}" for s in seeds)
             + " | tokens/s | optimizer state | peak RSS |", "|---|---|---|" + "---|" * len(seeds) + "---|---|---|"]
    for m, runs in best.items():
        by_seed = {r["seed"]: r for r in runs}
        cells = [f"{_ppl(by_seed[s]):.2f}" if s in by_seed else "–" for s in seeds]
        lines.append(f"| {m} | {best_lr[m]:g} | {_mean_sd([_ppl(r) for r in runs])} (n={len(runs)}) | "
                     + " | ".join(cells) + f" | {statistics.fmean(r['tokens_per_s'] for r in runs):.0f} | "
                     f"{runs[0]['opt_state_bytes'] / 2**20:.2f} MiB | "
                     f"{max(r['peak_rss_bytes'] for r in runs) / 2**20:.0f} MiB |")
    paired = []
    if reference in best:
        ref = {r["seed"]: _ppl(r) for r in best[reference]}
        paired = [f"| method − {reference} | mean ± s.d. of ppl/ppl_ref − 1 | "
                  + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|---|" + "---|" * len(seeds)]
        for m, runs in best.items():
            if m == reference:
                continue
            diffs = {r["seed"]: 100 * (_ppl(r) / ref[r["seed"]] - 1) for r in runs if r["seed"] in ref}
            vals = list(diffs.values())
            summary = "–" if not vals else (f"{statistics.fmean(vals):+.2f}% ± {statistics.stdev(vals):.2f}%"
                                            if len(vals) > 1 else f"{vals[0]:+.2f}%") + f" (n={len(vals)})"
            paired.append(f"| {m} | {summary} | " + " | ".join(f"{diffs[s]:+.2f}%" if s in diffs else "–"
                                                               for s in seeds) + " |")
    lrs = sorted({r["lr"] for r in results if r["seed"] == seeds[0]})
    sweep = ["| method | " + " | ".join(f"LR {lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for m in methods:
        cells = []
        for lr in lrs:
            hit = [r for r in results if r["method"] == m and r["lr"] == lr and r["seed"] == seeds[0]]
            cells.append(f"{_ppl(hit[0]):.2f}" if hit and math.isfinite(_ppl(hit[0])) else
                         ("diverged" if hit else "–"))
        sweep.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines), "\n".join(paired), "\n".join(sweep), best


def plot(best: dict[str, list[dict]], path: Path) -> None:
    """Overlaid curves of each method at its best LR, first seed: smoothed training loss and validation loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (m, runs) in enumerate(best.items()):
        r = runs[0]
        train, val = read_losses(Path(r["run_dir"]) / "metrics.jsonl")
        color = f"C{i}"
        if train:
            steps, losses = zip(*train, strict=True)
            ax1.plot(steps, ema(list(losses), 0.95), color=color, lw=1.4, label=f"{m} (lr {r['lr']:g})")
        if val:
            vs, vl = zip(*val, strict=True)
            ax2.plot(vs, [math.exp(v) for v in vl], "o-", color=color, lw=1.4, ms=3, label=m)
    ax1.set(xlabel="step", ylabel="training loss (EMA 0.95)", title=f"training loss, best LR, seed {r['seed']}")
    ax2.set(xlabel="step", ylabel="validation perplexity", yscale="log", title="validation perplexity")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--data", default="shakespeare", help="corpus (default: the shakespeare corpus)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated optimizers or variants (default: {','.join(METHODS)}; variants: "
                        f"{', '.join(VARIANTS)})")
    p.add_argument("--variant", action="append", default=[], metavar="'LABEL=OPTIMIZER {JSON}'",
                   help="name another variant: an optimizer with some group keys changed (repeatable)")
    p.add_argument("--lrs", help="LR sweep on the first seed: 'LR,LR' for all methods or 'adamw=1e-3,3e-3;dct=1e-2'")
    p.add_argument("--seeds", default=None, help="comma-separated seeds; the first one runs the LR sweep (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="a single seed (when --seeds is not given)")
    p.add_argument("--reference", default="galore", help="method the paired differences are taken against")
    p.add_argument("--model", default="small")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--gap", type=int, default=50,
                   help="refresh interval of the methods that refresh on an interval (galore, dct-galore, fira, "
                        "galore-torch, ...); methods whose preset re-selects every step (dct) keep doing so")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=-1, help="warmup steps (-1: 10%% of steps)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench-pretrain")
    p.add_argument("--no-reuse", dest="reuse", action="store_false", help="rerun finished runs")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="only run (a chunk); build no tables (use when running a subset)")
    return p


def run(args: argparse.Namespace) -> int:
    args.variants = dict(VARIANTS)
    args.variants.update(parse_variant(v) for v in args.variant)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        check_optimizer(args.variants[m][0] if m in args.variants else m)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    lrs = parse_lrs(args.lrs, methods)
    unknown = set(lrs) - set(methods)
    if unknown:
        raise UserError(f"--lrs names {sorted(unknown)}, not in --methods. Fix: list them in --methods.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokens = args.steps * args.batch_size * args.block_size
    print(f"bench pretrain: {args.model} on {args.data}, {args.steps} steps x {args.batch_size}x{args.block_size} "
          f"tokens = {tokens:,} tokens, rank {args.rank}, refresh every {args.gap} (per-step methods: 1), "
          f"seeds {seeds}", flush=True)
    results = [run_one(args, m, lr, seeds[0]) for m in methods for lr in lrs[m]]
    for m, lr in best_lrs(results, methods, seeds[0]).items():
        results += [run_one(args, m, lr, s) for s in seeds[1:]]
    if not args.report:
        return 0
    best_table, paired_table, sweep_table, best = tables(results, methods, seeds, args.reference)
    plot(best, out / "loss_curves.png")
    command = "gradlore bench pretrain " + " ".join(sys.argv[sys.argv.index("pretrain") + 1:]) \
        if "pretrain" in sys.argv else "gradlore bench pretrain"
    variants = "; ".join(f"{m} = {args.variants[m][0]} with {json.dumps(args.variants[m][1])}"
                         for m in methods if m in args.variants)
    report = (f"Command: `{command}`\n\n{args.model} LLaMA, {args.data}, {args.steps} steps of "
              f"{args.batch_size}x{args.block_size} tokens ({tokens:,} tokens), rank {args.rank}, refresh every "
              f"{args.gap} steps (every step for the per-step methods), warmup "
              f"{'10%' if args.warmup < 0 else args.warmup} + cosine to 10%, clip {args.grad_clip}, seeds {seeds} "
              f"(LR sweep on seed {seeds[0]}), {args.threads} threads."
              + (f" Variants: {variants}." if variants else "") + "\n\n"
              f"Best LR per method (validation perplexity on the held-out tail):\n\n{best_table}\n\n"
              + (f"Paired differences (same seed = same initial weights and data order):\n\n{paired_table}\n\n"
                 if paired_table else "")
              + f"LR sweep (validation perplexity, seed {seeds[0]}):\n\n{sweep_table}\n\n"
              f"Plot: {out / 'loss_curves.png'}\n")
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n" + report)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(argparse.ArgumentParser(prog="gradlore bench pretrain", description=__doc__))
    return run(parser.parse_args(argv))
