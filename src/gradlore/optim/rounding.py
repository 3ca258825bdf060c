"""Writing an update computed in float32 into a low-precision (bf16) weight without losing it.

Pure bf16 training keeps no float32 master copy: the optimizer computes in float32 and must round the new
weight w' = w + Δ to bf16. Round-to-nearest drops every Δ smaller than half a bf16 ulp of w (|Δ| < 2^-9·|w|),
which for small learning rates is most of them: the weights stop moving. Stochastic rounding (Gupta et al.,
arXiv 1502.02551; used for bf16 training by Zamirai et al., arXiv 2010.06192) rounds up with probability
equal to the distance from the lower neighbour, so E[round(w')] = w' and small updates survive on average,
at no memory cost (a compensated/Kahan update would need a second bf16 buffer per weight: 2 B/param).

For bf16, a float32 whose low 16 bits are dropped is a bf16: add 16 uniform random bits to the float32's bit
pattern, then clear them. Other narrow dtypes (float16) round to a neighbour chosen with the same
probabilities. The random bits come from a generator seeded by the parameter's name and the CPU counter
``round.t`` in its optimizer state, so a resumed run rounds exactly as the uninterrupted one.
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

ROUNDING = ("stochastic", "nearest")
COUNTER = "round.t"  # CPU int64: updates written to this weight so far (seeds its random bits)


def is_wide(t: Tensor) -> bool:
    """float32 and float64 hold the optimizer's math directly; narrower dtypes get a float32 working copy."""
    return t.dtype in (torch.float32, torch.float64)


def work_dtype(t: Tensor) -> torch.dtype:
    return t.dtype if is_wide(t) else torch.float32


def generator_for(state: dict, name: str, device: torch.device) -> torch.Generator:
    """A generator for this weight's update: seeded by its name and its update counter (which advances)."""
    if COUNTER not in state:
        state[COUNTER] = torch.zeros((), dtype=torch.int64)
    t = int(state[COUNTER])  # a CPU tensor: no device sync
    state[COUNTER] += 1
    gen = torch.Generator(device=device)
    gen.manual_seed((zlib.crc32(name.encode()) * 1_000_003 + t) % (2**63))
    return gen


def stochastic_round_(dst: Tensor, src: Tensor, gen: torch.Generator) -> None:
    """dst (narrow dtype) ← src (float32) rounded stochastically: E[dst] = src."""
    if dst.dtype == torch.bfloat16:
        noise = torch.randint(0, 1 << 16, src.shape, dtype=torch.int32, device=src.device, generator=gen)
        bits = (src.contiguous().view(torch.int32) + noise) & -65536  # carry into the kept bits with p = low/2^16
        dst.copy_(bits.view(torch.float32))  # exact: the low 16 bits are zero
        return
    near = src.to(dst.dtype)  # a neighbour; the other one lies towards src
    toward = torch.where(src > near.float(), float("inf"), float("-inf")).to(dst.dtype)
    other = torch.nextafter(near, toward)
    gap = other.float() - near.float()
    p_other = torch.where(gap != 0, (src - near.float()) / gap, torch.zeros_like(src))
    u = torch.rand(src.shape, device=src.device, generator=gen)
    dst.copy_(torch.where(u < p_other, other, near))


def write_(dst: Tensor, src: Tensor, rounding: str, gen: torch.Generator | None) -> None:
    """dst ← src, rounded to dst's dtype as ``rounding`` says (a wide dst is a plain copy)."""
    if is_wide(dst) or rounding == "nearest" or gen is None:
        dst.copy_(src)
    else:
        stochastic_round_(dst, src, gen)
