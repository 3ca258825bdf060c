"""LowRankAdamW: one optimizer for GaLore, SVD-free DCT, Fira and FRUGAL (and their mixtures).

For a 2-D weight W (m, n) in a group that carries ``rank``:

    G ← orient(∇W)                      (s, l), s = min(m, n)        GaLore's "std" orientation
    every update_proj_gap steps: choose the subspace P from G         (projector: svd | dct | ...)
    R = Pᵀ G                            (r, l)
    D = Adam(R) = m̂ / (√v̂ + ε)          (r, l), torch's fused kernel
    W ← W · (1 - lr·wd)                 decoupled weight decay, *before* the update
    W ← W - lr · (scale · P D + residual(G - P R))                    (residual: discard | fira | sign)

Groups without ``rank`` are plain AdamW (same fused kernel), as in galore-torch and Hugging Face.
Weight decay is applied to the weight before the update, as torch.optim.AdamW does; galore-torch
and fira apply it after the update (to the updated weight), a difference of O(lr²·wd).
State holds only tensors: ``step``, ``exp_avg``, ``exp_avg_sq``, ``proj.t`` (the refresh clock),
``proj.next`` (next refresh), ``proj.basis`` or ``proj.indices``, ``fira.prev_norm``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from gradlore.errors import UserError
from gradlore.optim.adam import adam_directions, adamw_update_
from gradlore.optim.residual import RESIDUALS
from gradlore.projectors import PROJECTORS, is_transposed
from gradlore.projectors.refresh import REFRESH, basis_matrix, due, schedule_next

# Keys of a projected group and their defaults (GaLore's, with Fira's "alpha" read as "scale").
PROJECTED_DEFAULTS: dict[str, Any] = {
    "update_proj_gap": 200,
    "scale": 0.25,
    "projector": "svd",
    "residual": "discard",
    "on_refresh": "keep",  # "reset": zero the moments when the subspace changes (FRUGAL)
    "refresh": "every",  # "lazy": Q-GaLore's adaptive gap
    "proj_type": "std",
    "seed": 0,
}
ON_REFRESH = ("keep", "reset")
DCT_METHODS = ("auto", "matmul", "fft", "scipy")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def normalize_group(group: dict, where: str) -> dict:
    """Fill defaults and validate a projected group's keys; plain groups pass through."""
    if "alpha" in group:  # Fira's name for the scale
        alpha = group.pop("alpha")
        if "scale" in group and group["scale"] != alpha:
            raise UserError(f"{where}: both 'scale'={group['scale']} and its alias 'alpha'={alpha} are set; "
                            "give only one of them.")
        group["scale"] = alpha
    if "rank" not in group:
        return group
    for key, value in PROJECTED_DEFAULTS.items():
        group.setdefault(key, value)
    rank, residual = group["rank"], group["residual"]
    if residual not in RESIDUALS:
        raise UserError(f"{where}: unknown residual {residual!r}; valid: {', '.join(RESIDUALS)}.")
    if not _is_int(rank) or rank < 0 or (rank == 0 and residual != "sign"):
        raise UserError(f"{where}: rank must be a positive integer, got {rank!r}. Fix: pass e.g. rank=128 "
                        "(rank 0 is allowed only with residual='sign', i.e. pure signSGD).")
    if group["projector"] not in PROJECTORS:
        raise UserError(f"{where}: unknown projector {group['projector']!r}; valid: {', '.join(PROJECTORS)}.")
    if group["proj_type"] != "std":
        raise UserError(f"{where}: proj_type={group['proj_type']!r} is not supported; gradlore always projects "
                        "the shorter side (galore's 'std'). Remove the key or set proj_type='std'.")
    if not _is_int(group["update_proj_gap"]) or group["update_proj_gap"] < 1:
        raise UserError(f"{where}: update_proj_gap must be a positive integer, got {group['update_proj_gap']!r}.")
    if not isinstance(group["scale"], (int, float)) or isinstance(group["scale"], bool):
        raise UserError(f"{where}: scale must be a number, got {group['scale']!r}.")
    if group["refresh"] not in REFRESH:
        raise UserError(f"{where}: refresh must be one of {REFRESH}, got {group['refresh']!r}.")
    if group.get("dct_method", "auto") not in DCT_METHODS:
        raise UserError(f"{where}: dct_method must be one of {DCT_METHODS}, got {group['dct_method']!r}.")
    if group["on_refresh"] not in ON_REFRESH:
        raise UserError(f"{where}: on_refresh must be one of {ON_REFRESH}, got {group['on_refresh']!r}.")
    return group


def projects(group: dict, p: Tensor) -> bool:
    """Whether p is trained in a subspace: a projected group, a 2-D weight, rank below its shorter side."""
    return "rank" in group and p.dim() == 2 and group["rank"] < min(p.shape)


def param_name(group: dict, i: int) -> str:
    names = group.get("param_names")
    return names[i] if names else f"param {i} {tuple(group['params'][i].shape)}"


def restore_state_dtypes(optimizer: Optimizer, state_dict: dict) -> None:
    """Undo ``Optimizer.load_state_dict``'s cast of every non-step state tensor to the parameter dtype.

    That policy would turn projection indices into floats and round float32 statistics of bf16
    weights to bf16; we keep each saved tensor's dtype and move it to the parameter's device.
    """
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    by_id = dict(zip(saved_ids, params))
    for pid, saved in state_dict["state"].items():
        p = by_id[pid]
        for key, value in saved.items():
            if key != "step" and isinstance(value, Tensor) and value.dtype != optimizer.state[p][key].dtype:
                optimizer.state[p][key] = value.detach().to(device=p.device, copy=True)


class LowRankAdamW(Optimizer):
    """AdamW whose groups with a ``rank`` key train 2-D weights in a refreshed rank-r subspace.

    Args:
        params: parameters or groups. Projected-group keys: ``rank``, ``update_proj_gap`` (200),
            ``scale`` (0.25; alias ``alpha``), ``projector`` ("svd", "dct", "columns", "random",
            "identity"), ``residual`` ("discard", "fira", "sign"), ``on_refresh`` ("keep", "reset"),
            ``refresh`` ("every", "lazy" with ``lazy_threshold`` 0.4, ``lazy_window`` 5,
            ``lazy_growth`` 2), ``residual_lr_ratio`` (sign rule, 1.0), ``fira_gamma`` (1.01), ``dct_norm`` ("l1"/"l2"),
            ``dct_method`` ("auto", "matmul", "fft", "scipy"), ``seed`` (random projector), ``proj_type`` ("std").
        lr, betas, eps, weight_decay: as torch.optim.AdamW (weight decay decoupled, before the update).
        fused: use torch's fused AdamW kernel (default: wherever it exists).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        fused: bool | None = None,
    ) -> None:
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise UserError(f"lr must be a non-negative number, got {lr!r}.")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise UserError(f"betas must lie in [0, 1), got {betas!r}.")
        if eps < 0 or weight_decay < 0:
            raise UserError(f"eps and weight_decay must be >= 0, got eps={eps!r}, weight_decay={weight_decay!r}.")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        where = f"param group {len(self.param_groups)}"
        super().add_param_group(normalize_group(dict(param_group), where))
        group = self.param_groups[-1]
        if "rank" in group:
            plain = [param_name(group, i) for i, p in enumerate(group["params"]) if not projects(group, p)]
            if plain:
                warnings.warn(f"gradlore: {where} has rank={group['rank']}, but these parameters are not 2-D or "
                              f"have a shorter side <= rank, so they train as plain AdamW: {', '.join(plain)}",
                              UserWarning, stacklevel=3)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        restore_state_dtypes(self, state_dict)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            plain, projected = [], []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise UserError("LowRankAdamW does not support sparse gradients; use torch.optim.SparseAdam.")
                (projected if projects(group, p) else plain).append(i)
            self._plain_step(group, [group["params"][i] for i in plain])
            if projected:
                self._projected_step(gi, group, projected)
        return loss

    def _moments(self, p: Tensor, like: Tensor) -> dict:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(like, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(like, memory_format=torch.preserve_format)
        return state

    def _plain_step(self, group: dict, params: list[Tensor]) -> None:
        states = [self._moments(p, p) for p in params]
        beta1, beta2 = group["betas"]
        adamw_update_(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], fused=group["fused"],
        )

    def _projected_step(self, gi: int, group: dict, indices: list[int]) -> None:
        projector = PROJECTORS[group["projector"]](group)
        rule = RESIDUALS[group["residual"]]
        rank, lazy = group["rank"], group["refresh"] == "lazy"
        work = []  # (param, oriented grad (s, l), transposed, R (r, l), state)
        for i in indices:
            p = group["params"][i]
            state = self.state[p]
            transposed = is_transposed(p.shape)
            g = p.grad.mT if transposed else p.grad  # (s, l) view, no copy
            if "proj.t" not in state:
                state["proj.t"] = torch.zeros((), dtype=torch.int64)
            t = int(state["proj.t"])
            r = None
            if due(state, t):
                old = basis_matrix(projector, state, g.shape[0], rank, g.dtype) if lazy and t > 0 else None
                seed = (group["seed"] * 1_000_003 + gi * 10_007 + i) * 1_000_033 + t
                r = projector.refresh(g, rank, state, transposed=transposed, name=param_name(group, i),
                                      seed=seed % (2**63))
                overlap = None
                if old is not None:
                    new = basis_matrix(projector, state, g.shape[0], rank, g.dtype)
                    overlap = float((old.mT @ new).square().sum()) / rank
                schedule_next(state, group, t, overlap)
                if t > 0 and group["on_refresh"] == "reset" and "exp_avg" in state:
                    state["exp_avg"].zero_()
                    state["exp_avg_sq"].zero_()
                    state["step"].zero_()
            if r is None:
                r = projector.down(g, state)
            state["proj.t"] += 1
            work.append((p, g, transposed, r, self._moments(p, r)))

        beta1, beta2 = group["betas"]
        directions = adam_directions(
            [w[3] for w in work], [w[4]["exp_avg"] for w in work], [w[4]["exp_avg_sq"] for w in work],
            [w[4]["step"] for w in work], beta1=beta1, beta2=beta2, eps=group["eps"], fused=group["fused"],
        )
        lr, wd, scale = group["lr"], group["weight_decay"], group["scale"]
        for (p, g, transposed, r, state), d in zip(work, directions):
            fix = rule(g, r, d, state, group, projector, int(state["step"]))
            if scale != 1:
                d.mul_(scale)
            if fix is not None and fix.low is not None:
                d.add_(fix.low)
            if wd != 0:
                p.mul_(1.0 - lr * wd)
            w = p.mT if transposed else p  # the weight in the oriented (s, l) frame, a view
            projector.up_add_(w, d, state, -lr)  # W -= lr · P·(scale·D + low), fused into one addmm
            if fix is not None and fix.col is not None:
                w.addcmul_(g, fix.col[None, :], value=-lr)
            if fix is not None and fix.dense is not None:
                w.add_(fix.dense, alpha=-lr)
