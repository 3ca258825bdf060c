"""GaLore's projector (arXiv 2403.03507): the top-r left singular vectors of the oriented gradient.

    G (s, l) = U Σ Vᵀ,   P = U[:, :r] (s, r),   R = Pᵀ G (r, l),   up(D) = P D (s, l)

The SVD is computed in float32 on the gradient as it is stored (so that singular-vector signs match
galore-torch, which matters when moments are kept across a refresh). A failed or non-finite SVD is
retried in float64; if that fails too the previous basis is kept (or, on the very first refresh, a
seeded random orthonormal basis is used), with one warning naming the parameter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlore.projectors.base import Context, StoredBasis, warn_once
from gradlore.projectors.random import random_basis


def top_left_singular_vectors(g: Tensor, rank: int, *, transposed: bool, dtype: torch.dtype) -> Tensor | None:
    """Left singular vectors (s, r) of the oriented ``g`` (s, l), or None if no finite SVD exists."""
    stored = g.mT if transposed else g  # the gradient in its natural (m, n) layout
    for compute_dtype in (torch.float32, torch.float64):
        try:
            u, _, vh = torch.linalg.svd(stored.to(compute_dtype), full_matrices=False)
        except RuntimeError:  # LAPACK did not converge
            continue
        basis = vh[:rank].mT if transposed else u[:, :rank]
        if torch.isfinite(basis).all():
            # .contiguous(): never keep a view that pins the whole (s, s) factor alive.
            return basis.to(dtype).contiguous()
    return None


class SVDProjector(StoredBasis):
    def refresh(self, g: Tensor, rank: int, state: dict, ctx: Context) -> None:
        basis = top_left_singular_vectors(g, rank, transposed=ctx.transposed, dtype=g.dtype)
        if basis is None:
            if "proj.basis" in state:
                warn_once("svd", ctx.name, f"gradlore: SVD of the gradient of {ctx.name} failed or is not finite "
                          "(non-finite gradient?); keeping the previous projection basis.")
                return None
            warn_once("svd", ctx.name, f"gradlore: SVD of the gradient of {ctx.name} failed or is not finite on "
                      "its first refresh; using a random orthonormal basis until the next refresh.")
            basis = random_basis(g.shape[0], rank, ctx.seed, g.dtype, g.device)
        state["proj.basis"] = basis
        return None
