"""A seeded random orthonormal projector (as in FRUGAL's and APOLLO's random subspaces).

    P = qr(N(0, 1)^{s×r}).Q,  seeded by (seed, refresh step, parameter index) so runs repeat exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlore.projectors.base import Context, StoredBasis


def random_basis(s: int, rank: int, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An orthonormal (s, r) basis drawn from a Gaussian with a private generator."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    gauss = torch.randn(s, rank, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(gauss)  # (s, r), orthonormal columns
    return q.to(dtype=dtype, device=device).contiguous()


class RandomProjector(StoredBasis):
    refreshes_on_shards, reads_gradient = True, False  # the basis depends on the seed only: every rank draws it

    def refresh(self, g: Tensor, rank: int, state: dict, ctx: Context) -> None:
        state["proj.basis"] = random_basis(g.shape[0], rank, ctx.seed, g.dtype, g.device)
        return None
