"""What happens to the part of the gradient outside the subspace, S = G - P·Pᵀ·G.

Each rule returns a term added to the (positive) update direction in the oriented (s, l) frame,
or None. The optimizer applies  W ← W - lr · (scale · up(D) + term).

- discard (GaLore, arXiv 2403.03507): S is dropped.
- fira (arXiv 2410.01623): norm-based scaling with a norm-growth limiter,
      φ_j = ‖N[:, j]‖ / ‖R[:, j]‖  (per column of the long side; N = m/(√v+ε), the uncorrected Adam ratio)
      S̃ = φ ⊙ S;   if ‖S̃_t‖ > γ‖S̃_{t-1}‖ then S̃_t ← S̃_t · γ‖S̃_{t-1}‖/‖S̃_t‖   (γ = 1.01)
      term = c_t · S̃ with c_t = √(1-β₂ᵗ)/(1-β₁ᵗ), Adam's bias correction, applied to the whole update
  as in the authors' code. Deliberate difference: we use the true complement S = G - P·R, where the
  authors subtract scale·P·R (identical at scale = 1).
- sign (FRUGAL, arXiv 2411.07837): state-free signSGD on S, term = residual_lr_ratio · sign(S).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

UpFn = Callable[[Tensor], Tensor]


def discard(g: Tensor, r: Tensor, d: Tensor, state: dict, group: dict, up: UpFn, step: int) -> Tensor | None:
    return None


def fira(g: Tensor, r: Tensor, d: Tensor, state: dict, group: dict, up: UpFn, step: int) -> Tensor:
    beta1, beta2 = group["betas"]
    c = (1.0 - beta2**step) ** 0.5 / (1.0 - beta1**step)
    residual = g - up(r)  # (s, l)
    # Column norms over the projected axis: one factor per column of the long side, (l,).
    phi = (d.norm(dim=0) / c) / (r.norm(dim=0) + 1e-8)
    scaled = residual * phi[None, :]
    norm = scaled.norm().to(torch.promote_types(g.dtype, torch.float32))
    gamma = group.get("fira_gamma", 1.01)
    prev = state.get("fira.prev_norm")
    if prev is not None:
        limiter = torch.clamp(norm / (prev + 1e-8), min=gamma) / gamma  # 1 unless the norm grew > γ
        scaled = scaled / limiter.to(scaled.dtype)
        norm = norm / limiter
    state["fira.prev_norm"] = norm
    return scaled * c


def sign(g: Tensor, r: Tensor, d: Tensor, state: dict, group: dict, up: UpFn, step: int) -> Tensor:
    residual = g - up(r)
    return torch.sign(residual) * group.get("residual_lr_ratio", 1.0)


RESIDUALS: dict[str, Callable[..., Tensor | None]] = {"discard": discard, "fira": fira, "sign": sign}
