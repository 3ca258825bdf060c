"""State formats: how a tensor's Adam moments are stored between steps (a part, ``state``, of every group).

Every format runs the same AdamW (torch.optim.AdamW's math: decoupled weight decay before the update,
ε after bias correction) in float32 or wider; they differ in what they keep:

- ``fp32``: m and v as tensors of the working dtype (float32; float64 for float64 weights): 8 B/value.
  Wide weights go through torch's fused AdamW kernel in one call per group, as before.
- ``8bit``: m and v blockwise 8-bit (``gradlore.quant``; arXiv 2110.02861): per block of
  ``quant_block`` values one uint8 code each plus one float32 absmax: 2 B/value + 8/B. A step dequantizes a
  chunk of both moments to float32, runs the fused kernel on it, and quantizes them back.
- ``factored``: m blockwise 8-bit and, for a 2-D tensor (rows, cols), Adafactor's factored second moment
  (Shazeer & Stern, arXiv 1804.04235): row and column means of G² with the same β₂,
      r ← β₂ r + (1-β₂) mean_j(G²+ε₁),  c ← β₂ c + (1-β₂) mean_i(G²+ε₁),  V̂_ij = r_i c_j / mean(r),
  then Adam's update m̂/(√(V̂/(1-β₂ᵗ)) + ε): 1 B/value + 4(rows+cols) bytes. 1-D tensors fall back to ``8bit``.

Tensors with fewer than ``quant_min_size`` values keep ``fp32`` moments in every format (as bitsandbytes
does: their state is negligible and quantizing them buys nothing).

State keys (tensors only): ``step``; ``exp_avg``, ``exp_avg_sq`` (fp32); ``exp_avg.codes``, ``exp_avg.absmax``,
``exp_avg_sq.codes``, ``exp_avg_sq.absmax`` (8bit); ``exp_avg_sq.row``, ``exp_avg_sq.col`` (factored). Zeroing
every ``exp_avg*`` tensor and ``step`` resets any format (the ``reset`` moment policy relies on it).

``adamw_`` drives a format over one tensor in chunks of about 2^20 values, so the float32 temporaries of
quantized moments or of a low-precision weight stay small; a weight narrower than float32 is updated through a
float32 working copy of each chunk, written back with ``gradlore.optim.rounding``. ``found_inf`` (a device
tensor, 1.0 to skip) leaves the weight and every moment untouched without a host sync, as torch's kernel does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gradlore.optim.adam import adamw_update_
from gradlore.optim.rounding import generator_for, is_wide, work_dtype, write_
from gradlore.quant import code_book, dequantize_blockwise, num_blocks, quantize_blockwise

CHUNK = 1 << 20  # values per chunk of the chunked update


@dataclass(frozen=True)
class Hyper:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    fused: bool | None = None


def _kernel_(w: Tensor, g: Tensor, m: Tensor, v: Tensor, step: Tensor, hp: Hyper, found_inf: Tensor | None) -> None:
    """torch's AdamW kernel on one chunk; the step counter it advances is a copy (the caller advances once)."""
    adamw_update_([w], [g], [m], [v], [step.clone()], lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps,
                  weight_decay=hp.weight_decay, fused=hp.fused, found_inf=found_inf)


def _keep_where(skip: Tensor | None, old: Tensor, new: Tensor) -> Tensor:
    return new if skip is None else torch.where(skip, old, new)


class Full:
    """``fp32``: moments as full tensors of the working dtype."""

    kernel_path = True  # wide tensors may be stepped together in one fused-kernel call

    def init_(self, state: dict, like: Tensor, dtype: torch.dtype) -> None:
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(like.shape, dtype=dtype, device=like.device)
            state["exp_avg_sq"] = torch.zeros(like.shape, dtype=dtype, device=like.device)

    def chunks(self, like: Tensor) -> list[tuple[int, int]]:
        n = like.numel()
        if is_wide(like):
            return [(0, n)]  # the weight itself is the working tensor: one kernel call
        return [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]

    def begin_(self, state: dict, grad: Tensor, hp: Hyper, found_inf: Tensor | None) -> None:
        return None

    def chunk_(self, w: Tensor, g: Tensor, state: dict, a: int, b: int, step: Tensor, hp: Hyper,
               found_inf: Tensor | None) -> None:
        m, v = state["exp_avg"].view(-1)[a:b], state["exp_avg_sq"].view(-1)[a:b]
        _kernel_(w, g, m, v, step, hp, found_inf)


class Blockwise8bit(Full):
    """``8bit``: both moments as blockwise 8-bit codes (m: signed book, v: unsigned) with float32 absmax."""

    kernel_path = False

    def __init__(self, quant_block: int = 256, quant_code: str = "dynamic", quant_min_size: int = 4096) -> None:
        self.block, self.code, self.min_size = quant_block, quant_code, quant_min_size

    def quantized(self, like: Tensor) -> bool:
        return like.numel() >= max(self.min_size, 1)

    def init_(self, state: dict, like: Tensor, dtype: torch.dtype, keys: tuple[str, ...] = ("exp_avg", "exp_avg_sq")
              ) -> None:
        if not self.quantized(like):
            return super().init_(state, like, dtype)
        for key in keys:
            if f"{key}.codes" not in state:
                state[f"{key}.codes"] = torch.zeros(like.numel(), dtype=torch.uint8, device=like.device)
                state[f"{key}.absmax"] = torch.zeros(num_blocks(like.numel(), self.block), dtype=torch.float32,
                                                     device=like.device)

    def chunks(self, like: Tensor) -> list[tuple[int, int]]:
        if not self.quantized(like):
            return super().chunks(like)
        n, size = like.numel(), max(CHUNK // self.block, 1) * self.block  # chunks start on block boundaries
        return [(a, min(a + size, n)) for a in range(0, n, size)]

    def load(self, state: dict, key: str, a: int, b: int, dtype: torch.dtype) -> Tensor:
        book = code_book(self.code, key == "exp_avg", state[f"{key}.codes"].device)
        lo, hi = a // self.block, num_blocks(b, self.block)
        return dequantize_blockwise(state[f"{key}.codes"][a:b], state[f"{key}.absmax"][lo:hi], book, self.block, dtype)

    def store(self, state: dict, key: str, a: int, b: int, value: Tensor, skip: Tensor | None) -> None:
        codes, absmax = state[f"{key}.codes"], state[f"{key}.absmax"]
        book = code_book(self.code, key == "exp_avg", codes.device)
        new_codes, new_absmax = quantize_blockwise(value, book, self.block)
        lo, hi = a // self.block, num_blocks(b, self.block)
        codes[a:b] = _keep_where(skip, codes[a:b], new_codes)
        absmax[lo:hi] = _keep_where(skip, absmax[lo:hi], new_absmax)

    def chunk_(self, w: Tensor, g: Tensor, state: dict, a: int, b: int, step: Tensor, hp: Hyper,
               found_inf: Tensor | None) -> None:
        if "exp_avg" in state:
            return super().chunk_(w, g, state, a, b, step, hp, found_inf)
        m, v = self.load(state, "exp_avg", a, b, w.dtype), self.load(state, "exp_avg_sq", a, b, w.dtype)
        _kernel_(w, g, m, v, step, hp, found_inf)
        skip = None if found_inf is None else found_inf.bool()
        self.store(state, "exp_avg", a, b, m, skip)
        self.store(state, "exp_avg_sq", a, b, v, skip)


class Factored(Blockwise8bit):
    """``factored``: 8-bit first moment, Adafactor's row/column second moment for 2-D tensors."""

    EPS1 = 1e-30  # Adafactor's ε₁, added to G² so that the statistics of an all-zero row stay positive

    def factored(self, like: Tensor) -> bool:
        return like.dim() == 2 and self.quantized(like)

    def init_(self, state: dict, like: Tensor, dtype: torch.dtype, keys: tuple[str, ...] = ("exp_avg", "exp_avg_sq")
              ) -> None:
        if not self.factored(like):
            return super().init_(state, like, dtype)
        super().init_(state, like, dtype, keys=("exp_avg",))
        if "exp_avg_sq.row" not in state:
            state["exp_avg_sq.row"] = torch.zeros(like.shape[0], dtype=torch.float32, device=like.device)
            state["exp_avg_sq.col"] = torch.zeros(like.shape[1], dtype=torch.float32, device=like.device)

    def chunks(self, like: Tensor) -> list[tuple[int, int]]:
        if not self.factored(like):
            return super().chunks(like)
        rows, cols = like.shape
        size = max(CHUNK // (cols * self.block), 1) * cols * self.block  # whole rows and whole blocks
        n = rows * cols
        return [(a, min(a + size, n)) for a in range(0, n, size)]

    def begin_(self, state: dict, grad: Tensor, hp: Hyper, found_inf: Tensor | None) -> None:
        """Update the row and column means of G² once per step, from the whole gradient."""
        if "exp_avg_sq.row" not in state:
            return
        rows, cols = grad.shape
        row_sq = torch.zeros(rows, dtype=torch.float32, device=grad.device)
        col_sq = torch.zeros(cols, dtype=torch.float32, device=grad.device)
        step = max(CHUNK // cols, 1)
        for i in range(0, rows, step):
            sq = grad[i:i + step].float().square().add_(self.EPS1)  # (rows_chunk, cols); never in place on grad
            row_sq[i:i + step] = sq.sum(1)
            col_sq += sq.sum(0)
        skip = None if found_inf is None else found_inf.bool()
        for key, sq, count in (("exp_avg_sq.row", row_sq, cols), ("exp_avg_sq.col", col_sq, rows)):
            new = state[key] * hp.beta2 + sq * ((1 - hp.beta2) / count)
            state[key] = _keep_where(skip, state[key], new)

    def chunk_(self, w: Tensor, g: Tensor, state: dict, a: int, b: int, step: Tensor, hp: Hyper,
               found_inf: Tensor | None) -> None:
        if "exp_avg_sq.row" not in state:
            return super().chunk_(w, g, state, a, b, step, hp, found_inf)
        skip = None if found_inf is None else found_inf.bool()
        if skip is not None:
            g = g.masked_fill(skip, 0.0)  # a skipped step must not turn the weight into NaN below
        row, col = state["exp_avg_sq.row"], state["exp_avg_sq.col"]
        cols = col.numel()
        t = step.to(torch.float64) + 1  # the step being taken (device tensor: no host sync)
        bc1 = (1 - hp.beta1**t).to(w.dtype)
        bc2 = (1 - hp.beta2**t).to(w.dtype)
        m = self.load(state, "exp_avg", a, b, w.dtype).lerp_(g, 1 - hp.beta1)  # m ← β₁m + (1-β₁)g
        v_hat = (row[a // cols:b // cols, None] * col[None, :] / row.mean().clamp_min(self.EPS1)).view(-1)
        update = (m / bc1).div_(v_hat.div_(bc2).sqrt_().add_(hp.eps))  # m̂ / (√v̂ + ε)
        keep = 1 - hp.lr * hp.weight_decay
        if skip is not None:
            update.masked_fill_(skip, 0.0)
            keep = torch.where(skip, 1.0, keep).to(w.dtype)
        w.mul_(keep).add_(update, alpha=-hp.lr)
        self.store(state, "exp_avg", a, b, m, skip)


def step_counter(state: dict, device: torch.device) -> Tensor:
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=torch.float32, device=device)
    return state["step"]


def adamw_(fmt: Full, target: Tensor, grad: Tensor, state: dict, hp: Hyper, *, found_inf: Tensor | None = None,
           rounding: str = "nearest", name: str = "") -> None:
    """One AdamW step on ``target`` (in place) with moments in ``fmt``; ``step`` advances unless found_inf."""
    dtype = work_dtype(target)
    fmt.init_(state, target, dtype)
    step = step_counter(state, target.device)
    fmt.begin_(state, grad, hp, found_inf)
    narrow = not is_wide(target)
    gen = generator_for(state, name, target.device) if narrow and rounding == "stochastic" else None
    flat_w, flat_g = target.view(-1), grad.reshape(-1)
    for a, b in fmt.chunks(target):
        w = flat_w[a:b].to(dtype)  # the weight itself when wide, else a float32 working copy
        fmt.chunk_(w, flat_g[a:b].to(dtype), state, a, b, step, hp, found_inf)
        if narrow:
            write_(flat_w[a:b], w, rounding, gen)
    step.add_(1)
    if found_inf is not None:
        step.sub_(found_inf)


def adam_direction(fmt: Full, r: Tensor, state: dict, hp: Hyper, found_inf: Tensor | None = None) -> Tensor:
    """Advance the moments of ``r`` and return D = m̂/(√v̂ + ε) (float32 or wider; zero when skipped)."""
    d = torch.zeros(r.shape, dtype=work_dtype(r), device=r.device)
    adamw_(fmt, d, r.to(d.dtype), state, Hyper(1.0, hp.beta1, hp.beta2, hp.eps, 0.0, hp.fused), found_inf=found_inf)
    return d.neg_()
