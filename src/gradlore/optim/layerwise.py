"""Layer-wise updates inside backward (GaLore §4.3): each weight is updated, and its gradient freed,
as soon as its gradient is complete, so at most one layer's gradient is alive at a time.

Works for any optimizer class: one inner optimizer per parameter, driven by a
post-accumulate-grad hook. The wrapper is itself a ``torch.optim.Optimizer`` whose ``param_groups``
are the ones LR schedulers change; every hook copies its group's hyper-parameters to the inner
optimizer before stepping, so schedules work. Gradient accumulation: set ``accumulate = True``
during the non-final micro-batches and the hooks leave the gradients to accumulate.
Not possible in this mode: clipping by the global gradient norm (no moment holds all gradients).

Non-finite gradients: every hook folds its gradient's norm into a running norm of the step (a device
tensor, ``hypot``), and a LowRankAdamW step is told through ``found_inf`` that the running norm is no longer
finite, so a non-finite gradient is never applied, and neither is any gradient after it in the same
backward: no host sync per weight. Weights whose finite gradients came before it are already updated. The
caller reads ``grad_norm()`` once per step (the global norm, as ordinary mode's clipping reports it) and
counts the step as skipped when it is not finite. Another optimizer class is checked on the host per weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from gradlore.optim.lowrank_adamw import LowRankAdamW, param_name, restore_state_dtypes


def _options(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("params", "param_names")}


class LayerwiseOptimizer(Optimizer):
    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        optimizer_cls: type[Optimizer] = LowRankAdamW,
        **defaults: Any,
    ) -> None:
        self.optimizer_cls = optimizer_cls
        self.accumulate = False
        self._norm: Tensor | None = None  # running global gradient norm of this step (device)
        self._inner: dict[Tensor, Optimizer] = {}
        self._handles: list[Any] = []
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        for i, p in enumerate(group["params"]):
            # The same name as the ordinary optimizer would use, so seeded bases agree between the two modes.
            sub = {**_options(group), "params": [p], "param_names": [param_name(group, gi, i)]}
            inner = self.optimizer_cls([sub])
            self._inner[p] = inner
            self.state[p] = inner.state[p]  # one dict, seen by both: state_dict() needs no special case
            self._handles.append(p.register_post_accumulate_grad_hook(self._make_hook(gi)))

    def _make_hook(self, gi: int) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            if self.accumulate or p.grad is None:
                return
            inner = self._inner[p]
            # Read the group now, not when the hook was made: load_state_dict replaces the group dicts, and an
            # LR scheduler writes into the current ones.
            inner.param_groups[0].update(_options(self.param_groups[gi]))
            norm = torch.linalg.vector_norm(p.grad, dtype=torch.promote_types(p.grad.dtype, torch.float32))
            if isinstance(norm, DTensor):  # FSDP2: the norm of the whole gradient, the same on every rank
                norm = norm.full_tensor()
            self._norm = norm if self._norm is None else torch.hypot(self._norm, norm.to(self._norm.device))
            bad = ~torch.isfinite(self._norm.to(p.device))  # this gradient, or one before it, is not finite
            if isinstance(inner, LowRankAdamW):
                inner.found_inf = bad.float()
                inner.step()
            elif not bool(bad):
                inner.step()
            p.grad = None

        return hook

    def grad_norm(self) -> float:
        """The global norm of the gradients stepped since ``zero_grad`` (one host read; NaN if none)."""
        return float("nan") if self._norm is None else float(self._norm)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._norm = None

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Updates already happened inside backward; this only evaluates the closure."""
        if closure is not None:
            with torch.enable_grad():
                return closure()
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        restore_state_dtypes(self, state_dict)
        for p, inner in self._inner.items():
            inner.state[p] = self.state[p]

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def layerwise(params: Iterable[Tensor] | Iterable[dict], optimizer_cls: type[Optimizer] = LowRankAdamW,
              **defaults: Any) -> LayerwiseOptimizer:
    """``gradlore.layerwise(groups, lr=1e-3)``: LowRankAdamW (or any optimizer) stepping inside backward."""
    return LayerwiseOptimizer(params, optimizer_cls, **defaults)
