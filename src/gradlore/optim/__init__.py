"""The optimizer family: LowRankAdamW, its parts and presets, group builders, the layer-wise wrapper, state bytes."""

from __future__ import annotations

from gradlore.optim.groups import param_groups
from gradlore.optim.layerwise import LayerwiseOptimizer, layerwise
from gradlore.optim.lowrank_adamw import LowRankAdamW
from gradlore.optim.state import state_bytes

__all__ = ["LayerwiseOptimizer", "LowRankAdamW", "layerwise", "param_groups", "state_bytes"]
