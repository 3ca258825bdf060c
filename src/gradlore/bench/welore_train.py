"""Fine-tuning and speed phases of `gradlore bench welore` (arXiv 2407.11239): LRC-only vs full vs LoRA.

Each fine-tune is its own `gradlore finetune` process (its peak RSS is its own), resumed from its checkpoint
when a time-budgeted chunk interrupted it (SIGTERM → the trainer checkpoints). Gap closed =
(ppl_compressed − ppl_ft) / (ppl_compressed − ppl_dense), reported by `welore_report`.
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gradlore.bench.welore_common import (
    CALIB_CHARS,
    _ckpt_dir,
    _left,
    _save,
    _wiki,
    eval_sets,
    ppls,
    pydoc_text,
)
from gradlore.bench.welore_report import variant
from gradlore.compress.eval import read_text, tokenize
from gradlore.data.tokenizer import load_tokenizer, sequence_bos
from gradlore.models import load_model, smollm2
from gradlore.train.rundir import read_losses


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
