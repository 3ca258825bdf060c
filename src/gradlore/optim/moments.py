"""What a refresh does to the projected Adam moments (r, l): each policy is a part (``on_refresh``).

- ``keep`` (GaLore): the moments stay as they are; row k now describes the new basis direction k.
- ``reset`` (FRUGAL, arXiv 2411.07837): moments and Adam's step count restart from zero at every refresh
  after the first, so no statistic of the old subspace leaks into the new one. It zeroes every ``exp_avg*``
  tensor, which resets the moments of every state format (``gradlore.optim.formats``).

A policy is called right after the projector chose the new subspace, with ``before`` (the projector's
``proj.*`` state tensors before the refresh; empty at the first refresh) and the projector itself.
"""

from __future__ import annotations

from gradlore.projectors.base import Projector


class Keep:
    def refreshed(self, state: dict, before: dict, projector: Projector) -> None:
        return None


class Reset:
    def refreshed(self, state: dict, before: dict, projector: Projector) -> None:
        for key, value in state.items():
            if key.startswith("exp_avg") or key == "step":
                value.zero_()
