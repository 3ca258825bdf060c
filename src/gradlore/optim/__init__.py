"""The optimizer family: LowRankAdamW, its parts, group builders and the layer-wise wrapper."""

from __future__ import annotations

from torch import Tensor
from torch.optim import Optimizer

from gradlore.optim.lowrank_adamw import LowRankAdamW


def state_bytes(optimizer: Optimizer, *, include_shared: bool = True) -> int:
    """Bytes really retained by ``optimizer.state``: each distinct storage counted once, in full.

    A view that keeps a larger tensor alive (galore-torch's projection matrices are views of the
    whole SVD factor) is charged for the whole storage. With ``include_shared`` the DCT bases that
    gradlore shares across layers are added once.
    """
    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                storage = value.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    if include_shared:
        from gradlore.projectors.dct import shared_bytes

        total += shared_bytes()
    return total


__all__ = ["LowRankAdamW", "state_bytes"]
