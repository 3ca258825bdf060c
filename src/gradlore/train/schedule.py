"""Learning-rate schedule: linear warmup, then cosine decay to a floor (GaLore, arXiv:2403.03507, §5.1).

With peak η, warmup W steps, S steps in total and floor ratio ρ, the multiplier at step t (0-based) is

    f(t) = (t+1)/W                                          t < W
    f(t) = ρ + (1-ρ)·½·(1 + cos(π·min(1, (t-W)/(S-W))))     t ≥ W

and the LR is η·f(t). The multiplier is a callable object of plain numbers, so ``LambdaLR.state_dict()``
saves it (and loads with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import math

import torch


class WarmupCosine:
    """Multiplier f(t) of the schedule above."""

    def __init__(self, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = int(warmup), int(total), float(min_ratio)

    def __call__(self, t: int) -> float:
        if t < self.warmup:
            return (t + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (t - self.warmup) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                  min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` with :class:`WarmupCosine` for every parameter group."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total, min_ratio))
