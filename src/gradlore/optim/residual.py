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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor


class Correction(NamedTuple):
    low: Tensor | None = None  # (r, l), added to scale·D before mapping back
    col: Tensor | None = None  # (l,), adds G ⊙ col
    dense: Tensor | None = None  # (s, l)


def discard(g: Tensor, r: Tensor, d: Tensor, state: dict, group: dict, projector: Any, step: int) -> None:
    return None


def fira(g: Tensor, r: Tensor, d: Tensor, state: dict, group: dict, projector: Any, step: int) -> Correction:
    beta1, beta2 = group["betas"]
    c = (1.0 - beta2**step) ** 0.5 / (1.0 - beta1**step)
    rank = r.shape[0]
    phi = (d.norm(dim=0) / c) / (r.norm(dim=0) + 1e-8)  # (l,)
    basis = projector.up(torch.eye(rank, dtype=r.dtype, device=r.device), state, g.shape[0])  # (s, r)
    gram = basis.mT @ basis  # (r, r): the identity up to the basis' rounding
    g_sq = torch.linalg.vector_norm(g, dim=0).square()  # (l,), one pass over G, no temporary
    res_sq = g_sq - 2 * r.square().sum(0) + (r * (gram @ r)).sum(0)  # ‖S_j‖², (l,)
    wide = torch.promote_types(g.dtype, torch.float32)
    norm = (phi.square() * res_sq.clamp_min(0)).sum().sqrt().to(wide)  # ‖S ⊙ φ‖
    gamma = group.get("fira_gamma", 1.01)
    prev = state.get("fira.prev_norm")
    kappa = torch.tensor(c, dtype=wide, device=g.device)
    if prev is not None:
        limiter = torch.clamp(norm / (prev + 1e-8), min=gamma) / gamma  # 1 unless the norm grew > γ
        norm = norm / limiter
        kappa = kappa / limiter
    state["fira.prev_norm"] = norm
    col = phi * kappa.to(phi.dtype)
    return Correction(low=-(r * col[None, :]), col=col)


def sign(g: Tensor, r: Tensor, d: Tensor, state: dict, group: dict, projector: Any, step: int) -> Correction:
    residual = g.clone()
    projector.up_add_(residual, r, state, -1.0)  # G - P·R, one matmul into the copy
    return Correction(dense=residual.sign_().mul_(group.get("residual_lr_ratio", 1.0)))


RESIDUALS: dict[str, Callable[..., Correction | None]] = {"discard": discard, "fira": fira, "sign": sign}
