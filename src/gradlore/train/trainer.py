"""The one training loop: pretraining, fine-tuning (dense or the low-rank parts of a compressed model) and
gradient analysis are configurations and hooks of it.

Objective (next-token prediction on packed blocks x of T tokens, batch B, accumulation A):

    L(θ) = -1/(A·B·(T-1)) Σ_a Σ_b Σ_{t<T} log p_θ(x_{a,b,t+1} | x_{a,b,≤t})

one optimizer step per A micro-batches, LR from :mod:`gradlore.train.schedule`, optional clipping of the
global gradient norm, optional bf16 autocast. Validation loss (and perplexity e^L) on held-out blocks every
``eval_every`` steps and at the end. The whole run state (model, optimizer, scheduler, RNG, data position,
counters) is checkpointed atomically every ``ckpt_every`` steps, at the end and on SIGINT/SIGTERM, so a
resumed run replays the uninterrupted one bit for bit on CPU.

A non-finite loss or gradient norm skips the update (counted and logged); ``max_bad_steps`` in a row stop
the run without writing a checkpoint, so the last good one stays the newest. In layer-wise mode a non-finite
gradient is never applied (``gradlore.optim.layerwise``) and the step is counted the same way.

Memory (``gradlore.train.memory``): the loss function is chosen once (the model's own, or the chunked head +
cross-entropy), the model is prepared once (bf16 weights, activation checkpointing), the allocator is set at
start, and ``MemoryReport`` writes where the peak went into ``summary.json``.

Under torchrun (``train.parallel`` ddp | fsdp2) every process runs this loop; what differs lives in
:mod:`gradlore.train.distributed` behind ``self.par`` (the identity in one process): lines marked ``# parallel``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradlore.compress.lowrank_linear import is_factored, mark_trainable
from gradlore.compress.welore import save_compressed
from gradlore.data.blocks import prepare_data
from gradlore.errors import UserError
from gradlore.models import build_llama, load_model, resolve_model_path, vocab_size
from gradlore.optim.build import PEERS, build_optimizer
from gradlore.optim.state import state_bytes
from gradlore.train.checkpoint import (
    checkpoint_dir,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gradlore.train.config import RunConfig, load_run_config, resume_changes
from gradlore.train.dist_checkpoint import check_format, load_distributed, save_distributed
from gradlore.train.distributed import Parallel, SilentLog, setup_parallel
from gradlore.train.hooks import GradientRankHook, Hook
from gradlore.train.lora import LoraHook
from gradlore.train.loss import chunked_lm_loss
from gradlore.train.memory import WEIGHTS, MemoryReport, prepare_model, release_freed_memory
from gradlore.train.rundir import (
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    MetricsLog,
    check_run_dir,
    peak_rss_bytes,
    plot_losses,
    read_losses,
    reset_run_dir,
    truncate_log,
)
from gradlore.train.schedule import WarmupCosine, warmup_cosine


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def device_of(name: str) -> torch.device:
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
             device: torch.device, autocast: Any, loss_fn: Any = None) -> float:
    """Mean validation loss over up to ``max_batches`` micro-batches of held-out blocks (all if 0)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = val.shape[0] if max_batches == 0 else min(val.shape[0], max_batches * batch_size)
    for start in range(0, n, batch_size):
        batch = val[start:min(start + batch_size, n)].to(device)  # (b, T)
        with autocast():
            loss = (loss_fn or forward_loss)(model, batch)
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


class Trainer:
    """One run of ``cfg`` in the folder ``out``: built (and restored, with ``resume``) on construction,
    trained by ``fit()``. Every input error surfaces before anything is written."""

    def __init__(self, cfg: RunConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False,
                 hooks: list[Hook] | tuple[Hook, ...] = ()) -> None:
        self.cfg, self.out = cfg.validate(), Path(out)
        self.hooks = [*([LoraHook()] if cfg.optim.name == "lora" else []), *hooks,  # lora: adapters on the model
                      MemoryReport(), *([GradientRankHook()] if cfg.analysis.every else [])]
        check_run_dir(self.out, resume, overwrite)
        self.par: Parallel = setup_parallel(cfg)  # parallel: torchrun's process group (identity otherwise)
        self.par.barrier()  # parallel: every rank has looked at the folder before rank 0 writes into it
        changes = self._check_resume() if resume else {}
        t = cfg.train
        if cfg.memory.release_freed:
            release_freed_memory()  # before the big allocations
        self.device = self.par.device or device_of(t.device)  # parallel: cuda:LOCAL_RANK or cpu
        seed_everything(t.seed)
        data_cfg = cfg.data
        if cfg.model.init and data_cfg.tokenizer == "bpe":  # fine-tuning: the pretrained model's own tokenizer
            data_cfg = dataclasses.replace(data_cfg, tokenizer=str(resolve_model_path(cfg.model.init)))  # alias ok
        with self.par.main_first():  # parallel: rank 0 fills the tokenizer and token caches first
            self.data = prepare_data(data_cfg, t.batch_size, t.seed)
        self.data.train = self.par.share(self.data.train)  # parallel: this rank's rows of every batch
        self.model = prepare_model(self._build_model(), cfg.memory)
        chunk = cfg.memory.chunked_loss
        self.loss_fn = functools.partial(chunked_lm_loss, chunk=chunk) if chunk else forward_loss
        self._call("on_model")
        self.model = self.par.wrap(self.model, cfg.optim)  # parallel: DDP, or FSDP2 with long-side shards
        self.optimizer = build_optimizer(self.par.unwrap(self.model), cfg.optim)
        self.par.attach(self.optimizer)  # parallel: the optimizer's process group
        self.scheduler = warmup_cosine(self.optimizer, cfg.warmup, t.steps, cfg.schedule.min_lr_ratio)
        self.step, self.counters = 0, {"tokens": 0, "skipped": 0, "bad_in_row": 0, "train_seconds": 0.0}
        if resume:
            self._restore(changes)
        elif self.par.main:
            reset_run_dir(self.out, overwrite)
        if self.par.main:  # parallel: rank 0 owns the run folder
            (self.out / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            (self.out / "data.json").write_text(json.dumps(self.data.info, indent=2) + "\n")
            self.data.tokenizer.save(self.out / "tokenizer")
        self.par.barrier()
        self.log = MetricsLog(self.out, purge_step=self.step + 1 if resume else None) if self.par.main else SilentLog()
        if changes:
            self.log.write({"kind": "resume", "step": self.step, "changed": {k: list(v) for k, v in changes.items()}},
                           "resume")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if t.bf16 else nullcontext
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.last_val, self.last_eval_step = float("nan"), -1
        if resume:  # the last validation before the checkpoint, in case no step is left to run
            for val_step, v in read_losses(self.out / METRICS_FILE)[1][-1:]:
                self.last_val, self.last_eval_step = v, val_step
        self.rates: list[float] = []

    # ------------------------------------------------------------------------------------------- building
    def _check_resume(self) -> dict[str, tuple[Any, Any]]:
        if self.cfg.optim.name in PEERS:
            raise UserError(f"{self.cfg.optim.name} keeps Python objects in its state and cannot be resumed. "
                            "Fix: --overwrite to restart it, or use a gradlore optimizer.")
        self.saved_cfg = load_run_config(self.out / CONFIG_FILE)
        return resume_changes(self.saved_cfg, self.cfg)

    def _build_model(self) -> torch.nn.Module:
        cfg = self.cfg
        if cfg.model.init:
            model = load_model(cfg.model.init)
            model.config.use_cache = False
            if self.data.tokenizer.vocab_size > vocab_size(model):
                raise UserError(f"the tokenizer has {self.data.tokenizer.vocab_size} tokens but the model at "
                                f"{cfg.model.init} embeds {vocab_size(model)}. Fix: use the model's own tokenizer.")
        else:
            seed_everything(cfg.train.seed)  # the model's initial weights depend on the seed only
            model = build_llama(cfg.model.size, self.data.tokenizer.vocab_size, cfg.data.block_size,
                                dtype=WEIGHTS[cfg.memory.weights])  # built in its dtype: no float32 copy
        mark_trainable(model, cfg.model.trainable)
        return model.to(self.device).train()

    def _restore(self, changes: dict[str, tuple[Any, Any]]) -> None:
        """Load the checkpoint, then apply what the resumed config changed (LR, schedule, weight decay)."""
        check_format(self.out, self.par.distributed, self.par.mode)
        if self.par.distributed:  # parallel: model and optimizer loaded in place, resharded if need be
            payload = load_distributed(self)
        else:
            payload = load_checkpoint(self.out)[0]
            self.model.load_state_dict(payload["model"])
            self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.data.train.load_state_dict(payload["data"])
        set_rng_state(payload["rng"])
        self.step, self.counters = int(payload["step"]), dict(payload["counters"])
        cfg, sched = self.cfg, self.scheduler
        sched.lr_lambdas = [WarmupCosine(cfg.warmup, cfg.train.steps, cfg.schedule.min_lr_ratio) for _ in sched.lr_lambdas]
        if "optim.lr" in changes:
            ratio = cfg.optim.lr / changes["optim.lr"][0]
            sched.base_lrs = [b * ratio for b in sched.base_lrs]
        for group, base, fn in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["initial_lr"], group["lr"] = base, base * fn(sched.last_epoch)  # the LR of the next step, now
            if "optim.weight_decay" in changes and group["weight_decay"] == changes["optim.weight_decay"][0]:
                group["weight_decay"] = cfg.optim.weight_decay
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if not self.par.main:
            return
        truncate_log(self.out / METRICS_FILE, self.step)
        print(f"gradlore train: resumed {self.out} at step {self.step}"
              + (f"; changed: {', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in changes.items())}" if changes else ""),
              file=sys.stderr)

    def _call(self, name: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, name)(self, *args)

    # ------------------------------------------------------------------------------------------- the loop
    def checkpoint(self) -> Path:
        if self.par.distributed:  # parallel: every rank writes its shards (torch.distributed.checkpoint)
            return save_distributed(self)
        return save_checkpoint(self.out, {
            "step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": rng_state(), "data": self.data.train.state_dict(),
            "counters": dict(self.counters), "config": self.cfg.to_dict(),
        })

    def run_eval(self) -> float:
        t = self.cfg.train
        model = self.par.unwrap(self.model)  # parallel: every rank evaluates the same blocks
        val = evaluate(model, self.data.val, t.batch_size, t.eval_batches, self.device, self.autocast, self.loss_fn)
        self.log.write({"kind": "eval", "step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))},
                       "val")
        self.last_val, self.last_eval_step = val, self.step
        self._call("on_eval", self.step, val)
        return val

    def train_step(self) -> tuple[float, float, bool]:
        """One optimizer step over ``grad_accum`` micro-batches: (summed loss, grad norm, finite)."""
        t, layerwise = self.cfg.train, self.cfg.optim.layerwise
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, finite = 0.0, True
        for micro in range(t.grad_accum):
            batch = self.data.train.next_batch().to(self.device)  # (B, T)
            if not finite:
                continue  # keep consuming the step's batches so the data order stays aligned
            final = micro == t.grad_accum - 1
            if layerwise:
                self.optimizer.accumulate = not final
            with self.autocast():
                loss = self.loss_fn(self.model, batch) / t.grad_accum
            if not self.par.all_finite(loss):  # parallel: all ranks skip together
                finite = False
                continue
            self._call("before_backward", self.step, final)
            with self.par.no_sync(self.model, final):  # parallel: reduce gradients on the last micro-batch
                loss.backward()
            loss_sum += float(loss.detach())
        grad_norm = float("nan")
        if finite and layerwise:  # applied inside backward, up to a non-finite gradient (never applied)
            grad_norm = self.optimizer.grad_norm()
            finite = math.isfinite(grad_norm)
        elif finite:
            self._call("before_update", self.step)
            grad_norm = self.par.clip_grad_norm(self.params, self.cfg.optim.grad_clip)  # parallel: global norm
            finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return self.par.mean(loss_sum), grad_norm, finite  # parallel: the loss of the global batch

    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps`` (or a signal, or divergence); returns the summary written to summary.json."""
        from tqdm.auto import tqdm  # imported with the loop: the CLI's other commands never need it

        t, out, counters = self.cfg.train, self.out, self.counters
        tokens_per_step = t.batch_size * t.grad_accum * self.cfg.data.block_size
        status = "completed"
        self._call("on_start")
        bar = tqdm(total=t.steps, initial=self.step, disable=not t.progress or not self.par.main, unit="step",
                   dynamic_ncols=True)
        with _Signals() as signals:
            try:
                while self.step < t.steps:
                    tick = time.perf_counter()
                    lr = self.scheduler.get_last_lr()[0]
                    loss_sum, grad_norm, finite = self.train_step()
                    self.step += 1
                    if finite:
                        counters["bad_in_row"] = 0
                    else:
                        counters["skipped"] += 1
                        counters["bad_in_row"] += 1
                        self.log.write({"kind": "skip", "step": self.step, "reason": "non-finite loss or gradient",
                                        "skipped_total": counters["skipped"]}, "train")
                        if self.par.main:
                            print(f"gradlore train: warning: step {self.step}: non-finite loss/gradient, update "
                                  f"skipped ({counters['bad_in_row']} in a row)", file=sys.stderr)
                    self.scheduler.step()
                    counters["tokens"] += tokens_per_step
                    elapsed = time.perf_counter() - tick
                    counters["train_seconds"] += elapsed
                    self.rates.append(tokens_per_step / max(elapsed, 1e-9))
                    self._call("after_step", self.step - 1)
                    if counters["bad_in_row"] >= t.max_bad_steps:
                        status = "diverged"
                        print(f"gradlore train: error: {t.max_bad_steps} non-finite steps in a row; stopping. The "
                              f"last good checkpoint is {checkpoint_dir(out) / 'checkpoint.pt'}.", file=sys.stderr)
                        break
                    if finite and (self.step % t.log_every == 0 or self.step == t.steps):
                        self.log.write({"kind": "train", "step": self.step, "loss": loss_sum, "lr": lr,
                                        "grad_norm": grad_norm, "tokens": counters["tokens"],
                                        "tokens_per_s": self.rates[-1], "opt_state_bytes": state_bytes(self.optimizer),
                                        "peak_rss_bytes": peak_rss_bytes(),
                                        **({"peak_cuda_bytes": torch.cuda.max_memory_allocated()}
                                           if self.device.type == "cuda" else {})}, "train")
                        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{self.rates[-1]:.0f}", refresh=False)
                    bar.update(1)
                    if self.step % t.eval_every == 0 or self.step == t.steps:
                        self.run_eval()
                    if self.par.any(signals.received is not None):  # parallel: all ranks stop together
                        status = "interrupted"
                        self.checkpoint()
                        break
                    # No periodic checkpoint in the middle of a non-finite streak: the newest stays a good step.
                    if (self.step % t.ckpt_every == 0 or self.step == t.steps) and counters["bad_in_row"] == 0:
                        self.checkpoint()
            finally:
                bar.close()
                self.log.close()
        if status == "interrupted" and self.par.main:
            name = signal.Signals(signals.received or signal.SIGTERM).name  # parallel: another rank's signal
            print(f"gradlore train: {name} at step {self.step}: checkpoint saved; "
                  f"continue with gradlore train --out {out} --resume", file=sys.stderr)
        return self._finish(status)

    def _finish(self, status: str) -> dict[str, Any]:
        out, t, counters = self.out, self.cfg.train, self.counters
        final_dir = out / "final"
        if status == "completed" and t.save_final_model:
            if not t.progress:
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
            if self.par.distributed:  # parallel: gathered (FSDP2) and written by rank 0
                self.par.save_model(self.model, final_dir)
            elif is_factored(self.model):
                save_compressed(self.model, final_dir, overwrite=True)
            else:
                self.model.save_pretrained(str(final_dir))
            if self.par.main:
                self.data.tokenizer.save(final_dir)
        last_val = self.last_val
        summary = {
            "status": status, "steps": self.step, "tokens": counters["tokens"],
            "skipped_steps": counters["skipped"], "final_val_loss": last_val,
            "final_val_ppl": math.exp(min(last_val, 50.0)) if math.isfinite(last_val) else float("nan"),
            "val_step": self.last_eval_step, "train_seconds": counters["train_seconds"],
            "tokens_per_s": counters["tokens"] / max(counters["train_seconds"], 1e-9),
            "tokens_per_s_median": float(np.median(self.rates)) if self.rates else float("nan"),
            "opt_state_bytes": state_bytes(self.optimizer), "peak_rss_bytes": peak_rss_bytes(),
            "params": sum(p.numel() for p in self.model.parameters()),
            "trainable_params": sum(p.numel() for p in self.params), "optimizer": self.cfg.optim.name,
            "model": self.cfg.model.init or self.cfg.model.size, "device": str(self.device),
            "rank": self.par.rank,
            "paths": {"run": str(out), "plot": str(plot_losses(out)) if self.par.main else None,
                      "metrics": str(out / METRICS_FILE),
                      "checkpoint": str(checkpoint_dir(out) / ("dcp" if self.par.distributed else "checkpoint.pt")),
                      "model": str(final_dir) if final_dir.exists() else None,
                      "tensorboard": str(out / "tensorboard"), "config": str(out / CONFIG_FILE)},
        }
        self._call("on_end", summary)
        if self.par.main:
            (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def run(cfg: RunConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
        hooks: list[Hook] | tuple[Hook, ...] = ()) -> dict[str, Any]:
    """Train as ``cfg`` says into the run directory ``out``; returns the final summary."""
    threads = torch.get_num_threads()
    trainer = None
    try:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        trainer = Trainer(cfg, out, resume=resume, overwrite=overwrite, hooks=hooks)
        return trainer.fit()
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests, the benchmark) get their setting back
        if trainer is not None:
            trainer.par.close()  # parallel: the process group this run created
