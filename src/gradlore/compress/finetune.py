"""Fine-tune only the low-rank components of a WeLore-compressed model (arXiv 2407.11239, §LRC fine-tuning).

After compression W_i ≈ B_i A_i for the LRCs; WeLore trains only (A_i, B_i) — optionally the norms — and
keeps the N-LRC weights, embeddings and head frozen:

    min_{A,B}  L( {B_i A_i}_{i∈LRC}, {W_j}_{j∉LRC} )      trainable = Σ_{i∈LRC} r_i (m_i + n_i)

so gradients and optimizer moments exist only for the factors. The same compact loop also runs full
fine-tuning of the dense model, which is what the LRC-only run is compared against (trainable parameters,
optimizer state bytes, peak memory, tokens/s). The training driver with schedules, checkpoints etc. is
`gradlore train`; this loop stays small on purpose.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from gradlore.compress.lowrank_linear import LowRankEmbedding, LowRankLinear
from gradlore.errors import UserError


@dataclass
class FinetuneResult:
    mode: str  # "lrc" (factors only) or "full"
    optimizer: str
    steps: int
    tokens: int
    trainable_params: int
    total_params: int
    optimizer_state_bytes: int
    grad_bytes: int
    peak_memory_bytes: int  # CUDA: max allocated; CPU: peak resident set size sampled during training
    tokens_per_s: float  # after the first (warm-up) step
    seconds: float
    first_loss: float
    last_loss: float
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm of any model family (transformers names them *Norm)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("Norm")


def mark_trainable(model: nn.Module, mode: str = "lrc", train_norms: bool = False) -> list[tuple[str, nn.Parameter]]:
    """Set requires_grad: "lrc" = LowRankLinear factors (+ norms), everything else frozen; "full" = all."""
    if mode not in ("lrc", "full"):
        raise UserError(f"unknown fine-tuning mode {mode!r}; use 'lrc' (factors only) or 'full'.")
    if mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        lrcs = [m for m in model.modules() if isinstance(m, (LowRankLinear, LowRankEmbedding))]
        if not lrcs:
            raise UserError(
                "the model has no low-rank components to train: compress it first "
                "(`gradlore compress ... --out DIR`) or fine-tune everything with --full."
            )
        for p in model.parameters():
            p.requires_grad_(False)
        for m in lrcs:
            m.weight_a.requires_grad_(True)  # (r, in)
            m.weight_b.requires_grad_(True)  # (out, r); a tied head shares its embedding's factors
        if train_norms:
            for m in model.modules():
                if is_norm(m):
                    for p in m.parameters(recurse=False):
                        p.requires_grad_(True)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(
    model: nn.Module, method: str = "adamw", lr: float = 1e-4, weight_decay: float = 0.0, rank: int = 128
) -> torch.optim.Optimizer:
    """torch AdamW over the trainable parameters, or gradlore's LowRankAdamW with preset ``method``.

    In a compressed model the projected group holds the 2-D LRC factors whose shorter side exceeds ``rank``
    (projecting a factor that is already thinner than the rank would save nothing).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise UserError("nothing to train: every parameter is frozen.")
    if method == "adamw":
        return torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=weight_decay, foreach=True)
    import gradlore
    from gradlore import presets

    if method not in presets.PRESETS:
        raise UserError(f"unknown optimizer {method!r}; use adamw or one of {', '.join(presets.PRESETS)}.")
    if any(isinstance(m, (LowRankLinear, LowRankEmbedding)) for m in model.modules()):
        proj = [(n, p) for n, p in named if p.dim() == 2 and min(p.shape) > rank and "weight_" in n]
        ids = {id(p) for _, p in proj}
        rest = [p for _, p in named if id(p) not in ids]
        groups = [{"params": rest}] if rest else []
        if proj:
            groups.append({"params": [p for _, p in proj], **presets.PRESETS[method](rank=rank)})
    else:
        groups = gradlore.param_groups(model, method=method, rank=rank)
    return gradlore.LowRankAdamW(groups, lr=lr, weight_decay=weight_decay)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    try:
        from gradlore.optim import state_bytes

        return int(state_bytes(opt))
    except ImportError:  # the optimizer package is optional for this module
        seen, total = set(), 0
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() not in seen:
                    seen.add(v.untyped_storage().data_ptr())
                    total += v.untyped_storage().nbytes()
        return total


class _PeakRSS:
    """Peak resident set size while active, sampled from /proc every 50 ms (CPU runs; a tighter loop slows training through the GIL)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self) -> _PeakRSS:
        self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def token_blocks(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    n = ids.numel() // seq_len
    if n == 0:
        raise UserError(f"training text has {ids.numel()} tokens, fewer than one sequence of {seq_len}; give more text.")
    return ids[: n * seq_len].reshape(n, seq_len)


def finetune(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    steps: int = 100,
    batch_size: int = 4,
    seq_len: int = 256,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    method: str = "adamw",
    rank: int = 128,
    full: bool = False,
    train_norms: bool = False,
    grad_clip: float | None = 1.0,
    warmup: int = 10,
    seed: int = 0,
    log_every: int = 0,
) -> FinetuneResult:
    """Train ``model`` in place on token ids (1-D) for ``steps`` steps; LRC factors only unless ``full``."""
    if steps < 1 or batch_size < 1 or seq_len < 2:
        raise UserError("steps and batch size must be >= 1 and seq_len >= 2.")
    trainable = mark_trainable(model, "full" if full else "lrc", train_norms)
    opt = build_optimizer(model, method, lr, weight_decay, rank)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(warmup, 1)))
    blocks = token_blocks(ids.reshape(-1).long(), seq_len)  # (n, L)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(blocks), generator=gen)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    losses, t_first, t0 = [], 0.0, time.perf_counter()
    model.train()
    with _PeakRSS() as rss:
        for step in range(steps):
            idx = torch.arange(step * batch_size, (step + 1) * batch_size) % len(blocks)
            x = blocks[order[idx]].to(device)  # (B, L)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_([p for _, p in trainable], grad_clip)
            opt.step()
            sched.step()
            grad_bytes = sum(p.grad.numel() * p.grad.element_size() for _, p in trainable if p.grad is not None)
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if step == 0:
                t_first = time.perf_counter()
            if log_every and (step + 1) % log_every == 0:
                print(f"step {step + 1}/{steps} loss {losses[-1]:.4f}", flush=True)
    t_end = time.perf_counter()
    model.eval()
    timed_steps = steps - 1 if steps > 1 else 1
    timed = (t_end - t_first) if steps > 1 else (t_end - t0)
    return FinetuneResult(
        mode="full" if full else "lrc",
        optimizer=method,
        steps=steps,
        tokens=steps * batch_size * seq_len,
        trainable_params=sum(p.numel() for _, p in trainable),
        total_params=sum(p.numel() for p in model.parameters()),
        optimizer_state_bytes=optimizer_state_bytes(opt),
        grad_bytes=grad_bytes,
        peak_memory_bytes=int(torch.cuda.max_memory_allocated(device)) if cuda else int(rss.peak),
        tokens_per_s=timed_steps * batch_size * seq_len / max(timed, 1e-9),
        seconds=t_end - t0,
        first_loss=losses[0],
        last_loss=losses[-1],
        losses=losses,
    )
