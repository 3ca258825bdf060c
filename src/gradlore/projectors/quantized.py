"""Q-GaLore's projector (arXiv 2407.08296): GaLore's SVD basis, stored as packed int4.

    P = U[:, :r] (s, r)  (as ``svd``)  →  groups of G values of P (row-major) with a float32 scale and an
    integer zero point each: q = clamp(round(P/s_g) + z_g, 0, 15), two codes per byte
    P̂ = (q - z_g)·s_g,   R = P̂ᵀ G (r, l),   up(D) = P̂ D (s, l)

so a basis costs s·r/2 bytes plus 5 bytes per group instead of 4·s·r (float32): about 1/8. Each use
dequantizes P̂ (an (s, r) float temporary); P̂ is close to, not exactly, orthonormal, so ``gram`` returns
P̂ᵀP̂ (Fira's residual norm reads it). State: ``proj.codes`` (uint8), ``proj.scale`` (float32),
``proj.zero`` (uint8). A failed SVD keeps the previous basis, as ``svd`` does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlore.projectors.base import Context, ProjectorBase
from gradlore.projectors.svd import SVDProjector
from gradlore.quant import dequantize_int4, quantize_int4


class Int4SVDProjector(ProjectorBase):
    quantizes = "svd"  # the projector whose basis this one stores in int4

    def __init__(self, basis_group: int = 256) -> None:
        self.group = basis_group
        self.svd = SVDProjector()

    def _basis(self, state: dict, s: int, dtype: torch.dtype) -> Tensor:
        rank = 2 * state["proj.codes"].numel() // s  # ⌈s·r/2⌉ bytes hold the codes of an (s, r) basis
        flat = dequantize_int4(state["proj.codes"], state["proj.scale"], state["proj.zero"], s * rank, self.group, dtype)
        return flat.view(s, rank)

    def refresh(self, g: Tensor, rank: int, state: dict, ctx: Context) -> None:
        scratch = {"proj.basis": self._basis(state, g.shape[0], g.dtype)} if "proj.codes" in state else {}
        self.svd.refresh(g, rank, scratch, ctx)  # keeps the previous basis if the SVD fails
        codes, scale, zero = quantize_int4(scratch["proj.basis"], self.group)
        state["proj.codes"], state["proj.scale"], state["proj.zero"] = codes, scale, zero
        return None

    def down(self, g: Tensor, state: dict) -> Tensor:
        return self._basis(state, g.shape[0], g.dtype).mT @ g  # (r, s) @ (s, l)

    def up_add_(self, out: Tensor, x: Tensor, state: dict, alpha: float) -> None:
        out.addmm_(self._basis(state, out.shape[0], x.dtype), x, alpha=alpha)  # (s, r) @ (r, l)

    def gram(self, state: dict, s: int) -> Tensor:
        basis = self._basis(state, s, state["proj.scale"].dtype)
        return basis.mT @ basis  # (r, r): I up to the int4 rounding

    def basis(self, state: dict, s: int, rank: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return self._basis(state, s, dtype).to(device)
