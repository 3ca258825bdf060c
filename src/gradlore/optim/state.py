"""What an optimizer's state really retains, in bytes: the one counter for the driver, benchmarks and tests.

Every tensor reachable from ``optimizer.state`` is found, walking dicts, lists and the attributes of
objects kept there (the peers keep projector objects in their state), and reduced to its *storage*;
each storage is counted once, in full. So a view that keeps a larger tensor alive (galore-torch's
projection matrices are views of the whole SVD factor) is charged for the whole storage, and a
parameter or gradient that a state happens to reference is not charged at all. A sharded tensor (DTensor,
FSDP2) is charged for its local piece: what this process retains.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from gradlore.projectors import DCT_BASES

_ATOMS = (str, bytes, int, float, bool, complex, type(None))


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def walk_tensors(obj: Any) -> list[Tensor]:
    """Every tensor reachable from ``obj`` through containers and plain objects' attributes."""
    out: list[Tensor] = []
    seen: set[int] = set()
    stack = [obj]
    while stack:
        value = stack.pop()
        if id(value) in seen or isinstance(value, _ATOMS):
            continue
        seen.add(id(value))
        if isinstance(value, Tensor):
            out.append(_local(value))
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend(value)
        elif isinstance(value, (nn.Module, Optimizer, type)) or callable(value):
            continue  # a model, an optimizer or a function reachable from state is not state
        else:
            stack.extend(getattr(value, "__dict__", {}).values())
            stack.extend(getattr(value, s) for s in getattr(type(value), "__slots__", ()) if hasattr(value, s))
    return out


def _storage(t: Tensor) -> tuple[str, int, int]:
    s = t.untyped_storage()
    return str(t.device), s.data_ptr(), s.nbytes()


def retained_bytes(obj: Any, exclude: list[Tensor] | tuple[Tensor, ...] = ()) -> int:
    """Bytes of the distinct storages reachable from ``obj``, each in full; ``exclude``: not state."""
    excluded = {_storage(t) for t in exclude if t is not None}
    found = {_storage(t) for t in walk_tensors(obj) if t.device.type != "meta"}
    return sum(key[2] for key in found - excluded)


def dct_sizes(optimizer: Optimizer) -> set[int]:
    """Basis sizes this optimizer's DCT-projected weights use (their shorter side)."""
    sizes = set()
    for group in getattr(optimizer, "param_groups", []):
        if group.get("projector") == "dct":
            sizes.update(min(p.shape) for p in group["params"] if "proj.indices" in optimizer.state.get(p, {}))
    return sizes


def state_bytes(optimizer: Optimizer, *, include_shared: bool = True) -> int:
    """Bytes really retained by ``optimizer.state`` (any optimizer), parameters and gradients not counted.

    With ``include_shared`` the DCT bases that its DCT-projected weights share (one per size, held by
    ``gradlore.projectors.DCT_BASES``) are added once.
    """
    params = [p for g in getattr(optimizer, "param_groups", []) for p in g["params"]]
    exclude = [_local(t) for p in params for t in (p, p.grad) if t is not None]
    total = retained_bytes(dict(optimizer.state), exclude)
    return total + (DCT_BASES.nbytes(dct_sizes(optimizer)) if include_shared else 0)


def state_kind(key: Any) -> str:
    """What a state entry is: ``moments`` (Adam's m and v in any format), ``projector`` (bases, indices,
    int4 codes), or ``other`` (step counters, refresh clocks, Fira's norm, rounding counters)."""
    key = str(key)
    return "moments" if key.startswith("exp_avg") else "projector" if key.startswith("proj") else "other"


def state_bytes_by_kind(optimizer: Optimizer, *, include_shared: bool = True) -> dict[str, dict[str, int]]:
    """``state_bytes`` split by kind (``state_kind``) and dtype: {kind: {dtype: bytes}}; the shared DCT bases
    count as ``projector``. Each storage is counted once, under the first entry that reaches it."""
    params = [p for g in getattr(optimizer, "param_groups", []) for p in g["params"]]
    seen = {_storage(_local(t)) for t in params + [p.grad for p in params if p.grad is not None]}  # FSDP2: local
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for state in list(optimizer.state.values()):
        for key, value in (state.items() if isinstance(state, dict) else [("other", state)]):
            for t in map(_local, walk_tensors(value)):
                storage = _storage(t)
                if t.device.type == "meta" or storage in seen:
                    continue
                seen.add(storage)
                out[state_kind(key)][str(t.dtype).removeprefix("torch.")] += storage[2]
    if include_shared and (shared := DCT_BASES.nbytes(dct_sizes(optimizer))):
        out["projector"]["float32 (shared DCT bases)"] += shared
    return {kind: dict(by_dtype) for kind, by_dtype in out.items()}
