"""What happens to the part of the gradient outside the subspace, S = G - P·R with R = Pᵀ·G.

The optimizer applies, in the oriented (s, l) frame,

    W ← W - lr · ( P·(scale·D + low) + G ⊙ col + dense )

and each rule returns the ``Correction`` (low (r, l), col (l,), dense (s, l); any may be None) that
carries its term, so that a term which is low-rank or column-scaled costs no (s, l) matmul.

- discard (GaLore, arXiv 2403.03507): S is dropped.
- fira (arXiv 2410.01623): norm-based scaling with a norm-growth limiter,
      φ_j = ‖N[:, j]‖ / ‖R[:, j]‖  (per column of the long side; N = m/(√v+ε), the uncorrected Adam ratio)
      S̃ = S ⊙ φ;   if ‖S̃_t‖ > γ‖S̃_{t-1}‖ then S̃_t ← S̃_t · γ‖S̃_{t-1}‖/‖S̃_t‖   (γ = 1.01)
      term = c_t · S̃ with c_t = √(1-β₂ᵗ)/(1-β₁ᵗ), Adam's bias correction on the whole update, as in
  the authors' code. Since scaling columns commutes with P:  S ⊙ φ = G ⊙ φ - P·(R ⊙ φ), i.e.
  col = κφ and low = -κ(R ⊙ φ) with κ = c_t/limiter; ‖S ⊙ φ‖ comes from column norms and the basis'
  Gram matrix: ‖S_j‖² = ‖G_j‖² - 2‖R_j‖² + R_jᵀ(PᵀP)R_j. Deliberate difference: we use the true
  complement S = G - P·R, where the authors subtract scale·P·R (identical at scale = 1).
- sign (FRUGAL, arXiv 2411.07837): state-free signSGD on S, dense = residual_lr_ratio · sign(S).
- ef (error feedback; the SVD-free paper's DCT-AdamW, arXiv 2505.17967, after MicroAdam, arXiv 2405.15593):
  S is not applied but kept, Ξ, and added to the next gradient before anything else sees it:
      G' = G + Ξ;   the subspace is chosen from G' at a refresh;   R = Pᵀ G';   Ξ ← G' - P·R.
  Nothing of the gradient is lost, only delayed until it enters the subspace. With ``ef_bits=32`` Ξ (s, l) is a
  float32 state tensor (``ef.buffer``): one more copy of the weight in memory. ``ef_bits=8`` keeps it as blockwise
  8-bit codes (the dynamic code book of ``gradlore.quant``, one float32 absmax per 256 values: ~1.02 bytes a value),
  ``ef_bits=4`` as int4 with a scale and zero point per 256 values (~0.51 bytes; MicroAdam's 4-bit feedback,
  arXiv 2405.15593). Quantized, G' = G + Ξ̂ is a float32 temporary while the weight is stepped, so such a group
  steps its weights one at a time (``one_at_a_time``): at most one temporary lives at once. The quantization
  error of Ξ is not fed back; it is the price of the smaller state. (The authors' ``q_ef=8`` spends a byte per
  value on 16 levels, (max - min)/15 per row, i.e. 4-bit resolution; ours uses the 256 codes.)

Every rule is given ``skip`` (a 0-dim bool tensor, or None) and leaves its own state as it was where it is true,
with no host sync: a skipped step changes nothing (the optimizer has zeroed G and keeps weights and moments).

Every term is column-local except Fira's ‖S ⊙ φ‖, a sum over all columns: when g holds only this rank's
columns (FSDP2 sharding along l), ``comm`` adds the other ranks' partial sums (one scalar all-reduce).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from gradlore.projectors.base import Projector, Reducer
from gradlore.quant import code_book, dequantize_blockwise, dequantize_int4, quantize_blockwise, quantize_int4


class Correction(NamedTuple):
    low: Tensor | None = None  # (r, l), added to scale·D before mapping back
    col: Tensor | None = None  # (l,), adds G ⊙ col
    dense: Tensor | None = None  # (s, l)


def _col_sq(g: Tensor) -> Tensor:
    """Squared column norms of g (s, l), reducing along whichever axis is contiguous."""
    if g.stride(0) == 1:  # a transposed view: columns are contiguous rows of the stored gradient
        return torch.linalg.vector_norm(g, dim=0).square()
    return g.square().sum(0)


class Discard:
    def __call__(self, g: Tensor, r: Tensor, d: Tensor, state: dict, projector: Projector,
                 betas: tuple[float, float], comm: Reducer | None = None, skip: Tensor | None = None) -> None:
        return None


class FiraScale:

    def __init__(self, fira_gamma: float) -> None:
        self.gamma = fira_gamma

    def __call__(self, g: Tensor, r: Tensor, d: Tensor, state: dict, projector: Projector,
                 betas: tuple[float, float], comm: Reducer | None = None, skip: Tensor | None = None) -> Correction:
        beta1, beta2 = betas
        wide = torch.promote_types(g.dtype, torch.float32)
        step = state["step"].double()  # a device tensor: no host sync for the bias correction
        c = ((1.0 - beta2**step).sqrt() / (1.0 - beta1**step)).to(wide)
        r_sq = r.square().sum(0)  # ‖R_j‖², (l,); a row-wise sum, fast on the (r, l) layout
        phi = (d.square().sum(0).sqrt() / c.to(d.dtype)) / (r_sq.sqrt() + 1e-8)  # (l,)
        gram = projector.gram(state, g.shape[0])  # PᵀP (r, r), or None where the basis is orthonormal by construction
        r_m_r = r_sq if gram is None else (r * (gram.to(r.dtype) @ r)).sum(0)
        res_sq = _col_sq(g) - 2 * r_sq + r_m_r  # ‖S_j‖² = ‖G_j‖² - 2‖R_j‖² + R_jᵀPᵀPR_j, (l,)
        norm_sq = (phi.square() * res_sq.clamp_min(0)).sum()
        if comm is not None:  # g is this rank's columns: the norm runs over every rank's
            comm.all_reduce_(norm_sq)
        norm = norm_sq.sqrt().to(wide)  # ‖S ⊙ φ‖
        kappa = c
        prev = state.get("fira.prev_norm")
        if prev is not None:
            limiter = torch.clamp(norm / (prev + 1e-8), min=self.gamma) / self.gamma  # 1 unless the norm grew > γ
            norm = norm / limiter
            kappa = kappa / limiter
        state["fira.prev_norm"] = norm if skip is None or prev is None else torch.where(skip, prev, norm)
        col = phi * kappa.to(phi.dtype)
        return Correction(low=-(r * col[None, :]), col=col)


EF_GROUP = 256  # values per quantization block of a quantized error-feedback buffer


class ErrorFeedback:
    def __init__(self, ef_bits: int = 32) -> None:
        self.bits = ef_bits
        self.one_at_a_time = ef_bits < 32  # G' is then a float32 temporary: the optimizer steps weights one by one

    def feed(self, g: Tensor, state: dict) -> Tensor:
        """G' = G + Ξ. In float32 it is built inside Ξ's buffer: the caller's gradient stays as it is and no (s, l)
        temporary is made; quantized, it is a new float32 tensor (s, l), Ξ̂ decoded plus G."""
        wide = torch.promote_types(g.dtype, torch.float32)
        if self.bits == 32:
            buf = state.get("ef.buffer")
            if buf is None:
                buf = state["ef.buffer"] = torch.zeros(g.shape, dtype=wide, device=g.device)
            return buf.add_(g)
        if "ef.codes" not in state:  # Ξ = 0; row-major like a decoded Ξ̂, so the codes keep one layout
            return torch.empty(g.shape, dtype=wide, device=g.device).copy_(g)
        n = g.numel()
        if self.bits == 8:
            book = code_book("dynamic", True, g.device)
            xi = dequantize_blockwise(state["ef.codes"], state["ef.absmax"], book, EF_GROUP, wide)
        else:
            xi = dequantize_int4(state["ef.codes"], state["ef.scale"], state["ef.zero"], n, EF_GROUP, wide)
        return xi.view(g.shape).add_(g)

    def __call__(self, g: Tensor, r: Tensor, d: Tensor, state: dict, projector: Projector,
                 betas: tuple[float, float], comm: Reducer | None = None, skip: Tensor | None = None) -> None:
        # g is G' (in Ξ's buffer, or our own temporary): Ξ ← G' - P·R, in place. On a skipped step (``skip``, a 0-dim
        # bool tensor) the optimizer zeroed G, so G' is the old Ξ: leaving out P·R keeps it exactly (float32), and
        # the old codes are kept (quantized), with no host sync.
        projector.up_add_(g, r if skip is None else r.masked_fill(skip, 0.0), state, -1.0)
        if self.bits == 32:
            return None
        if self.bits == 8:
            new = dict(zip(("ef.codes", "ef.absmax"), quantize_blockwise(g, code_book("dynamic", True, g.device),
                                                                          EF_GROUP)))
        else:
            new = dict(zip(("ef.codes", "ef.scale", "ef.zero"), quantize_int4(g, EF_GROUP)))
        for key, value in new.items():
            old = state.get(key)
            state[key] = value if skip is None or old is None else torch.where(skip, old, value)
        return None


class SignDescent:
    def __init__(self, residual_lr_ratio: float) -> None:
        self.ratio = residual_lr_ratio

    def __call__(self, g: Tensor, r: Tensor, d: Tensor, state: dict, projector: Projector,
                 betas: tuple[float, float], comm: Reducer | None = None, skip: Tensor | None = None) -> Correction:
        residual = g.clone()
        projector.up_add_(residual, r, state, -1.0)  # G - P·R, one matmul into the copy
        return Correction(dense=residual.sign_().mul_(self.ratio))
