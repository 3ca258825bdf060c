"""A seeded random orthonormal projector (as in FRUGAL's and APOLLO's random subspaces).

    P = qr(N(0, 1)^{s×r}).Q,  seeded by (seed, refresh step, parameter index) so runs repeat exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlore.projectors.base import ProjectorBase


def random_basis(s: int, rank: int, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An orthonormal (s, r) basis drawn from a Gaussian with a private generator."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    gauss = torch.randn(s, rank, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(gauss)  # (s, r), orthonormal columns
    return q.to(dtype=dtype, device=device).contiguous()


class RandomProjector(ProjectorBase):
    def refresh(self, g, rank, state, *, transposed, name, seed):
        state["proj.basis"] = random_basis(g.shape[0], rank, seed, g.dtype, g.device)
        return None

    def down(self, g: Tensor, state: dict) -> Tensor:
        return state["proj.basis"].mT @ g

    def gram(self, state: dict) -> Tensor:
        basis = state["proj.basis"]
        return basis.mT @ basis  # (r, r): I up to the basis' rounding (a float32 SVD)

    def up_add_(self, out: Tensor, x: Tensor, state: dict, alpha: float) -> None:
        out.addmm_(state["proj.basis"], x, alpha=alpha)  # (s, r) @ (r, l), added in place
