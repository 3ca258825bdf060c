"""WeLore benchmark on a real model (arXiv 2407.11239): SmolLM2-135M-Instruct, perplexity on two corpora.

    gradlore bench welore --phase calib      # calibration statistics: shared XᵀX products vs one per layer
    gradlore bench welore --phase ppl        # dense + {welore, uniform} × {data-free, data-aware} × budgets
    gradlore bench welore --phase finetune   # LRC-only vs full fine-tuning (`gradlore finetune` runs)
    gradlore bench welore --phase speed      # training and CPU inference tokens/s, compressed vs dense
    gradlore bench welore --phase report     # markdown tables + perplexity-vs-budget plot

Evaluation: the first ``--eval-tokens`` tokens of ../shared/data/wikitext2-raw-test.txt and of the packaged
tiny-shakespeare, windows of ``--context`` with ``--stride``, each window starting as the tokenizer says
(SmolLM2's adds no BOS). Calibration of the data-aware variant (``--calib``): ``pydoc`` = CPython's
``pydoc_data.topics`` (the language reference prose shipped with every Python), its first ``CALIB_CHARS``
characters; ``wikitext2-tail`` = WikiText-2 test from character 200,000 on and ``shakespeare-tail`` = the
packaged text from character 100,000 on (in-domain, disjoint from the evaluated heads). Fine-tuning reads
the pydoc characters after ``CALIB_CHARS`` (``--ft-data pydoc``) or WikiText-2 test from character 300,000 on
(``--ft-data wikitext2-tail``, in-domain), so it never overlaps calibration or evaluation.
Results accumulate in ``--out``/results.json and finished work is reused: every phase can be rerun alone,
and ``--budget-s`` stops starting new work after that many seconds (a running fine-tune is interrupted, it
checkpoints, and the next invocation resumes it), so a long benchmark runs in short chunks.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gradlore.bench.welore_common import (
    CALIB_SOURCES,
    FT_KINDS,
    FT_SOURCES,
    METHODS,
    _ckpt_dir,
    _left,
    _load,
    _save,
    _wiki,
    calib_text,
    eval_sets,
    method_key,
    ppls,
    pydoc_text,
)
from gradlore.bench.welore_report import phase_report, variant
from gradlore.bench.welore_train import phase_finetune, phase_speed
from gradlore.compress.sensitivity import collect_sensitivity
from gradlore.compress.spectrum import collect_activation_stats, find_targets
from gradlore.compress.welore import compress, save_compressed, text_blocks
from gradlore.data.tokenizer import load_tokenizer, sequence_bos
from gradlore.errors import UserError
from gradlore.models import load_model, smollm2
from gradlore.optim.build import optimizer_names

__all__ = ["build_parser", "main", "pydoc_text", "run"]


# ------------------------------------------------------------------------------------ calibration cost
def phase_calib(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Shared products (the memo) against one product per layer on the real model: time, equal Grams."""
    dense = load_model("smollm2")
    tok = load_tokenizer(str(smollm2()))
    blocks = text_blocks(tok, calib_text(args), args.calib_tokens, 512, sequence_bos(tok))
    modules = find_targets(dense)

    def timed(share: bool) -> tuple[float, Any]:
        t = time.perf_counter()
        stats = collect_activation_stats(dense, modules, blocks, share_inputs=share)
        print(f"share_inputs={share}: {time.perf_counter() - t:.1f} s", flush=True)
        return time.perf_counter() - t, stats

    t_shared, a = timed(True)
    t_plain, b = timed(False)
    equal = sum(torch.equal(a.gram[n], b.gram[n]) and torch.equal(a.abs_sum[n], b.abs_sum[n]) for n in a.gram)
    del b
    gc.collect()
    t_again, c = timed(True)  # a second shared pass: the first is not only a cold start, and it repeats bit for bit
    again = sum(torch.equal(a.gram[n], c.gram[n]) for n in a.gram)
    results["calib"] = {"tokens": a.tokens, "layers": len(a.gram), "equal_to_per_layer": equal, "equal_rerun": again,
                        "shared_s": [t_shared, t_again], "per_layer_s": [t_plain], "calib": args.calib}
    print(results["calib"], flush=True)
    _save(args.results, results, "calib")


# ------------------------------------------------------------------------------------------ perplexities
def phase_ppl(args: argparse.Namespace, results: dict[str, Any]) -> None:
    dense = load_model("smollm2")
    tok = load_tokenizer(str(smollm2()))
    bos = sequence_bos(tok)
    sets = eval_sets(args, tok)
    if "dense" not in results or args.redo:
        t0 = time.perf_counter()
        dp = ppls(dense, sets, args, bos)
        results["setup"] = {"eval_tokens": {k: int(v.numel()) for k, v in sets.items()}, "context": args.context,
                            "stride": args.stride or args.context, "eval_data": _wiki(args).name, "bos": bos}
        results["dense"] = {"perplexity": dp["wikitext2"], "ppl": dp, "params": sum(p.numel() for p in dense.parameters())}
        print(f"dense: {dp} ({time.perf_counter() - t0:.0f} s)", flush=True)
        _save(args.results, results, "setup", "dense")
    runs = results.setdefault("runs", {})
    for mode in args.modes:
        ridges = args.dampings if mode == "whiten" else [None]  # one statistics pass serves every ridge
        todo = [(d, b, m) for d in ridges for b in args.budgets for m in args.methods
                if (m != "loss" or mode == "whiten")
                and (f"{method_key(args, m)}|{variant(args, mode, d)}|{b}" not in runs or args.redo)]
        if not todo:
            continue
        stats = None
        if mode is not None:
            if _left(args) < 240:
                print("time budget reached; rerun to continue", flush=True)
                return
            t = time.perf_counter()
            blocks = text_blocks(tok, calib_text(args), args.calib_tokens, 512, bos)
            stats = collect_activation_stats(dense, find_targets(dense), blocks)
            print(f"calibration statistics on {stats.tokens} tokens ({args.calib}): {time.perf_counter() - t:.0f} s",
                  flush=True)
            if mode == "whiten" and any(m == "loss" for _, _, m in todo):  # one backward pass serves every budget
                t = time.perf_counter()
                stats.sensitivity = collect_sensitivity(dense, find_targets(dense), blocks[: max(1, args.sens_tokens // 512)])
                print(f"sensitivities on {args.sens_tokens} tokens: {time.perf_counter() - t:.0f} s", flush=True)
        svd_cache: dict = {}  # one SVD per weight, reused by every budget (keyed by weights, statistics, ridge)
        for damping, budget, method in todo:
            if _left(args) < args.min_left:
                print("time budget reached; rerun to continue", flush=True)
                return
            label = variant(args, mode, damping)
            key = f"{method_key(args, method)}|{label}|{budget}"
            model = copy.deepcopy(dense)
            t = time.perf_counter()
            rep = compress(model, remove=budget, method=method, data_aware=mode, activation_stats=stats,
                           svd_cache=svd_cache, damping=damping)
            tc = time.perf_counter() - t
            p = ppls(model, sets, args, bos)
            runs[key] = {
                "method": method_key(args, method), "mode": label, "budget": budget, "perplexity": p["wikitext2"], "ppl": p,
                "removed": rep.removed_fraction, "rank_reduction": rep.rank_reduction, "n_lrc": rep.n_lrc,
                "n_targets": rep.n_targets, "model_params": rep.model_params_after, "compress_s": tc,
                "threshold": rep.threshold, "ranks": {r["name"]: r["rank"] for r in rep.layers},
            }
            print(f"{key}: ppl {p}; removed {rep.removed_fraction:.3f}, ERR {rep.rank_reduction:.3f}, "
                  f"{rep.n_lrc}/{rep.n_targets} LRC, compress {tc:.0f} s", flush=True)
            if method == "welore" and budget in args.ft_budgets:  # for finetune / speed
                save_compressed(model, _ckpt_dir(label, budget), tokenizer=tok, overwrite=True)
            _save(args.results, results, "runs")
            del model
            gc.collect()
        del svd_cache, stats
        gc.collect()


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",")]


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--phase", choices=("all", "calib", "ppl", "finetune", "speed", "report"), default="all")
    p.add_argument("--out", type=Path, default=Path("bench_results/welore"))
    p.add_argument("--eval-data", help="default ../shared/data/wikitext2-raw-test.txt")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--budgets", type=_floats, default=[0.05, 0.1, 0.2, 0.3])
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS), help="welore,uniform,loss")
    p.add_argument("--calib", choices=CALIB_SOURCES, default="pydoc", help="calibration text of the data-aware variant")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--sens-tokens", type=int, default=4096, help="tokens of the loss allocation's sensitivity pass")
    p.add_argument("--modes", type=lambda s: [None if m == "free" else m for m in s.split(",")],
                   default=[None, "whiten"], help="free,whiten")
    p.add_argument("--damping", dest="dampings", type=_floats, default=[0.1],
                   help="whitening ridge(s), a share of the Gram's mean diagonal; the first is the one reported and "
                        "fine-tuned, the others are a sweep on the same statistics")
    p.add_argument("--ft-budgets", type=_floats, default=[0.2, 0.3], help="compressed models fine-tuned (and saved)")
    p.add_argument("--ft-data", choices=FT_SOURCES, default="pydoc", help="fine-tuning text (runs of another "
                   "text get an @ft-<text> suffix)")
    p.add_argument("--ft-mode", default="whiten", help="which compressed model to fine-tune: whiten or free")
    p.add_argument("--ft-steps", type=int, default=40, help="steps of the 1x token budget")
    p.add_argument("--ft-mults", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4],
                   help="token budgets as multiples of --ft-steps (same batch and length)")
    p.add_argument("--ft-batch", type=int, default=2)
    p.add_argument("--ft-seq", type=int, default=256)
    p.add_argument("--ft-lr", type=float, default=3e-4, help="LR of LRC-only fine-tuning")
    p.add_argument("--ft-lr-full", type=float, default=3e-5, help="LR of full fine-tuning")
    p.add_argument("--ft-lr-lora", type=float, default=1e-4, help="LR of LoRA on the dense model")
    p.add_argument("--ft-lora-rank", type=int, default=32)
    p.add_argument("--ft-optimizer", default="adamw", help="optimizer of the LRC runs")
    p.add_argument("--ft-tag", default="", help="suffix for the runs' names in results.json (e.g. @lr1e-3)")
    p.add_argument("--ft-jobs", type=lambda s: s.split(","), default=["lrc", "full"], help=",".join(FT_KINDS))
    p.add_argument("--speed-repeats", type=int, default=3)
    p.add_argument("--speed-steps", type=int, default=6, help="fine-tuning steps timed in the speed phase")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=float("inf"),
                   help="stop starting new work after this many seconds (interrupting a fine-tune, which resumes)")
    p.add_argument("--min-left", type=float, default=90, help="seconds a new compression / fine-tune needs at least")
    p.add_argument("--redo", action="store_true", help="recompute runs already in results.json")
    return p


def run(args: argparse.Namespace) -> int:
    args.ft_mode = None if args.ft_mode == "free" else args.ft_mode
    args.damping = args.dampings[0]
    args.results = args.out / "results.json"
    args.deadline = time.monotonic() + args.budget_s
    bad = [k for k in args.ft_jobs if k not in FT_KINDS]
    if bad:
        raise UserError(f"--ft-jobs {','.join(bad)}: not one of {', '.join(FT_KINDS)}.")
    if "lora" in args.ft_jobs and "lora" not in optimizer_names():
        raise UserError("--ft-jobs lora: this gradlore has no `--optimizer lora` (peft LoRA) yet. "
                        "Fix: leave lora out of --ft-jobs.")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    results = _load(args.results)
    for name, phase in (("calib", phase_calib), ("ppl", phase_ppl), ("finetune", phase_finetune),
                        ("speed", phase_speed)):
        if args.phase == name or (args.phase == "all" and name != "calib"):
            phase(args, results)
    phase_report(args, _load(args.results))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(argparse.ArgumentParser(prog="python -m gradlore.bench.welore",
                                                    description=__doc__.splitlines()[0])).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
