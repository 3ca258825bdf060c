"""Gradient-rank statistics: pure functions on one matrix (or two subspaces), no state.

Paper: "From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge from Low-Rank Gradients"
(arXiv 2407.11239), which observes that some layers' gradients (and then weights) become low-rank during
training while others do not; GaLore (arXiv 2403.03507) relies on the gradient subspace changing slowly.

For G (m×n) with singular values σ₁ ≥ σ₂ ≥ … ≥ σ_k, k = min(m, n):

    stable rank      sr(G)  = ‖G‖_F² / ‖G‖₂² = Σ σᵢ² / σ₁²                        (1 ≤ sr ≤ rank G)
    effective rank   er(G)  = exp(H(p)),  pᵢ = σᵢ / Σ σⱼ,  H = −Σ pᵢ log pᵢ          (Roy & Vetterli 2007)
    energy rank      k_e(G) = min{ j : Σ_{i≤j} σᵢ² ≥ e · Σ σᵢ² }
    subspace cosine  cos(U, V) = mean of the singular values of Uᵀ V for orthonormal U, V (d×r)
                                = mean cosine of the principal angles between span U and span V
                                (1: same subspace, 0: orthogonal)

`subspace_basis` returns the top-r singular vectors on the *shorter* side of G (left ones when m ≤ n,
right ones otherwise), i.e. exactly the subspace GaLore's `std` projection would keep.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "effective_rank",
    "energy_rank",
    "singular_values",
    "stable_rank",
    "subspace_basis",
    "subspace_cosine",
    "top_singular_values",
]


def _as_matrix(g: Tensor) -> Tensor:
    if g.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(g.shape)}")
    return g.detach().float()


def singular_values(g: Tensor) -> Tensor:
    """All singular values of g (m×n), descending, float32; shape (min(m, n),)."""
    return torch.linalg.svdvals(_as_matrix(g))


def stable_rank(g: Tensor | None = None, *, sv: Tensor | None = None) -> float:
    """‖G‖_F² / ‖G‖₂²; 0.0 for an all-zero matrix. Pass `sv` (singular values) to skip the SVD."""
    s = singular_values(g) if sv is None else sv.float()
    top = float(s.max()) if s.numel() else 0.0
    if top == 0.0:
        return 0.0
    return float((s.square().sum() / (top * top)).item())


def top_singular_values(g: Tensor | None = None, k: int = 8, *, sv: Tensor | None = None) -> list[float]:
    """The k largest singular values (fewer if the matrix is smaller), descending."""
    s = singular_values(g) if sv is None else sv.float()
    return [float(x) for x in s[:k].tolist()]


def effective_rank(g: Tensor | None = None, *, sv: Tensor | None = None) -> float:
    """exp(entropy of the normalised singular values); equals r for r equal non-zero singular values."""
    s = singular_values(g) if sv is None else sv.float()
    total = float(s.sum())
    if total == 0.0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(math.exp(float(-(p * p.log()).sum())))


def energy_rank(g: Tensor | None = None, energy: float = 0.9, *, sv: Tensor | None = None) -> int:
    """Smallest j whose top-j singular values hold `energy` of ‖G‖_F²; 0 for an all-zero matrix."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    s = singular_values(g) if sv is None else sv.float()
    e = s.square()
    total = float(e.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(e, 0) / total  # (k,)
    # tolerance: float32 cumulative sums may stop a hair below 1.0
    return int(torch.searchsorted(cum, torch.tensor(energy - 1e-6)).item()) + 1


def subspace_basis(g: Tensor, r: int) -> Tensor:
    """Orthonormal (d×r') basis of the top-r singular vectors on G's shorter side, d = min(m, n), r' = min(r, d)."""
    m = _as_matrix(g)
    if m.shape[0] > m.shape[1]:
        m = m.T  # (n, m) → shorter side first; its left singular vectors are G's right ones
    u, _, _ = torch.linalg.svd(m, full_matrices=False)  # u: (d, d)
    return u[:, : min(r, u.shape[1])].contiguous()


def subspace_cosine(u: Tensor, v: Tensor) -> float:
    """Mean cosine of the principal angles between span(u) and span(v); u, v orthonormal (d×r)."""
    if u.dim() != 2 or v.dim() != 2 or u.shape[0] != v.shape[0]:
        raise ValueError(f"bases must be (d, r) with the same d, got {tuple(u.shape)} and {tuple(v.shape)}")
    cos = torch.linalg.svdvals(u.float().T @ v.float())  # (min(r_u, r_v),), each in [0, 1]
    return float(cos.clamp(0.0, 1.0).mean())
