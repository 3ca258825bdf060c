"""Compact number formats for optimizer state, in plain torch ops (any device): blockwise 8-bit codes and
packed int4 with a per-group scale and zero point.

Blockwise 8-bit (Dettmers et al., "8-bit Optimizers via Block-wise Quantization", arXiv 2110.02861):
a flat tensor x is cut into blocks of B values; each block keeps its absolute maximum a_b (float32) and each
value the index of the nearest entry of a code book c of at most 256 values in [-1, 1]:

    q_i = argmin_k |x_i / a_b - c_k|          x̂_i = c[q_i] · a_b          (uint8 codes, one fp32 per block)

The *dynamic* code book is the paper's dynamic tree: after the sign bit, a run of e zeros fixes the decimal
exponent 10^-e, a 1 bit ends the run, and the remaining bits split [0.1, 1] linearly, so small values keep
their relative precision down to 1e-6 (signed, 255 values: ±0 is one) or 1e-7 (unsigned, 256 values). The
*linear* code book is uniform. Adam's second moment uses the unsigned book, and a positive value never
rounds to zero (it would make m/√v explode). All-zero codes with all-zero scales decode to zero, so a
policy that zeroes the state tensors resets the moments.

The nearest code is found by a look-up table indexed by the top 20 bits of the float32 x/a_b (sign,
exponent and 11 mantissa bits), built once per code book and device by ``torch.bucketize`` on each bucket's
midpoint: three cheap passes instead of a binary search per value (3x faster on CPU). It is the exact
nearest code except for values within 2^-11 (relative) of a midpoint between two codes.

Packed int4 (Q-GaLore, arXiv 2407.08296, for projection bases): groups of G values keep a float32 scale
s = (max - min)/15 and an integer zero point z = round(-min/s) ∈ [0, 15]; each value is
q = clamp(round(x/s) + z, 0, 15), two codes per byte (low nibble first), and x̂ = (q - z)·s, so
|x - x̂| ≤ s/2 inside every group.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

CODES = ("dynamic", "linear")
_LUT_SHIFT = 12  # keep the top 32 - 12 = 20 bits of a float32


def code_values(kind: str, signed: bool) -> list[float]:
    """The sorted code book: 255 (signed) or 256 (unsigned) values in [-1, 1] or [0, 1], 0 and ±1 included."""
    if kind == "linear":  # k/127 for k in -127..127 (an exact zero), or k/255 for k in 0..255
        return [k / 127 for k in range(-127, 128)] if signed else [k / 255 for k in range(256)]
    if kind != "dynamic":
        raise ValueError(f"unknown code book {kind!r}; valid: {', '.join(CODES)}")
    bits = 7 if signed else 8  # bits after the sign bit
    mags = []
    for e in range(bits):  # e leading zeros, the indicator bit, then (bits - 1 - e) fraction bits
        n = 2 ** (bits - 1 - e)
        mags += [10.0**-e * (0.1 + 0.9 * k / n) for k in range(1, n + 1)]
    return sorted({0.0, *mags, *([-m for m in mags] if signed else [])})


@dataclass(frozen=True)
class CodeBook:
    values: Tensor  # (K,) float32, sorted
    lut: Tensor  # (2^20,) uint8: nearest code of every float32 bucket

    def nearest(self, y: Tensor) -> Tensor:
        """Codes (uint8) of float32 values y (any shape)."""
        keys = (y.contiguous().view(torch.int32) >> _LUT_SHIFT) & ((1 << (32 - _LUT_SHIFT)) - 1)
        return self.lut.index_select(0, keys.view(-1)).view(y.shape)


@cache
def code_book(kind: str, signed: bool, device: torch.device | str = "cpu") -> CodeBook:
    """The code book and its look-up table on ``device`` (built once; derived data, not state)."""
    values = torch.tensor(code_values(kind, signed), dtype=torch.float32)
    keys = torch.arange(1 << (32 - _LUT_SHIFT), dtype=torch.int64)
    mids = ((keys << _LUT_SHIFT) | (1 << (_LUT_SHIFT - 1))).to(torch.int32).view(torch.float32)  # bucket centres
    mids = torch.nan_to_num(mids, nan=0.0).clamp(float(values[0]), 1.0)
    lut = torch.bucketize(mids, (values[1:] + values[:-1]) / 2)
    if not signed:  # Adam's second moment: a positive value never decodes to zero
        lut = torch.where(mids > 0, lut.clamp_min(1), lut)
    return CodeBook(values.to(device), lut.to(torch.uint8).to(device))


def num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def _blocks(x: Tensor, block: int) -> Tensor:
    """x flattened (float32) as (⌈n/B⌉, B), zero-padded."""
    flat = x.reshape(-1).float()
    pad = num_blocks(flat.numel(), block) * block - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block)


def quantize_blockwise(x: Tensor, book: CodeBook, block: int) -> tuple[Tensor, Tensor]:
    """x (any shape, n values) -> (codes uint8 (n,), absmax float32 (⌈n/B⌉,))."""
    blocks = _blocks(x, block)  # (nb, B)
    absmax = blocks.abs().amax(1)  # (nb,)
    normed = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    return book.nearest(normed).view(-1)[: x.numel()], absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, book: CodeBook, block: int,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """(codes uint8 (n,), absmax (⌈n/B⌉,)) -> values (n,) of ``dtype``."""
    n = codes.numel()
    values = book.values.index_select(0, codes.reshape(-1).int())  # (n,)
    full = n - n % block
    out = torch.empty(n, dtype=dtype, device=codes.device)
    torch.mul(values[:full].view(-1, block), absmax[: full // block, None], out=out[:full].view(-1, block))
    if full < n:
        torch.mul(values[full:], absmax[-1], out=out[full:])
    return out


# ------------------------------------------------------------------------------------------------ int4
def quantize_int4(x: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """x (n values, n·G even) -> (packed uint8 (⌈n/2⌉,), scale float32 (⌈n/G⌉,), zero uint8 (⌈n/G⌉,))."""
    if group % 2:
        raise ValueError(f"int4 group size must be even, got {group}")
    n = x.numel()
    flat = x.reshape(-1).float()
    pad = num_blocks(n, group) * group - n
    if pad:
        flat = torch.cat([flat, flat[-1:].expand(pad)])  # pad with a value already in the last group
    groups = flat.view(-1, group)  # (ng, G)
    # (ng,) each; the range always holds 0, so the zero point is a code (0..15): a group of one sign (a tiny basis)
    # would otherwise clamp its zero point and lose its values
    lo, hi = groups.amin(1).clamp_max(0), groups.amax(1).clamp_min(0)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    zero = torch.round(-lo / scale).clamp_(0, 15)
    q = (torch.round(groups / scale[:, None]) + zero[:, None]).clamp_(0, 15).to(torch.uint8).view(-1)
    q = q[: n + n % 2]
    packed = q[0::2] | (q[1::2] << 4)  # two codes per byte, low nibble first
    return packed, scale, zero.to(torch.uint8)


def dequantize_int4(packed: Tensor, scale: Tensor, zero: Tensor, n: int, group: int,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of ``quantize_int4``: n values (flat) of ``dtype``."""
    q = torch.stack([packed & 15, packed >> 4], dim=1).view(-1).float()  # (2⌈n/2⌉,) codes 0..15
    ng = scale.numel()
    q = torch.cat([q, q.new_zeros(ng * group - q.numel())]) if q.numel() < ng * group else q[: ng * group]
    x = (q.view(ng, group) - zero.float()[:, None]) * scale[:, None]  # (ng, G)
    return x.view(-1)[:n].to(dtype)
