"""The projector protocol, orientation, the context a projector is given, and the identity projector.

A projector maps an oriented gradient ``G`` of shape (s, l), s <= l, to a rank-r coordinate
matrix ``R = down(G)`` of shape (r, l) and maps Adam's direction back with ``up``: (r, l) -> (s, l).
Both act on the left (``down(G) = Pᵀ G``): column j of R depends only on column j of G. So a rank that
holds whole columns of G (FSDP2 sharding a weight along its long side l) projects and updates its columns
alone; only choosing P needs the other ranks, through ``Context.comm`` (``gradlore.optim.distributed``).
Everything a projector remembers between steps lives in the parameter's optimizer state as
tensors under ``proj.*`` keys, so ``state_dict()`` holds no Python objects (DESIGN principle 4).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple, Protocol

import torch
from torch import Tensor


def is_transposed(shape: torch.Size | tuple[int, ...]) -> bool:
    """GaLore's ``std`` orientation: rows >= cols projects on the right, i.e. we work on Gᵀ."""
    return shape[0] >= shape[1]


def orient(g: Tensor) -> Tensor:
    """View a 2-D gradient (m, n) as (s, l) with the shorter side first (no copy)."""
    return g.mT if is_transposed(g.shape) else g


class Reducer(Protocol):
    """The ranks that share a weight's long side l (``gradlore.optim.distributed.Comm``)."""

    def all_reduce_(self, t: Tensor) -> Tensor:
        """Sum ``t`` over the ranks, in place; every rank gets the same result."""
        ...


class Context(NamedTuple):
    """What a projector may need to know about the weight it refreshes, besides its gradient."""

    name: str  # the parameter's name, for warnings
    transposed: bool  # the oriented gradient (s, l) is the stored gradient's transpose
    seed: int  # for seeded bases: a function of the group's seed, the parameter and the refresh step
    comm: Reducer | None = None  # set when g holds only this rank's columns of the (s, l) gradient
    stable_slots: bool = False  # the moments keep each row with its basis index (``on_refresh="remap"``)


class Projector(Protocol):
    """Maps (s, l) gradients to (r, l) coordinates and back. State lives in ``state`` (tensors only)."""

    selects_indices: bool  # state is ``proj.indices`` (r,) int64 into a fixed basis: moment rows can follow them
    refreshes_on_shards: bool  # refresh() works on a column shard of G, given ctx.comm (else: the whole G)
    reads_gradient: bool  # refresh() depends on G (else every rank computes it alone: seeded or none)

    def refresh(self, g: Tensor, rank: int, state: dict, ctx: Context) -> Tensor | None:
        """Choose a new subspace for ``g`` (s, l); may return ``down(g)`` if it was a by-product."""
        ...

    def down(self, g: Tensor, state: dict) -> Tensor:
        """(s, l) -> (r, l)"""
        ...

    def up_add_(self, out: Tensor, x: Tensor, state: dict, alpha: float) -> None:
        """out (s, l) += alpha · P x, with x (r, l): fused into the weight update, no (s, l) temporary."""
        ...

    def up(self, x: Tensor, state: dict, s: int) -> Tensor:
        """(r, l) -> (s, l)"""
        ...

    def gram(self, state: dict, s: int) -> Tensor | None:
        """PᵀP (r, r) of the (s, r) basis where it is not exactly the identity, else None."""
        ...


class ProjectorBase:
    """``up`` and ``basis`` for every projector, from its ``up_add_``; ``gram`` = PᵀP where it is not exactly I."""

    selects_indices = False
    refreshes_on_shards = False  # the safe default: the optimizer gathers the whole gradient for refresh()
    reads_gradient = True

    def gram(self, state: dict, s: int) -> Tensor | None:
        return None  # a selection of orthonormal basis columns: PᵀP = I exactly

    def up(self, x: Tensor, state: dict, s: int) -> Tensor:
        out = x.new_zeros(s, x.shape[1])
        self.up_add_(out, x, state, 1.0)
        return out

    def basis(self, state: dict, s: int, rank: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The (s, r) basis P of the current subspace, whatever the projector stores."""
        return self.up(torch.eye(rank, dtype=dtype, device=device), state, s)


class StoredBasis(ProjectorBase):
    """A projector that keeps its basis P (s, r) as the tensor ``proj.basis`` (SVD, random)."""

    def down(self, g: Tensor, state: dict) -> Tensor:
        return state["proj.basis"].mT @ g  # (r, s) @ (s, l) -> (r, l)

    def gram(self, state: dict, s: int) -> Tensor:
        basis = state["proj.basis"]
        return basis.mT @ basis  # (r, r): I up to the basis' rounding

    def up_add_(self, out: Tensor, x: Tensor, state: dict, alpha: float) -> None:
        out.addmm_(state["proj.basis"], x, alpha=alpha)  # (s, r) @ (r, l), added in place


class Identity(ProjectorBase):
    """The whole space: down and up are the identity. With it the optimizer is exactly AdamW."""

    refreshes_on_shards, reads_gradient = True, False

    def refresh(self, g: Tensor, rank: int, state: dict, ctx: Context) -> None:
        return None

    def down(self, g: Tensor, state: dict) -> Tensor:
        return g.contiguous()

    def up_add_(self, out: Tensor, x: Tensor, state: dict, alpha: float) -> None:
        out.add_(x, alpha=alpha)

    def basis(self, state: dict, s: int, rank: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.eye(s, dtype=dtype, device=device)


_warned: set[tuple[str, str]] = set()


def warn_once(key: str, name: str, message: str) -> None:
    """Warn once per (kind, parameter) so that a long run's log is not flooded."""
    if (key, name) in _warned:
        return
    _warned.add((key, name))
    warnings.warn(message, RuntimeWarning, stacklevel=3)
