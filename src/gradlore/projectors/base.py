"""The projector protocol, orientation, and the identity projector.

A projector maps an oriented gradient ``G`` of shape (s, l), s <= l, to a rank-r coordinate
matrix ``R = down(G)`` of shape (r, l) and maps Adam's direction back with ``up``: (r, l) -> (s, l).
Everything a projector remembers between steps lives in the parameter's optimizer state as
tensors under ``proj.*`` keys, so ``state_dict()`` holds no Python objects (DESIGN principle 4).
"""

from __future__ import annotations

import warnings
from typing import Protocol

import torch
from torch import Tensor


def is_transposed(shape: torch.Size | tuple[int, ...]) -> bool:
    """GaLore's ``std`` orientation: rows >= cols projects on the right, i.e. we work on Gᵀ."""
    return shape[0] >= shape[1]


def orient(g: Tensor) -> Tensor:
    """View a 2-D gradient (m, n) as (s, l) with the shorter side first (no copy)."""
    return g.mT if is_transposed(g.shape) else g


class Projector(Protocol):
    """Maps (s, l) gradients to (r, l) coordinates and back. State lives in ``state`` (tensors only)."""

    def refresh(
        self, g: Tensor, rank: int, state: dict, *, transposed: bool, name: str, seed: int
    ) -> Tensor | None:
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


class ProjectorBase:
    """``up`` for every projector, from its ``up_add_``; ``gram`` = PᵀP where it is not exactly I."""

    def gram(self, state: dict) -> Tensor | None:
        return None  # a selection of orthonormal basis columns: PᵀP = I exactly

    def up(self, x: Tensor, state: dict, s: int) -> Tensor:
        out = x.new_zeros(s, x.shape[1])
        self.up_add_(out, x, state, 1.0)
        return out


class Identity(ProjectorBase):
    """The whole space: down and up are the identity. With it the optimizer is exactly AdamW."""

    def refresh(self, g, rank, state, *, transposed, name, seed):
        return None

    def down(self, g: Tensor, state: dict) -> Tensor:
        return g.contiguous()

    def up_add_(self, out: Tensor, x: Tensor, state: dict, alpha: float) -> None:
        out.add_(x, alpha=alpha)


_warned: set[tuple[str, str]] = set()


def warn_once(key: str, name: str, message: str) -> None:
    """Warn once per (kind, parameter) so that a long run's log is not flooded."""
    if (key, name) in _warned:
        return
    _warned.add((key, name))
    warnings.warn(message, RuntimeWarning, stacklevel=3)
