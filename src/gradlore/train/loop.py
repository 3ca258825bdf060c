"""The training loop: causal-LM pretraining / fine-tuning with any gradlore optimizer, resumably.

Objective (next-token prediction on packed blocks x of T tokens, batch B, accumulation A):

    L(θ) = -1/(A·B·(T-1)) Σ_a Σ_b Σ_{t<T} log p_θ(x_{a,b,t+1} | x_{a,b,≤t})

one optimizer step per A micro-batches, LR from :mod:`gradlore.train.schedule`, optional clipping of
the global gradient norm, optional bf16 autocast. Validation loss (and perplexity e^L) on held-out blocks
every ``eval_every`` steps and at the end. The whole run state (model, optimizer, scheduler, RNG, data
position, counters) is checkpointed atomically every ``ckpt_every`` steps, at the end and on
SIGINT/SIGTERM, so a resumed run replays the uninterrupted one bit for bit on CPU.

A non-finite loss or gradient norm skips the update (counted and logged); ``max_bad_steps`` in a row
stop the run without writing a checkpoint, so the last good one stays the newest.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradlore.data.blocks import DataSpec, prepare_data
from gradlore.errors import UserError
from gradlore.train.checkpoint import (
    checkpoint_dir,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gradlore.train.config import RunConfig
from gradlore.train.models import build_model, load_pretrained, model_vocab_size
from gradlore.train.optimizers import PEERS, build_optimizer, state_bytes
from gradlore.train.schedule import warmup_cosine

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "loss.png"


# ------------------------------------------------------------------------------------------ run directory
def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run directory; nothing is written here."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other. Fix: pass one of them.")
    exists = out.exists() and any(out.iterdir()) if out.is_dir() else out.exists()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file. Fix: choose a folder path.")
    if resume:
        if not (out / CONFIG_FILE).exists():
            raise UserError(f"--resume: {out} is not a gradlore run directory (no {CONFIG_FILE}). "
                            "Fix: pass the --out of the run to resume.")
        return
    if exists and not overwrite:
        raise UserError(f"run directory {out} already exists. Fix: --resume to continue it, --overwrite to "
                        "replace it, or --out NEW_DIR.")
    if exists and overwrite and not (out / CONFIG_FILE).exists():
        raise UserError(f"--overwrite: {out} is not empty and is not a gradlore run directory; refusing to "
                        "delete it. Fix: choose another --out.")


def _reset_run_dir(out: Path, overwrite: bool) -> None:
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines a killed run wrote after its last checkpoint, so the resumed log has no duplicates."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if record.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but CUDA is not available. Fix: --set train.device=cpu.")
    return torch.device(name)


def forward_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``batch`` (B, T); transformers shifts the labels inside."""
    return model(input_ids=batch, labels=batch).loss


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: torch.Tensor, batch_size: int, max_batches: int,
             device: torch.device, autocast: Any) -> float:
    """Mean validation loss over up to ``max_batches`` micro-batches of held-out blocks (all if 0)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = val.shape[0] if max_batches == 0 else min(val.shape[0], max_batches * batch_size)
    for start in range(0, n, batch_size):
        batch = val[start:min(start + batch_size, n)].to(device)  # (b, T)
        with autocast():
            loss = forward_loss(model, batch)
        total += float(loss) * batch.shape[0]
        count += batch.shape[0]
    model.train(was_training)
    return total / max(count, 1)


class _Signals:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (then checkpoints and stops)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class MetricsLog:
    """metrics.jsonl (one JSON object per line, flushed) + TensorBoard scalars."""

    def __init__(self, out: Path, purge_step: int | None) -> None:
        self.file = open(out / METRICS_FILE, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)
        except ImportError:  # tensorboard is a declared dependency; keep training if it is broken
            self.tb = None

    def write(self, record: dict[str, Any], prefix: str) -> None:
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def plot_losses(out: Path) -> Path:
    """loss.png: training loss (raw and smoothed) and validation loss against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_losses(out / METRICS_FILE)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        steps, losses = zip(*train, strict=False)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
        ax.plot(steps, ema(list(losses)), color="tab:blue", lw=1.5, label="train (EMA 0.9)")
    if val:
        vs, vl = zip(*val, strict=False)
        ax.plot(vs, vl, "o-", color="tab:red", lw=1.5, ms=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(out.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / PLOT_FILE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ema(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (Adam's debiasing), so the curve starts on the data."""
    out, acc = [], 0.0
    for k, v in enumerate(values, 1):
        acc = beta * acc + (1 - beta) * v
        out.append(acc / (1 - beta**k))
    return out


def read_losses(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, validation loss) pairs from a metrics.jsonl."""
    train, val = [], []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train":
            train.append((r["step"], r["loss"]))
        elif r.get("kind") == "eval":
            val.append((r["step"], r["val_loss"]))
    return train, val


# ------------------------------------------------------------------------------------------------- run
def run(cfg: RunConfig, out: Path, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train as ``cfg`` says into the run directory ``out``; returns the final summary."""
    threads = torch.get_num_threads()
    try:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        return _run(cfg, Path(out), resume, overwrite)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests, the benchmark) get their setting back


def _run(cfg: RunConfig, out: Path, resume: bool, overwrite: bool) -> dict[str, Any]:
    check_run_dir(out, resume, overwrite)
    if resume and cfg.optim.name in PEERS:
        raise UserError(f"{cfg.optim.name} keeps Python objects in its state and cannot be resumed. "
                        "Fix: --overwrite to restart it, or use a gradlore optimizer.")
    t = cfg.train
    device = _device(t.device)
    seed_everything(t.seed)

    # Data first: every input error surfaces before anything is written.
    spec = DataSpec(**{k: v for k, v in vars(cfg.data).items()})
    if cfg.model.init and spec.tokenizer == "bpe":
        spec.tokenizer = cfg.model.init  # fine-tuning: the pretrained model's own tokenizer
    data = prepare_data(spec, t.batch_size, t.seed)
    if cfg.model.init:
        model = load_pretrained(cfg.model.init)
        if data.tokenizer.vocab_size > model_vocab_size(model):
            raise UserError(f"tokenizer has {data.tokenizer.vocab_size} tokens but the model at "
                            f"{cfg.model.init} embeds {model_vocab_size(model)}. Fix: use the model's tokenizer.")
    else:
        seed_everything(t.seed)  # the model's initial weights depend on the seed only
        model = build_model(cfg.model.size, data.tokenizer.vocab_size, spec.block_size)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = warmup_cosine(optimizer, cfg.warmup, t.steps, cfg.schedule.min_lr_ratio)

    # Restore, or start a fresh run directory.
    start, counters = 0, {"tokens": 0, "skipped": 0, "bad_in_row": 0, "train_seconds": 0.0}
    if resume:
        payload, ckpt_path = load_checkpoint(out)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        data.train.load_state_dict(payload["data"])
        set_rng_state(payload["rng"])
        start, counters = int(payload["step"]), dict(payload["counters"])
        # The config is the truth for the schedule (e.g. --resume --steps N extends the cosine).
        for fn in scheduler.lr_lambdas:
            fn.__init__(cfg.warmup, t.steps, cfg.schedule.min_lr_ratio)
        _truncate_metrics(out / METRICS_FILE, start)
        print(f"gradlore train: resumed {out} from {ckpt_path} at step {start}", file=sys.stderr)
    else:
        _reset_run_dir(out, overwrite)
    (out / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    (out / "data.json").write_text(json.dumps(data.info, indent=2) + "\n")
    data.tokenizer.save(out / "tokenizer")

    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if t.bf16 else nullcontext
    params = [p for p in model.parameters() if p.requires_grad]
    log = MetricsLog(out, purge_step=start + 1 if resume else None)
    tokens_per_step = t.batch_size * t.grad_accum * spec.block_size
    status, last_val, last_eval_step = "completed", float("nan"), -1
    if resume:  # the last validation before the checkpoint, in case no step is left to run
        for val_step, v in read_losses(out / METRICS_FILE)[1][-1:]:
            last_val, last_eval_step = v, val_step
    rates: list[float] = []

    def checkpoint(step: int) -> Path:
        return save_checkpoint(out, {
            "step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng_state(), "data": data.train.state_dict(),
            "counters": dict(counters), "config": cfg.to_dict(),
        })

    def run_eval(step: int) -> float:
        val = evaluate(model, data.val, t.batch_size, t.eval_batches, device, autocast)
        log.write({"kind": "eval", "step": step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))}, "val")
        return val

    from tqdm.auto import tqdm

    bar = tqdm(total=t.steps, initial=start, disable=not t.progress, unit="step", dynamic_ncols=True)
    step = start
    with _Signals() as signals:
        try:
            while step < t.steps:
                tick = time.perf_counter()
                lr = scheduler.get_last_lr()[0]
                optimizer.zero_grad(set_to_none=True)
                loss_sum, finite = 0.0, True
                for micro in range(t.grad_accum):
                    batch = data.train.next_batch().to(device)  # (B, T)
                    if not finite:
                        continue  # keep consuming the step's batches so the data order stays aligned
                    if cfg.optim.layerwise:
                        optimizer.accumulate = micro < t.grad_accum - 1
                    with autocast():
                        loss = forward_loss(model, batch) / t.grad_accum
                    if not torch.isfinite(loss):
                        finite = False
                        continue
                    loss.backward()
                    loss_sum += float(loss.detach())
                grad_norm = float("nan")
                if finite and not cfg.optim.layerwise:
                    max_norm = t_clip if (t_clip := cfg.optim.grad_clip) > 0 else float("inf")
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
                    finite = math.isfinite(grad_norm)
                step += 1
                if finite:
                    optimizer.step()
                    counters["bad_in_row"] = 0
                else:
                    optimizer.zero_grad(set_to_none=True)
                    counters["skipped"] += 1
                    counters["bad_in_row"] += 1
                    log.write({"kind": "skip", "step": step, "reason": "non-finite loss or gradient",
                               "skipped_total": counters["skipped"]}, "train")
                    print(f"gradlore train: warning: step {step}: non-finite loss/gradient, update skipped "
                          f"({counters['bad_in_row']} in a row)", file=sys.stderr)
                scheduler.step()
                counters["tokens"] += tokens_per_step
                elapsed = time.perf_counter() - tick
                counters["train_seconds"] += elapsed
                rates.append(tokens_per_step / max(elapsed, 1e-9))
                if counters["bad_in_row"] >= t.max_bad_steps:
                    status = "diverged"
                    print(f"gradlore train: error: {t.max_bad_steps} non-finite steps in a row; stopping. "
                          f"The last good checkpoint is {checkpoint_dir(out) / 'checkpoint.pt'}.", file=sys.stderr)
                    break
                if finite and (step % t.log_every == 0 or step == t.steps):
                    log.write({"kind": "train", "step": step, "loss": loss_sum, "lr": lr,
                               "grad_norm": grad_norm, "tokens": counters["tokens"],
                               "tokens_per_s": rates[-1], "opt_state_bytes": state_bytes(optimizer),
                               "peak_rss_bytes": peak_rss_bytes(),
                               **({"peak_cuda_bytes": torch.cuda.max_memory_allocated()}
                                  if device.type == "cuda" else {})}, "train")
                    bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{rates[-1]:.0f}", refresh=False)
                bar.update(1)
                if step % t.eval_every == 0 or step == t.steps:
                    last_val, last_eval_step = run_eval(step), step
                if signals.received is not None:
                    status = "interrupted"
                    checkpoint(step)
                    break
                # No periodic checkpoint in the middle of a non-finite streak: the newest stays a good step.
                if (step % t.ckpt_every == 0 or step == t.steps) and counters["bad_in_row"] == 0:
                    checkpoint(step)
        finally:
            bar.close()
            log.close()

    if status == "interrupted":
        name = signal.Signals(signals.received).name
        print(f"gradlore train: {name} at step {step}: checkpoint saved; continue with "
              f"gradlore train --out {out} --resume", file=sys.stderr)
    final_dir = out / "final"
    if status == "completed" and t.save_final_model:
        if not t.progress:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        model.save_pretrained(str(final_dir))
        data.tokenizer.save(final_dir)
    plot = plot_losses(out)
    summary = {
        "status": status, "steps": step, "tokens": counters["tokens"],
        "skipped_steps": counters["skipped"], "final_val_loss": last_val,
        "final_val_ppl": math.exp(min(last_val, 50.0)) if math.isfinite(last_val) else float("nan"),
        "val_step": last_eval_step, "train_seconds": counters["train_seconds"],
        "tokens_per_s": counters["tokens"] / max(counters["train_seconds"], 1e-9),
        "tokens_per_s_median": float(np.median(rates)) if rates else float("nan"),
        "opt_state_bytes": state_bytes(optimizer), "peak_rss_bytes": peak_rss_bytes(),
        "params": sum(p.numel() for p in model.parameters()), "optimizer": cfg.optim.name,
        "model": cfg.model.init or cfg.model.size, "device": str(device),
        "paths": {"run": str(out), "plot": str(plot), "metrics": str(out / METRICS_FILE),
                  "checkpoint": str(checkpoint_dir(out) / "checkpoint.pt"),
                  "model": str(final_dir) if final_dir.exists() else None,
                  "tensorboard": str(out / "tensorboard"), "config": str(out / CONFIG_FILE)},
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary
