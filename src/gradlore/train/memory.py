"""The memory configuration of a run (``--memory low``, or each part on its own) and where its peak goes.

A training process holds, at its peak: the runtime (Python, libraries, tokenized data), the parameters, the
gradients alive at that moment, the optimizer state, and the activations of the step (with the logits of the
loss). Each part of ``memory`` (and ``optim``) removes one of them:

| part | field | what it saves |
|---|---|---|
| loss without the full logits | ``memory.chunked_loss=N`` | the (tokens × vocab) float32 logits, their bf16 copy, softmax and gradient: only N × vocab exist at once (``gradlore.train.loss``) |
| activation checkpointing | ``memory.checkpointing=true`` | each decoder layer keeps only its input; the rest is recomputed in backward (one more forward) |
| pure bf16 weights | ``memory.weights=bf16`` | half the parameter bytes; the optimizer computes in float32 and rounds stochastically (``optim.rounding``) |
| compact optimizer state | ``optim.state``, ``optim.plain_state`` = ``8bit`` / ``factored`` | Adam's 8 B/value → 2 B (8-bit) or ~1 B (factored), embeddings and head included |
| layer-wise updates | ``optim.layerwise=true`` | every gradient is applied and freed as soon as it is complete |
| the allocator | ``memory.release_freed=true`` | glibc keeps freed heap memory; with it, blocks of ≥ 1 MiB are mapped on their own and returned when freed |

``--memory low`` sets all of them (``LEVELS``). ``MemoryReport`` (a hook every run has) samples the resident
set at each module's forward, each completed gradient and each step, and writes the breakdown at the sampled
peak into ``summary.json`` (``memory``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from gradlore.errors import UserError
from gradlore.optim.state import state_bytes_by_kind
from gradlore.train.hooks import Hook

if TYPE_CHECKING:
    from gradlore.train.trainer import Trainer

WEIGHTS = {"fp32": torch.float32, "bf16": torch.bfloat16}
MMAP_THRESHOLD = 1 << 20  # bytes: glibc serves (and returns) blocks this large with their own mmap

# ``--memory LEVEL``: config assignments applied before the command line's flags and --set.
LEVELS: dict[str, list[str]] = {
    "default": [],
    "low": ["memory.chunked_loss=1024", "memory.checkpointing=true", "memory.weights=bf16",
            "memory.release_freed=true", "optim.state=8bit", "optim.plain_state=8bit", "optim.layerwise=true",
            "optim.grad_clip=0"],
}


@dataclass
class MemoryConfig:
    chunked_loss: int = 0            # tokens per chunk of the output head + cross-entropy (0 = the model's own loss)
    checkpointing: bool = False      # recompute each decoder layer's activations in backward
    weights: str = "fp32"            # fp32 | bf16 (pure bf16 weights, float32 optimizer math, optim.rounding)
    release_freed: bool = False      # glibc returns freed memory to the system (mallopt at start)

    def validate(self) -> None:
        if self.chunked_loss < 0:
            raise UserError(f"memory.chunked_loss={self.chunked_loss} must be >= 0 (0 = off). Fix: e.g. 1024.")
        if self.weights not in WEIGHTS:
            raise UserError(f"memory.weights={self.weights!r} must be one of {', '.join(WEIGHTS)}.")


def release_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Make glibc give freed memory back: blocks ≥ threshold get their own mmap (unmapped on free) and the heap
    is trimmed above it. Fixed thresholds also stop glibc from raising them as it sees large frees."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, threshold))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        warnings.warn("gradlore: memory.release_freed needs glibc's mallopt; the allocator is left as it is.",
                      RuntimeWarning, stacklevel=2)
        return False


def prepare_model(model: nn.Module, cfg: MemoryConfig) -> nn.Module:
    """Cast to the weight dtype and turn on activation checkpointing, as ``cfg`` says."""
    dtype = WEIGHTS[cfg.weights]
    if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        model.to(dtype)
    if cfg.checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise UserError(f"{type(model).__name__} does not support activation checkpointing. "
                            "Fix: --set memory.checkpointing=false.")
        kwargs = {"use_reentrant": False}  # non-reentrant: parameters' post-accumulate hooks fire as usual
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


# --------------------------------------------------------------------------------------------- the report
def _page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    """Resident set size now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _page_size()
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


def _bytes(tensors: list[torch.Tensor]) -> int:
    tensors = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]  # FSDP2: this process's pieces
    seen = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors}
    return sum(n for _, n in seen)


class MemoryReport(Hook):
    """Breakdown of the peak: runtime, parameters, gradients alive then, optimizer state by kind, the rest.

    The process's memory (RSS on CPU, allocated memory on CUDA) is sampled at every forward of a module that
    owns parameters, every completed gradient (before and after a layer-wise update frees it) and every step;
    the sample with the most memory is the peak's moment. ``runtime`` is what the process held before the
    first step besides parameters and restored state; ``activations_and_other`` is the rest of the peak (the
    true peak, between samples, included).
    """

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.best: dict[str, Any] | None = None
        self.state: dict[str, dict[str, int]] = {}
        self.step = 0
        self.params: list[torch.Tensor] = []
        self.cuda = False
        self.optimizer: Any = None

    def _now(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else current_rss_bytes()

    def sample(self, where: str) -> None:
        now = self._now()
        if self.best is not None and now <= self.best["bytes"]:
            return
        grads = _bytes([p.grad for p in self.params if p.grad is not None])
        # the state as it is now: a layer-wise optimizer creates its state during the first backward, after the
        # last update of self.state (a new peak is rare after the first steps, so this costs little)
        state = self.state if self.optimizer is None else state_bytes_by_kind(self.optimizer)
        self.best = {"bytes": now, "step": self.step, "at": where, "gradients": grads, "state": state}

    def _grad_hooks(self, when: str) -> None:
        for p in self.params:
            self.handles.append(p.register_post_accumulate_grad_hook(lambda p, w=when: self.sample(w)))

    def on_model(self, trainer: Trainer) -> None:
        model = trainer.model
        self.cuda = next(model.parameters()).device.type == "cuda"
        self.params = [p for p in model.parameters() if p.requires_grad]
        for module in model.modules():
            if next(module.parameters(recurse=False), None) is not None:
                self.handles.append(module.register_forward_hook(lambda *_: self.sample("forward")))
        self._grad_hooks("backward (gradient complete)")  # before the optimizer's own hooks

    def on_start(self, trainer: Trainer) -> None:
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        if len(params) != len(self.params) or any(a is not b for a, b in zip(params, self.params)):
            self.params = params  # parallel: the wrapper (FSDP2) replaced the parameters; drop the old ones
            self._grad_hooks("backward (gradient complete)")
        self._grad_hooks("backward (after a layer-wise update)")
        self.optimizer = trainer.optimizer
        self.state = state_bytes_by_kind(trainer.optimizer)
        restored = sum(sum(v.values()) for v in self.state.values())
        self.param_bytes = _bytes(list(trainer.model.parameters()))
        self.n_params = sum(p.numel() for p in trainer.model.parameters())
        self.runtime = self._now() - (0 if self.cuda else self.param_bytes + restored)
        self.step = trainer.step

    def after_step(self, trainer: Trainer, step: int) -> None:
        self.sample("end of step")
        self.state = state_bytes_by_kind(trainer.optimizer)
        self.step = step + 1

    def on_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.optimizer = None
        if self.best is None:
            return
        peak = torch.cuda.max_memory_allocated() if self.cuda else summary["peak_rss_bytes"]
        state = self.best["state"]
        state_total = sum(sum(v.values()) for v in state.values())
        grads = self.best["gradients"]
        params = self.param_bytes
        runtime = 0 if self.cuda else self.runtime
        summary["memory"] = {
            "measure": "CUDA allocated" if self.cuda else "process RSS",
            "peak_bytes": peak,
            "sampled_peak_bytes": self.best["bytes"],
            "peak_step": self.best["step"] + 1,
            "peak_at": self.best["at"],
            "breakdown_bytes": {"runtime": runtime, "parameters": params, "gradients": grads,
                                "optimizer_state": state_total,
                                "activations_and_other": peak - runtime - params - grads - state_total},
            "optimizer_state_bytes": state,
            "model_state_bytes_per_param": (params + grads + state_total) / max(self.n_params, 1),
            "config": dict(vars(trainer.cfg.memory)),
        }
