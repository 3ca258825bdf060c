"""The optimizer family: LowRankAdamW, its parts, group builders and the layer-wise wrapper."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from gradlore.optim.lowrank_adamw import LowRankAdamW


def state_bytes(optimizer: Optimizer, *, include_shared: bool = True) -> int:
    """Bytes really retained by ``optimizer.state``: each distinct storage counted once, in full.

    Works for any optimizer: it walks dicts, lists and the attributes of objects kept in the state
    (the peers keep projector objects there). A view that keeps a larger tensor alive (galore-torch's
    projection matrices are views of the whole SVD factor) is charged for the whole storage. With
    ``include_shared`` the DCT bases that its DCT-projected weights share (one per size) are added once.
    """
    seen: set[int] = set()
    total = 0
    stack: list[Any] = list(optimizer.state.values())
    visited: set[int] = set()
    while stack:
        value = stack.pop()
        if isinstance(value, Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif id(value) in visited:
            continue
        elif isinstance(value, dict):
            visited.add(id(value))
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            visited.add(id(value))
            stack.extend(value)
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            visited.add(id(value))
            stack.extend(vars(value).values())
    if include_shared:
        from gradlore.projectors.dct import shared_bytes

        total += shared_bytes(_dct_sizes(optimizer))
    return total


def _dct_sizes(optimizer: Optimizer) -> set[int]:
    """Basis sizes this optimizer's DCT-projected weights use (their shorter side)."""
    sizes = set()
    for group in getattr(optimizer, "param_groups", []):
        if group.get("projector") == "dct":
            sizes.update(min(p.shape) for p in group["params"] if "proj.indices" in optimizer.state.get(p, {}))
    return sizes


__all__ = ["LowRankAdamW", "state_bytes"]
