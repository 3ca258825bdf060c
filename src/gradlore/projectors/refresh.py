"""When to recompute the subspace.

- ``every``: every ``update_proj_gap`` steps, starting at step 0 (GaLore).
- ``lazy`` (Q-GaLore, arXiv 2407.08296): at each scheduled refresh, measure how much the new
  subspace overlaps the old one, overlap = ‖P_oldᵀ P_new‖²_F / r ∈ [0, 1] (1: same subspace;
  Q-GaLore uses the cosine of the leading singular vector, a special case). When the mean overlap of
  the last ``lazy_window`` refreshes reaches ``lazy_threshold``, the gap is multiplied by
  ``lazy_growth``: stable layers are refreshed ever more rarely, saving SVDs.
State (tensors): ``proj.next`` the step of the next refresh, ``proj.gap`` the current gap,
``proj.overlaps`` the recent overlaps.
"""

from __future__ import annotations

import torch
from torch import Tensor

REFRESH = ("every", "lazy")


def due(state: dict, t: int) -> bool:
    return "proj.next" not in state or t >= int(state["proj.next"])


def basis_matrix(projector, state: dict, s: int, rank: int, dtype: torch.dtype) -> Tensor:
    """The (s, r) orthonormal basis of the current subspace, whatever the projector stores."""
    return projector.up(torch.eye(rank, dtype=dtype, device=state_device(state)), state, s)


def state_device(state: dict) -> torch.device:
    for v in state.values():
        if isinstance(v, Tensor):
            return v.device
    return torch.device("cpu")


def schedule_next(state: dict, group: dict, t: int, overlap: float | None) -> None:
    """Record the refresh at step t and set the next one."""
    gap = int(state["proj.gap"]) if "proj.gap" in state else group["update_proj_gap"]
    if group.get("refresh", "every") == "lazy" and overlap is not None:
        window = group.get("lazy_window", 5)
        hist = state.get("proj.overlaps", torch.zeros(0, dtype=torch.float32))
        hist = torch.cat([hist, torch.tensor([overlap], dtype=torch.float32)])[-window:]
        state["proj.overlaps"] = hist
        if len(hist) == window and float(hist.mean()) >= group.get("lazy_threshold", 0.4):
            gap = int(gap * group.get("lazy_growth", 2))
            state["proj.overlaps"] = hist[:0]  # judge the new gap afresh
    if group.get("refresh", "every") == "lazy":
        state["proj.gap"] = torch.tensor(gap, dtype=torch.int64)
    state["proj.next"] = torch.tensor(t + gap, dtype=torch.int64)
