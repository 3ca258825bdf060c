"""Gradient-rank analysis over training (arXiv 2407.11239, "From GaLore to WeLore").

`stats` holds pure functions (stable rank ‖G‖_F²/‖G‖₂², effective rank, principal-angle cosines between
gradient subspaces), `recorder.GradientRecorder` measures them per layer during a run and writes JSONL,
`plot` draws them by layer type, and `cli` adds `gradlore analyze`.
"""

from __future__ import annotations

from gradlore.analysis.recorder import GradientRecorder, read_records
from gradlore.analysis.stats import (
    effective_rank,
    energy_rank,
    stable_rank,
    subspace_basis,
    subspace_cosine,
    top_singular_values,
)

__all__ = [
    "GradientRecorder",
    "effective_rank",
    "energy_rank",
    "read_records",
    "stable_rank",
    "subspace_basis",
    "subspace_cosine",
    "top_singular_values",
]
