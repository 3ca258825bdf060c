"""Projectors: the subspace a gradient is projected onto. Registration is explicit, one line each."""

from __future__ import annotations

from gradlore.projectors.base import Identity, Projector, is_transposed, orient
from gradlore.projectors.dct import SelectProjector, dct_basis
from gradlore.projectors.random import RandomProjector
from gradlore.projectors.svd import SVDProjector

PROJECTORS = {
    "svd": lambda group: SVDProjector(),
    "dct": lambda group: SelectProjector("dct", group.get("dct_norm", "l1"), group.get("dct_method", "auto")),
    "columns": lambda group: SelectProjector("identity", group.get("dct_norm", "l1")),
    "random": lambda group: RandomProjector(),
    "identity": lambda group: Identity(),
}

__all__ = ["PROJECTORS", "Identity", "Projector", "dct_basis", "is_transposed", "orient"]
