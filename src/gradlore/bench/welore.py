"""WeLore benchmark on a real model (arXiv 2407.11239): SmolLM2-135M-Instruct, perplexity on WikiText-2.

    gradlore bench welore --phase ppl        # dense + {welore, uniform} × {data-free, data-aware} × budgets
    gradlore bench welore --phase finetune   # LRC-only vs full fine-tuning (`gradlore finetune` runs)
    gradlore bench welore --phase speed      # training and CPU inference tokens/s, compressed vs dense
    gradlore bench welore --phase report     # markdown tables + perplexity-vs-budget plot

Corpora: evaluation = ../shared/data/wikitext2-raw-test.txt (first ``--eval-tokens`` tokens, windows of
``--context`` with ``--stride``); calibration for the data-aware variant and fine-tuning = CPython's
``pydoc_data.topics`` (the language reference prose shipped with every Python), calibration from the first
``--calib-tokens`` tokens of its first ``CALIB_CHARS`` characters and fine-tuning on the characters after
them, so the two never overlap and neither overlaps WikiText.
Results accumulate in ``--out``/results.json; every phase can be rerun alone.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gradlore.cache import cache_dir
from gradlore.compress.eval import perplexity, read_text, tokenize
from gradlore.compress.spectrum import collect_activation_stats, find_targets
from gradlore.compress.welore import compress, save_compressed, text_blocks
from gradlore.data.tokenizer import load_tokenizer
from gradlore.errors import UserError
from gradlore.models import load_model, smollm2
from gradlore.train.rundir import read_losses

DEFAULT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
METHODS = ("welore", "uniform")
CALIB_CHARS = 160_000  # calibration reads the first --calib-tokens tokens of this head; fine-tuning the rest
MODES = (None, "whiten")


def _wiki(args: argparse.Namespace) -> Path:
    path = Path(args.eval_data) if args.eval_data else DEFAULT_DATA / "wikitext2-raw-test.txt"
    if not path.exists():
        raise UserError(f"evaluation text {path} not found; pass --eval-data FILE (WikiText-2 raw test).")
    return path


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _load(results_path: Path) -> dict[str, Any]:
    return json.loads(results_path.read_text()) if results_path.exists() else {}


def _save(results_path: Path, results: dict[str, Any], *keys: str) -> None:
    """Write ``keys`` of ``results`` into the file, keeping what other (concurrent) phases wrote there."""
    current = _load(results_path)
    current.update({k: results[k] for k in keys})
    results_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = results_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(current, indent=1))
    tmp.replace(results_path)


def _ckpt_dir(args: argparse.Namespace, method: str, mode: str | None, budget: float) -> Path:
    return cache_dir() / "bench" / f"smollm2-{method}-{mode or 'free'}-{int(round(budget * 100))}"


# ------------------------------------------------------------------------------------------ perplexities
def phase_ppl(args: argparse.Namespace, results: dict[str, Any]) -> None:
    dense = load_model("smollm2")
    tok = load_tokenizer(str(smollm2()))
    ids = tokenize(tok, read_text(_wiki(args), max_chars=args.eval_tokens * 16), args.eval_tokens)
    t0 = time.perf_counter()
    res = perplexity(dense, ids, args.context, args.stride, batch_size=args.batch_size)
    results["setup"] = {"eval_tokens": int(ids.numel()), "tokens_scored": res.tokens_scored, "context": args.context,
                        "stride": args.stride or args.context, "calib_tokens": args.calib_tokens, "damping": args.damping,
                        "eval_data": _wiki(args).name, "calib_data": "pydoc_data.topics"}
    results["dense"] = {"perplexity": res.perplexity, "params": sum(p.numel() for p in dense.parameters())}
    print(f"dense: ppl {res.perplexity:.2f} on {res.tokens_scored} tokens ({time.perf_counter() - t0:.0f} s)", flush=True)
    calib = text_blocks(tok, pydoc_text()[:CALIB_CHARS], args.calib_tokens, 512)
    runs = results.setdefault("runs", {})
    for mode in args.modes:
        stats = None
        if mode is not None:
            t = time.perf_counter()
            stats = collect_activation_stats(dense, find_targets(dense), calib)
            print(f"calibration statistics on {stats.tokens} tokens: {time.perf_counter() - t:.0f} s", flush=True)
        svd_cache: dict[str, tuple[torch.Tensor, ...]] = {}  # one SVD per weight, reused by every budget
        for budget in args.budgets:
            for method in METHODS:
                key = f"{method}|{mode or 'free'}|{budget}"
                if key in runs and not args.redo:
                    continue
                model = copy.deepcopy(dense)
                t = time.perf_counter()
                rep = compress(model, remove=budget, method=method, data_aware=mode, activation_stats=stats,
                               svd_cache=svd_cache, damping=args.damping if mode == "whiten" else None)
                tc = time.perf_counter() - t
                r = perplexity(model, ids, args.context, args.stride, batch_size=args.batch_size)
                runs[key] = {
                    "method": method, "mode": mode or "free", "budget": budget, "perplexity": r.perplexity,
                    "removed": rep.removed_fraction, "rank_reduction": rep.rank_reduction, "n_lrc": rep.n_lrc,
                    "n_targets": rep.n_targets, "model_params": rep.model_params_after, "compress_s": tc,
                    "threshold": rep.threshold, "damping": args.damping if mode == "whiten" else None,
                }
                print(f"{key}: ppl {r.perplexity:,.1f}; removed {rep.removed_fraction:.3f}, ERR "
                      f"{rep.rank_reduction:.3f}, {rep.n_lrc}/{rep.n_targets} LRC, compress {tc:.0f} s", flush=True)
                if method == "welore" and budget in (args.ft_budget, max(args.budgets)):  # for finetune/speed
                    save_compressed(model, _ckpt_dir(args, method, mode, budget), tokenizer=tok, overwrite=True)
                _save(args.results, results, "setup", "dense", "runs")
                del model
                gc.collect()
        del svd_cache, stats
        gc.collect()


# ------------------------------------------------------------------------------------------ fine-tuning
def _ft_text(args: argparse.Namespace) -> Path:
    """The fine-tuning text: pydoc prose after the part that calibration may use, as a file for `finetune`."""
    path = args.out / "finetune_text.txt"
    text = pydoc_text()[CALIB_CHARS:]
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def _finetune(name: str, args: argparse.Namespace, model: str, steps: int, lr: float, full: bool,
              evaluate: bool) -> dict[str, Any]:
    """One `gradlore finetune` process (so that its peak memory is its own); perplexity of its final model."""
    out = args.out / "runs" / name
    cmd = [sys.executable, "-m", "gradlore.cli", "finetune", "--model", model, "--data", str(_ft_text(args)),
           "--steps", str(steps), "--batch-size", str(args.ft_batch), "--block-size", str(args.ft_seq),
           "--lr", str(lr), "--optimizer", "adamw" if full else args.ft_optimizer, "--out", str(out), "--overwrite",
           "--set", "schedule.warmup_steps=5", "--set", f"train.threads={args.threads}", "--set", "train.progress=false",
           "--set", f"train.eval_every={steps}", "--set", f"train.save_final_model={str(evaluate).lower()}"]
    cmd += ["--full"] if full else []
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(proc.stdout[-1500:])
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"fine-tune run {name} failed")
    s = json.loads((out / "summary.json").read_text())
    r = {"tokens": s["tokens"], "trainable_params": s["trainable_params"], "total_params": s["params"],
         "optimizer_state_bytes": s["opt_state_bytes"], "grad_bytes": 4 * s["trainable_params"],
         "peak_memory_bytes": s["peak_rss_bytes"], "tokens_per_s": s["tokens_per_s_median"], "steps": s["steps"]}
    losses = [v for _, v in read_losses(out / "metrics.jsonl")[0]]
    r["first_loss"], r["last_loss"] = losses[0], losses[-1]
    if evaluate:
        tok = load_tokenizer(str(out / "final"))
        ids = tokenize(tok, read_text(_wiki(args), max_chars=args.eval_tokens * 16), args.eval_tokens)
        r["perplexity_after"] = perplexity(load_model(out / "final"), ids, args.context, args.context).perplexity
    return r


def _ft_jobs(args: argparse.Namespace) -> dict[str, tuple[str, float, bool]]:
    ckpt = _ckpt_dir(args, "welore", args.ft_mode, args.ft_budget)
    if not ckpt.exists():
        raise SystemExit(f"{ckpt} missing: run --phase ppl first (it saves the {args.ft_budget:.0%} WeLore model).")
    return {f"lrc-{args.ft_optimizer}{args.ft_tag}": (str(ckpt), args.ft_lr, False),
            "full-adamw": ("smollm2", args.ft_lr_full, True)}


def phase_finetune(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Perplexity after fine-tuning on the same tokens."""
    for name, (model, lr, full) in _ft_jobs(args).items():
        if name.split("-")[0] not in args.ft_jobs:
            continue
        r = _finetune(name, args, model, args.ft_steps, lr, full, evaluate=True)
        ft = results.setdefault("finetune", {})
        ft[name] = r | {"budget": args.ft_budget, "mode": args.ft_mode or "free", "lr": lr}
        _save(args.results, results, "finetune")


# ------------------------------------------------------------------------------------------------ speed
@torch.no_grad()
def _speed(model: torch.nn.Module, ids: torch.Tensor, repeats: int, new_tokens: int) -> dict[str, float]:
    model.eval()
    x = ids[None, :]  # (1, L)
    model(input_ids=x)  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        model(input_ids=x)
    prefill = repeats * x.numel() / (time.perf_counter() - t)
    prompt = x[:, :32]
    model.generate(prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    t = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    decode = new_tokens / (time.perf_counter() - t)
    return {"prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode}


def phase_speed(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Timed: fine-tuning tokens/s and peak memory (fresh processes), then inference tokens/s (exclusive lock)."""
    ts = results.setdefault("train_speed", {})
    for name, (model, lr, full) in _ft_jobs(args).items():
        ts[name] = _finetune(f"speed-{name}", args, model, args.speed_steps, lr, full, evaluate=False)
        _save(args.results, results, "train_speed")
    tok = load_tokenizer(str(smollm2()))
    ids = tokenize(tok, read_text(_wiki(args), max_chars=args.context * 16), args.context)
    sp = results.setdefault("speed", {})
    models = {"dense": "smollm2"}
    for budget in args.budgets:
        ck = _ckpt_dir(args, "welore", args.ft_mode, budget)
        if ck.exists():
            models[f"welore-{args.ft_mode or 'free'}-{budget}"] = str(ck)
    for name, path in models.items():
        model = load_model(path)
        sp[name] = _speed(model, ids, args.speed_repeats, args.new_tokens) | {
            "params": sum(p.numel() for p in model.parameters()), "prompt_tokens": int(ids.numel())}
        print(name, sp[name], flush=True)
        _save(args.results, results, "speed")
        del model
        gc.collect()


# ----------------------------------------------------------------------------------------------- report
def phase_report(args: argparse.Namespace, results: dict[str, Any]) -> str:
    lines = []
    setup, dense = results.get("setup", {}), results.get("dense", {})
    runs = results.get("runs", {})
    if runs:
        lines.append(f"Perplexity on {setup.get('eval_data')} (first {setup.get('eval_tokens'):,} tokens, context "
                     f"{setup.get('context')}, stride {setup.get('stride')}, {setup.get('tokens_scored'):,} tokens scored); "
                     f"dense {dense.get('perplexity', float('nan')):.2f} ({dense.get('params', 0):,} params). "
                     f"Data-aware = activation-whitened SVD, calibration {setup.get('calib_tokens'):,} tokens of "
                     f"{setup.get('calib_data')}.\n")
        lines.append("| removed (targeted) | WeLore data-free | uniform data-free | WeLore data-aware | uniform data-aware "
                     "| ERR (WeLore free / aware) | LRC of 210 (free / aware) | model params (WeLore free) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for b in args.budgets:
            g = {(r["method"], r["mode"]): r for r in runs.values() if r["budget"] == b}
            if not g:
                continue

            def ppl(k: tuple[str, str], g: dict = g) -> str:
                return f"{g[k]['perplexity']:,.1f}" if k in g else "–"

            def fld(k: tuple[str, str], f: str, fmt: str, g: dict = g) -> str:
                return format(g[k][f], fmt) if k in g else "–"

            lines.append(
                f"| {b:.0%} | {ppl(('welore', 'free'))} | {ppl(('uniform', 'free'))} | {ppl(('welore', 'whiten'))} | "
                f"{ppl(('uniform', 'whiten'))} | {fld(('welore', 'free'), 'rank_reduction', '.1%')} / "
                f"{fld(('welore', 'whiten'), 'rank_reduction', '.1%')} | {fld(('welore', 'free'), 'n_lrc', 'd')} / "
                f"{fld(('welore', 'whiten'), 'n_lrc', 'd')} | {fld(('welore', 'free'), 'model_params', ',')} |"
            )
        _plot(args, results)
    ft, ts = results.get("finetune", {}), results.get("train_speed", {})
    if ft:
        mib = 1 << 20
        base = next((r["perplexity"] for r in runs.values() if r["method"] == "welore"
                     and r["mode"] == (args.ft_mode or "free") and r["budget"] == args.ft_budget), float("nan"))
        lines.append("")
        lines.append("| fine-tune on pydoc text | tokens | lr | ppl before | ppl after | loss first → last | trainable params "
                     "| optimizer state | grads | peak RSS (timed run) | train tokens/s (timed run) |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, r in ft.items():
            before = base if name.startswith("lrc") else dense.get("perplexity", float("nan"))
            t = ts.get(name, ts.get(name.split("@")[0], {}))
            lines.append(
                f"| {name} | {r['tokens']:,} | {r.get('lr', '')} | {before:,.1f} | {r.get('perplexity_after', float('nan')):,.1f} | "
                f"{r['first_loss']:.2f} → {r['last_loss']:.2f} | {r['trainable_params']:,} | "
                f"{r['optimizer_state_bytes'] / mib:.0f} MiB | {r['grad_bytes'] / mib:.0f} MiB | "
                f"{t.get('peak_memory_bytes', 0) / mib:,.0f} MiB | {t.get('tokens_per_s', float('nan')):.0f} |"
            )
    sp = results.get("speed", {})
    if sp:
        lines.append("")
        lines.append("| CPU inference (2 threads) | params | prefill tokens/s (1×512) | decode tokens/s (greedy, batch 1) |")
        lines.append("|---|---|---|---|")
        for name, r in sp.items():
            lines.append(f"| {name} | {r['params']:,} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} |")
    text = "\n".join(lines)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return text


def _plot(args: argparse.Namespace, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    styles = {("welore", "free"): "o-", ("uniform", "free"): "o--", ("welore", "whiten"): "s-", ("uniform", "whiten"): "s--"}
    for (method, mode), style in styles.items():
        pts = sorted((r["budget"], r["perplexity"]) for r in results["runs"].values()
                     if r["method"] == method and r["mode"] == mode)
        if pts:
            ax.plot([100 * b for b, _ in pts], [p for _, p in pts], style,
                    label=f"{'WeLore' if method == 'welore' else 'uniform'} {'data-aware' if mode == 'whiten' else 'data-free'}")
    ax.axhline(results["dense"]["perplexity"], color="k", lw=0.8, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("% of targeted parameters removed")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.set_title("SmolLM2-135M-Instruct", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "welore_ppl_vs_budget.png")
    plt.close(fig)


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--phase", choices=("all", "ppl", "finetune", "speed", "report"), default="all")
    p.add_argument("--out", type=Path, default=Path("bench_results/welore"))
    p.add_argument("--eval-data", help="default ../shared/data/wikitext2-raw-test.txt")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=[0.05, 0.1, 0.2, 0.3])
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--modes", type=lambda s: [None if m == "free" else m for m in s.split(",")], default=list(MODES),
                   help="free,whiten")
    p.add_argument("--damping", type=float, default=0.1, help="whitening ridge (share of the Gram's mean diagonal)")
    p.add_argument("--ft-budget", type=float, default=0.2)
    p.add_argument("--ft-mode", default="whiten", help="which compressed model to fine-tune: whiten or free")
    p.add_argument("--ft-steps", type=int, default=40)
    p.add_argument("--ft-batch", type=int, default=4)
    p.add_argument("--ft-seq", type=int, default=256)
    p.add_argument("--ft-lr", type=float, default=1e-4)
    p.add_argument("--ft-lr-full", type=float, default=2e-5)
    p.add_argument("--ft-optimizer", default="adamw")
    p.add_argument("--ft-tag", default="", help="suffix for the LRC run's name in results.json (e.g. -lr1e-3)")
    p.add_argument("--ft-jobs", type=lambda s: s.split(","), default=["lrc", "full"], help="lrc,full")
    p.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument("--speed-steps", type=int, default=6, help="fine-tuning steps timed in the speed phase")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--redo", action="store_true", help="recompute runs already in results.json")
    return p


def run(args: argparse.Namespace) -> int:
    args.ft_mode = None if args.ft_mode == "free" else args.ft_mode
    args.results = args.out / "results.json"
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    results = _load(args.results)
    if args.phase in ("all", "ppl"):
        phase_ppl(args, results)
    if args.phase in ("all", "finetune"):
        phase_finetune(args, results)
    if args.phase in ("all", "speed"):
        phase_speed(args, results)
    phase_report(args, _load(args.results))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(argparse.ArgumentParser(prog="python -m gradlore.bench.welore",
                                                    description=__doc__.splitlines()[0])).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
