"""One functional Adam for every update: ordinary weights and projected (r, l) moments alike.

Both paths call torch's own fused (or foreach) AdamW kernel, so gradlore's steady step is as fast
as ``torch.optim.AdamW(fused=True)`` plus the projections. For projected moments we want Adam's
*direction* D = m̂ / (√v̂ + ε) rather than an update of a weight: run the kernel on a zero buffer
with lr = 1 and no weight decay, which leaves exactly -D in it.

Rows of different ages (``on_refresh="remap"``: a row born when its basis direction was selected) need
one bias correction per row, c₁ = 1 - β₁^a, c₂ = 1 - β₂^a with a the row's own update count; torch's
kernels take one step count per tensor, so ``adam_directions_by_row`` runs the same update with
foreach ops: m ← β₁m + (1-β₁)g, v ← β₂v + (1-β₂)g², D = (m / c₁) / (√v / √c₂ + ε), row by row.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adamw import adamw as _torch_adamw


def default_fused(tensors: list[Tensor]) -> bool:
    """torch's fused kernel exists for floating tensors on CPU and CUDA."""
    return all(t.device.type in ("cpu", "cuda") and t.is_floating_point() for t in tensors)


def adamw_update_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    fused: bool | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """In place: p ← p(1 - lr·wd) - lr·m̂/(√v̂ + ε); moments and step counters advance.

    ``found_inf`` (a device tensor, fused kernel only): where it is 1.0 nothing changes, without a host sync.
    """
    if not params:
        return
    if fused is None or found_inf is not None:  # only the fused kernel skips on found_inf
        fused = default_fused(params)
    _torch_adamw(
        params, grads, exp_avgs, exp_avg_sqs, [], steps,
        foreach=None if fused else True, fused=fused or None,
        amsgrad=False, beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=False,
        found_inf=found_inf,
    )


def adam_directions(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    fused: bool | None = None,
    found_inf: Tensor | None = None,
) -> list[Tensor]:
    """Advance the moments and return D = m̂/(√v̂ + ε) for each gradient (same shapes; zero when skipped)."""
    bufs = [torch.zeros_like(g) for g in grads]
    adamw_update_(bufs, grads, exp_avgs, exp_avg_sqs, steps, lr=1.0, beta1=beta1, beta2=beta2, eps=eps,
                  weight_decay=0.0, fused=fused, found_inf=found_inf)
    if bufs:
        torch._foreach_neg_(bufs)
    return bufs


def adam_directions_by_row(
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    ages: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    eps: float,
) -> list[Tensor]:
    """As ``adam_directions``, but each row i of a (r, l) moment has its own count ``ages[k][i]`` (r,), advanced here."""
    if not grads:
        return []
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)  # m ← β₁m + (1-β₁)g
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)  # v ← β₂v + (1-β₂)g²
    torch._foreach_add_(ages, 1.0)
    out = []
    for m, v, age in zip(exp_avgs, exp_avg_sqs, ages):
        wide = torch.promote_types(m.dtype, torch.float32)  # bf16 moments: the arithmetic in float32, as torch's kernel
        a = age.double()
        c1 = (1.0 - beta1**a).to(wide)[:, None]  # (r, 1)
        c2_sqrt = (1.0 - beta2**a).sqrt().to(wide)[:, None]
        out.append((m.to(wide) / c1 / (v.to(wide).sqrt() / c2_sqrt + eps)).to(m.dtype))  # (r, l)
    return out


def bias_correction(step: int, beta1: float, beta2: float) -> float:
    """c_t = √(1-β₂ᵗ) / (1-β₁ᵗ): the factor by which m̂/√v̂ exceeds m/√v."""
    return (1.0 - beta2**step) ** 0.5 / (1.0 - beta1**step)
