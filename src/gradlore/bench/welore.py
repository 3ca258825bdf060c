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
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gradlore.bench.welore_report import phase_report, variant
from gradlore.cache import cache_dir
from gradlore.compress.eval import perplexity, read_text, tokenize
from gradlore.compress.spectrum import collect_activation_stats, find_targets
from gradlore.compress.welore import compress, save_compressed, text_blocks
from gradlore.data.corpora import resolve_corpus
from gradlore.data.tokenizer import load_tokenizer, sequence_bos
from gradlore.errors import UserError
from gradlore.models import load_model, smollm2
from gradlore.optim.build import optimizer_names
from gradlore.train.rundir import read_losses

DEFAULT_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
METHODS = ("welore", "uniform")
CALIB_CHARS = 160_000  # calibration reads the first --calib-tokens tokens of this head; fine-tuning the rest
CALIB_SOURCES = ("pydoc", "wikitext2-tail", "shakespeare-tail")
FT_SOURCES = ("pydoc", "wikitext2-tail")  # fine-tuning text: after CALIB_CHARS, or WikiText-2 test from 300,000 on
FT_KINDS = ("lrc", "full", "lora")  # lora: the dense model through `--optimizer lora` (peft), when it exists


def _wiki(args: argparse.Namespace) -> Path:
    path = Path(args.eval_data) if args.eval_data else DEFAULT_DATA / "wikitext2-raw-test.txt"
    if not path.exists():
        raise UserError(f"evaluation text {path} not found; pass --eval-data FILE (WikiText-2 raw test).")
    return path


def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def calib_text(args: argparse.Namespace) -> str:
    if args.calib == "pydoc":
        return pydoc_text()[:CALIB_CHARS]
    if args.calib == "wikitext2-tail":
        return _wiki(args).read_text(encoding="utf-8")[200_000:]
    return resolve_corpus("tiny-shakespeare").read_text(encoding="utf-8")[100_000:]


def eval_sets(args: argparse.Namespace, tok: Any) -> dict[str, torch.Tensor]:
    """Corpus name -> the first --eval-tokens ids (no special tokens; `perplexity` adds the BOS if any)."""
    n = args.eval_tokens
    texts = {"wikitext2": read_text(_wiki(args), max_chars=n * 16),
             "shakespeare": resolve_corpus("tiny-shakespeare").read_text(encoding="utf-8")[: n * 16]}
    return {name: tokenize(tok, text, n) for name, text in texts.items()}


def ppls(model: torch.nn.Module, sets: dict[str, torch.Tensor], args: argparse.Namespace, bos: int | None
         ) -> dict[str, float]:
    return {name: perplexity(model, ids, args.context, args.stride, batch_size=args.batch_size, bos=bos).perplexity
            for name, ids in sets.items()}


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


def _ckpt_dir(label: str, budget: float) -> Path:
    return cache_dir() / "bench" / f"smollm2-welore-{label}-{int(round(budget * 100))}"


def _left(args: argparse.Namespace) -> float:
    return args.deadline - time.monotonic()


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
                if f"{m}|{variant(args, mode, d)}|{b}" not in runs or args.redo]
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
        svd_cache: dict = {}  # one SVD per weight, reused by every budget (keyed by weights, statistics, ridge)
        for damping, budget, method in todo:
            if _left(args) < args.min_left:
                print("time budget reached; rerun to continue", flush=True)
                return
            label = variant(args, mode, damping)
            key = f"{method}|{label}|{budget}"
            model = copy.deepcopy(dense)
            t = time.perf_counter()
            rep = compress(model, remove=budget, method=method, data_aware=mode, activation_stats=stats,
                           svd_cache=svd_cache, damping=damping)
            tc = time.perf_counter() - t
            p = ppls(model, sets, args, bos)
            runs[key] = {
                "method": method, "mode": label, "budget": budget, "perplexity": p["wikitext2"], "ppl": p,
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


# ------------------------------------------------------------------------------------------ fine-tuning
def _ft_text(args: argparse.Namespace) -> Path:
    """The fine-tuning text, as a file for `finetune`: pydoc prose after the part calibration may use, or the
    WikiText-2 test text after the evaluated head and the wikitext2-tail calibration slice (both < 300,000)."""
    if args.ft_data == "pydoc":
        path, text = args.out / "finetune_text.txt", pydoc_text()[CALIB_CHARS:]
    else:
        path, text = args.out / "finetune_wikitext2_tail.txt", _wiki(args).read_text(encoding="utf-8")[300_000:]
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def _finetune(name: str, args: argparse.Namespace, model: str, steps: int, lr: float, extra: list[str],
              evaluate: bool) -> dict[str, Any] | None:
    """One `gradlore finetune` process (its peak memory is its own), resumed if a chunk interrupted it;
    None when the time budget interrupted it again. Perplexities of its final model on both corpora."""
    out = args.out / "runs" / name
    summary = out / "summary.json"
    done = summary.exists() and json.loads(summary.read_text()).get("status") == "completed"
    if not done:
        resume = (out / "checkpoints").exists() and (out / "config.json").exists()
        cmd = [sys.executable, "-m", "gradlore.cli", "finetune", "--model", model, "--data", str(_ft_text(args)),
               "--steps", str(steps), "--batch-size", str(args.ft_batch), "--block-size", str(args.ft_seq),
               "--lr", str(lr), "--out", str(out), *(["--resume"] if resume else ["--overwrite"]),
               "--set", "schedule.warmup_steps=5", "--set", f"train.threads={args.threads}",
               "--set", "train.progress=false", "--set", f"train.eval_every={steps}", "--set", "train.ckpt_every=20",
               "--set", f"train.save_final_model={str(evaluate).lower()}", *extra]
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            stdout, _ = proc.communicate(timeout=max(_left(args), 1))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the trainer checkpoints and exits 130
            stdout, _ = proc.communicate()
            print(f"{name}: interrupted by the time budget (checkpointed); rerun to continue", flush=True)
            return None
        sys.stdout.write(stdout[-1500:])
        if proc.returncode != 0:
            raise SystemExit(f"fine-tune run {name} failed (exit {proc.returncode})")
    s = json.loads(summary.read_text())
    r = {"tokens": s["tokens"], "trainable_params": s["trainable_params"], "total_params": s["params"],
         "optimizer_state_bytes": s["opt_state_bytes"], "grad_bytes": 4 * s["trainable_params"],
         "peak_memory_bytes": s["peak_rss_bytes"], "tokens_per_s": s["tokens_per_s_median"], "steps": s["steps"]}
    losses = [v for _, v in read_losses(out / "metrics.jsonl")[0]]
    r["first_loss"], r["last_loss"] = losses[0], losses[-1]
    if evaluate:
        tok = load_tokenizer(str(out / "final"))
        p = ppls(load_model(out / "final"), eval_sets(args, tok), args, sequence_bos(tok))
        r["perplexity_after"], r["ppl_after"] = p["wikitext2"], p
    return r


def _ft_jobs(args: argparse.Namespace) -> dict[str, tuple[str, str, int, float, list[str]]]:
    """name -> (kind, model, steps, lr, extra CLI args) for --ft-jobs × --ft-budgets × --ft-mults."""
    jobs = {}
    label = variant(args, args.ft_mode)
    tag = ("" if args.ft_data == "pydoc" else f"@ft-{args.ft_data}") + args.ft_tag
    for kind in args.ft_jobs:
        for mult in args.ft_mults:
            steps = args.ft_steps * mult
            if kind == "lrc":
                for b in args.ft_budgets:
                    ckpt = _ckpt_dir(label, b)
                    if not ckpt.exists():
                        raise SystemExit(f"{ckpt} missing: run --phase ppl first (it saves the {b:.0%} WeLore model).")
                    jobs[f"lrc-{args.ft_optimizer}@{label}-{b:.0%}x{mult}{tag}"] = (
                        kind, str(ckpt), steps, args.ft_lr, ["--optimizer", args.ft_optimizer])
            elif kind == "full":
                jobs[f"full-adamw-x{mult}{tag}"] = (kind, "smollm2", steps, args.ft_lr_full,
                                                            ["--optimizer", "adamw", "--full"])
            else:  # LoRA on the dense model (peft), at a rank chosen by --ft-lora-rank
                jobs[f"lora-r{args.ft_lora_rank}-x{mult}{tag}"] = (
                    kind, "smollm2", steps, args.ft_lr_lora,
                    ["--optimizer", "lora", "--rank", str(args.ft_lora_rank), "--full"])
    return jobs


def phase_finetune(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Perplexity after fine-tuning on the same tokens (and on --ft-mults times as many)."""
    ft = results.setdefault("finetune", {})
    for name, (kind, model, steps, lr, extra) in _ft_jobs(args).items():
        if name in ft and not args.redo:
            continue
        if _left(args) < args.min_left:
            print("time budget reached; rerun to continue", flush=True)
            return
        r = _finetune(name, args, model, steps, lr, extra, evaluate=True)
        if r is None:
            return
        budget = next((b for b in args.ft_budgets if f"-{b:.0%}x" in name), None) if kind == "lrc" else None
        ft[name] = r | {"kind": kind, "budget": budget, "mode": variant(args, args.ft_mode) if kind == "lrc" else None,
                        "lr": lr, "model": model, "ft_data": args.ft_data}
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
    for name, (_, model, _, lr, extra) in _ft_jobs(args).items():
        r = _finetune(f"speed-{name}", args, model, args.speed_steps, lr, extra, evaluate=False)
        if r is None:
            return
        ts[name] = r
        _save(args.results, results, "train_speed")
    tok = load_tokenizer(str(smollm2()))
    ids = tokenize(tok, read_text(_wiki(args), max_chars=args.context * 16), args.context)
    sp = results.setdefault("speed", {})
    models = {"dense": "smollm2"}
    label = variant(args, args.ft_mode)
    for budget in args.ft_budgets:
        ck = _ckpt_dir(label, budget)
        if ck.exists():
            models[f"welore-{label}-{budget}"] = str(ck)
    for name, path in models.items():
        model = load_model(path)
        sp[name] = _speed(model, ids, args.speed_repeats, args.new_tokens) | {
            "params": sum(p.numel() for p in model.parameters()), "prompt_tokens": int(ids.numel())}
        print(name, sp[name], flush=True)
        _save(args.results, results, "speed")
        del model
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
    p.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS), help="welore,uniform")
    p.add_argument("--calib", choices=CALIB_SOURCES, default="pydoc", help="calibration text of the data-aware variant")
    p.add_argument("--calib-tokens", type=int, default=16384)
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
