"""What a refresh does to the projected Adam moments (r, l), and how they turn into Adam's direction.

Each policy is a part (``on_refresh``):

- ``keep`` (GaLore, arXiv 2403.03507): the moments stay as they are; row k now describes the new basis
  direction k, whatever direction it described before.
- ``reset`` (FRUGAL, arXiv 2411.07837): moments and Adam's step count restart from zero at every refresh
  after the first, so no statistic of the old subspace leaks into the new one. It zeroes every ``exp_avg*``
  tensor, which resets the moments of every state format (``gradlore.optim.formats``).
- ``remap`` (the SVD-free method as its authors run it, arXiv 2505.17967): for projectors that select
  basis indices (``projector.selects_indices``: ``dct``, ``columns``), each moment row moves with its basis
  index; rows of newly selected indices start at zero. With old indices I and new ones J,

      m_new[j] = m_old[i] if I[i] = J[j] else 0,    likewise v (and the row's age, below).

  This is exactly the authors' "rotation" m ← m·R, v ← |v·R| with R = Q_Iᵀ Q_J (r, r): Q is orthonormal,
  so R[i, j] = δ(I[i], J[j]) and the product only moves rows. We do not even move them: with this policy the
  projector keeps a re-selected index at its position in ``proj.indices`` and puts the new indices at the
  positions of the dropped ones (``gradlore.projectors.dct.stable_order``; the row order of m, v, R and the
  basis columns is one and the same, so it changes nothing in the math). A refresh then only zeroes the rows
  whose index is new: no matmul, no float rounding leaking into R's zeros, no (r, l) copy.

  Bias correction of a new row (``remap_bias``). Adam divides by c₁ = 1-β₁ᵗ and c₂ = 1-β₂ᵗ because a
  moment that started at zero t steps ago holds only that much of its weight. A row born a steps ago
  started at zero a steps ago, so its exact correction uses a, not the tensor's count t:
  - ``row``: each row keeps its age a (``remap.age``, (r,) float32) and is corrected exactly;
    a new row's first direction is g/(|g|+ε), as Adam's first step, and a row that was never replaced is
    corrected exactly as before. The fused kernel takes one count per tensor, so these directions come from
    foreach ops (``gradlore.optim.adam.adam_directions_by_row``).
  - ``global``: one count per tensor, as the authors' ``DCTAdamW`` (its step counter is global) and torch's
    fused kernel. Once t ≫ a (c ≈ 1) a row of age a gets m/√v where Adam gets (m/(1-β₁ᵃ))/√(v/(1-β₂ᵃ)):
    its direction is (1-β₁ᵃ)/√(1-β₂ᵃ) times Adam's, whatever the gradient (for v in expectation). With
    β = (0.9, 0.999) that factor is 3.2 at a = 1, peaks at 6.6 at a = 12, is 3.2 at a = 100 and 1.3 at
    a = 1000: young rows take steps several times larger than the rows that stayed. With per-step
    refresh a large share of the rows is young at any time.
  ``global`` is the default: it is the published rule, runs in the fused kernel, and measured better, not worse
  (issue 9's benchmark: 3–4 % lower perplexity than ``row`` at α 0.25 over 3 seeds, a tie at α 1); the
  larger steps of young rows seem to help newly selected directions catch up.
  ``remap`` zeroes rows of ``fp32`` moments only (a quantized block spans rows); ``normalize_group`` refuses
  another state format.

A policy is called right after the projector chose the new subspace, with ``before`` (the projector's
``proj.*`` state tensors before the refresh; empty at the first refresh) and the projector itself; then,
every step, ``directions`` turns the projected gradients into Adam's directions D = m̂/(√v̂ + ε).
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradlore.optim.adam import adam_directions, adam_directions_by_row
from gradlore.optim.formats import Full, Hyper, adam_direction, step_counter
from gradlore.projectors.base import Projector

FP32 = Full()


class Policy:
    """Moments with one step count per tensor, updated by torch's fused AdamW kernel."""

    needs_indices = False  # True: legal only with a projector whose state is basis indices
    stable_slots = False  # True: the projector keeps a re-selected index at its position (row) in the state

    def refreshed(self, state: dict, before: dict, projector: Projector) -> None:
        return None

    def directions(self, rs: list[Tensor], states: list[dict], betas: tuple[float, float], eps: float,
                   fused: bool | None, fmt: Full = FP32, found_inf: Tensor | None = None) -> list[Tensor]:
        """Advance each state's moments (kept in ``fmt``) with its projected gradient R (r, l) and return D (r, l).

        ``found_inf`` (a 0-dim device tensor): where it is 1.0 no moment or count changes and D is zero.
        """
        if not fmt.kernel_path:
            hp = Hyper(1.0, betas[0], betas[1], eps, 0.0, fused)
            return [adam_direction(fmt, r, s, hp, found_inf) for r, s in zip(rs, states)]
        for r, s in zip(rs, states):  # fp32 moments: one fused call for every weight of the batch
            fmt.init_(s, r, r.dtype)
            step_counter(s, r.device)
        return adam_directions(rs, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                               [s["step"] for s in states], beta1=betas[0], beta2=betas[1], eps=eps, fused=fused,
                               found_inf=found_inf)


class Keep(Policy):
    pass


class Reset(Policy):
    def refreshed(self, state: dict, before: dict, projector: Projector) -> None:
        for key, value in state.items():
            if key.startswith("exp_avg") or key == "step":
                value.zero_()


class Remap(Policy):
    """Moment rows follow their basis index across a refresh; new rows start at zero (see the module doc)."""

    needs_indices = True
    stable_slots = True

    def __init__(self, remap_bias: str = "row") -> None:
        self.by_row = remap_bias == "row"

    def refreshed(self, state: dict, before: dict, projector: Projector) -> None:
        if "exp_avg" not in state:
            return
        # The projector kept every re-selected index at its position (``stable_slots``), so a row that follows its
        # index stays where it is: only the rows whose index is new change, to zero.
        fresh = before["proj.indices"] != state["proj.indices"]  # (r,)
        keys = ["exp_avg", "exp_avg_sq"] + (["remap.age"] if "remap.age" in state else [])
        if fresh.device.type == "cpu":  # write the new rows only (finding them is no host sync on the CPU)
            rows = fresh.nonzero().squeeze(1)
            for key in keys:
                state[key].index_fill_(0, rows, 0)
        else:  # a broadcast mask: no nonzero(), so no host sync on a GPU
            for key in keys:
                state[key].masked_fill_(fresh.view(-1, *(1,) * (state[key].dim() - 1)), 0)

    def directions(self, rs: list[Tensor], states: list[dict], betas: tuple[float, float], eps: float,
                   fused: bool | None, fmt: Full = FP32, found_inf: Tensor | None = None) -> list[Tensor]:
        if not self.by_row:
            return super().directions(rs, states, betas, eps, fused, fmt, found_inf)
        for r, s in zip(rs, states):  # fmt is fp32 (normalize_group)
            fmt.init_(s, r, r.dtype)
            step_counter(s, r.device)
            if "remap.age" not in s:
                s["remap.age"] = torch.zeros(r.shape[0], dtype=torch.float32, device=r.device)  # (r,)
        keys = ("exp_avg", "exp_avg_sq", "remap.age")
        before = [{k: s[k].clone() for k in keys} for s in states] if found_inf is not None else []
        out = adam_directions_by_row(rs, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                                     [s["remap.age"] for s in states], beta1=betas[0], beta2=betas[1], eps=eps)
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)  # the tensor's count still advances (Fira reads it)
        if found_inf is not None:  # a skipped step: every moment, age and count as it was, D = 0 (no host sync)
            skip = found_inf.bool()
            for s, old in zip(states, before):
                for k in keys:
                    s[k].copy_(torch.where(skip, old[k], s[k]))
            torch._foreach_sub_(steps, found_inf)
            for d in out:
                d.masked_fill_(skip, 0.0)
        return out
