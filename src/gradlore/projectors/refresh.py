"""Refresh rules: when to recompute a weight's subspace. Each rule is a part with its own options and state.

- ``every`` (GaLore, arXiv 2403.03507): at steps 0, N, 2N, … with N = ``update_proj_gap``.
- ``lazy`` (Q-GaLore, arXiv 2407.08296): as ``every``, but at each refresh it measures how much the new
  subspace overlaps the old one, overlap = ‖P_oldᵀ P_new‖²_F / r ∈ [0, 1] (1: the same subspace;
  Q-GaLore uses the cosine of the leading singular vector, a special case). When the mean overlap of
  the last ``lazy_window`` refreshes reaches ``lazy_threshold`` the gap is multiplied by
  ``lazy_growth``: stable layers are refreshed ever more rarely, saving SVDs.

State, as CPU tensors (reading them never waits for an accelerator): ``refresh.t`` the weight's projected
step count, ``refresh.next`` the step of its next refresh; ``lazy`` adds ``refresh.gap`` (its current gap) and
``refresh.overlaps`` (recent overlaps).
"""

from __future__ import annotations

import torch


def clock(state: dict) -> int:
    """The weight's projected step count (a CPU tensor, so no device sync)."""
    if "refresh.t" not in state:
        state["refresh.t"] = torch.zeros((), dtype=torch.int64)
    return int(state["refresh.t"])


class Every:
    """Refresh every ``update_proj_gap`` steps, starting at step 0."""

    wants_overlap = False

    def __init__(self, update_proj_gap: int) -> None:
        self.gap = update_proj_gap

    def due(self, state: dict) -> bool:
        return "refresh.next" not in state or clock(state) >= int(state["refresh.next"])

    def refreshed(self, state: dict, overlap: float | None) -> None:
        """Called right after a refresh at the current clock: schedule the next one."""
        state["refresh.next"] = torch.tensor(clock(state) + self.current_gap(state), dtype=torch.int64)

    def current_gap(self, state: dict) -> int:
        return self.gap

    @staticmethod
    def tick(state: dict) -> None:
        state["refresh.t"] += 1


class Lazy(Every):
    """Q-GaLore's adaptive gap: grow it while consecutive subspaces keep overlapping."""

    wants_overlap = True

    def __init__(self, update_proj_gap: int, lazy_threshold: float, lazy_window: int, lazy_growth: float) -> None:
        super().__init__(update_proj_gap)
        self.threshold, self.window, self.growth = lazy_threshold, lazy_window, lazy_growth

    def current_gap(self, state: dict) -> int:
        return int(state["refresh.gap"]) if "refresh.gap" in state else self.gap

    def refreshed(self, state: dict, overlap: float | None) -> None:
        gap = self.current_gap(state)
        if overlap is not None:
            hist = state.get("refresh.overlaps", torch.zeros(0, dtype=torch.float32))
            hist = torch.cat([hist, torch.tensor([overlap], dtype=torch.float32)])[-self.window:]
            state["refresh.overlaps"] = hist
            if len(hist) == self.window and float(hist.mean()) >= self.threshold:
                gap = int(gap * self.growth)
                state["refresh.overlaps"] = hist[:0]  # judge the new gap afresh
        state["refresh.gap"] = torch.tensor(gap, dtype=torch.int64)
        super().refreshed(state, overlap)
