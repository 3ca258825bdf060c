"""LowRankAdamW: one optimizer for GaLore, SVD-free DCT, Fira and FRUGAL (and their mixtures).

For a 2-D weight W (m, n) in a group that carries ``rank``:

    G ← orient(∇W)                      (s, l), s = min(m, n)        GaLore's "std" orientation
    G ← G + Ξ                           only with residual "ef": the part dropped before (error feedback)
    every update_proj_gap steps: choose the subspace P from G         (projector: svd | dct | ...)
    R = Pᵀ G                            (r, l)
    D = Adam(R) = m̂ / (√v̂ + ε)          (r, l), torch's fused kernel
    W ← W · (1 - lr·wd)                 decoupled weight decay, *before* the update
    W ← W - lr · (scale · P D + residual(G - P R))                    (residual: discard | fira | sign | ef)

Groups without ``rank`` are plain AdamW (same fused kernel), as in galore-torch and Hugging Face.
Weight decay is applied to the weight before the update, as torch.optim.AdamW does; galore-torch
and fira apply it after the update (to the updated weight), a difference of O(lr²·wd).
A projected group composes five parts (see ``gradlore.optim.parts``): the projector, the residual
rule, the refresh rule, the moment policy on refresh and the state format; the step below only calls them.
Every group has a state format (``fp32``, ``8bit``, ``factored``: how m and v are kept). The fp32 format of
float32 weights runs torch's fused kernel over the whole group at once; the other formats, and weights
narrower than float32 (pure bf16 training), go weight by weight through ``gradlore.optim.formats.adamw_``,
in float32, and write the new weight back with the group's ``rounding`` (stochastic by default).
State holds only tensors, each owned by one part: ``step``, ``exp_avg*`` (the state format),
``proj.basis`` or ``proj.indices`` (projector), ``refresh.t``, ``refresh.next``, … (refresh rule),
``fira.prev_norm`` (residual rule), ``remap.age`` (moment policy), ``round.t`` (stochastic rounding's counter).

``found_inf``: a caller (the layer-wise wrapper) may set ``optimizer.found_inf`` to a 0-dim device tensor;
where it is 1.0 the step changes nothing (weights, moments, clocks), without reading it on the host except
at a projection refresh, which reads the host anyway.

On several processes (``gradlore.optim.distributed``): parameters sharded by FSDP2 (DTensors) are stepped
on their local pieces, and a projected weight sharded along its long side is projected and updated on its
own columns; the optimizer's ``comm`` (a process group, set by the trainer or derived from the DTensors)
makes every rank choose the same subspace. With one process nothing of this runs. Several processes take
float32 weights and ``fp32`` states only (``check_parallel``).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable, Iterable
from itertools import chain

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from gradlore.errors import UserError
from gradlore.optim.adam import adamw_update_
from gradlore.optim.distributed import Comm, Frame, frame, local, refresh_sharded
from gradlore.optim.formats import Hyper, adamw_, step_counter
from gradlore.optim.parts import ADAMW_OPTIONS, Parts, normalize_group, state_format
from gradlore.optim.rounding import COUNTER, generator_for, is_wide, write_
from gradlore.projectors import Context, is_transposed
from gradlore.projectors.refresh import clock


def projects(group: dict, p: Tensor) -> bool:
    """Whether p is trained in a subspace: a projected group, a 2-D weight, rank below its shorter side."""
    return "rank" in group and p.dim() == 2 and group["rank"] < min(p.shape)


def param_name(group: dict, gi: int, i: int) -> str:
    """The parameter's name, or a stable stand-in (``group1.param3``) when the group carries none."""
    names = group.get("param_names")
    return names[i] if names else f"group{gi}.param{i}"


def refresh_seed(group_seed: int, name: str, t: int) -> int:
    """Seed of a random basis: the group's seed, the parameter (by name) and the refresh step."""
    return ((group_seed * 1_000_003 + zlib.crc32(name.encode())) * 1_000_033 + t) % (2**63)


def restore_state_dtypes(optimizer: Optimizer, state_dict: dict) -> None:
    """Undo ``Optimizer.load_state_dict``'s cast of every non-step state tensor to the parameter dtype, and put
    ``step`` on the parameter's device.

    That policy would turn projection indices into floats and round float32 statistics of bf16
    weights to bf16; we keep each saved tensor's dtype and move it to the parameter's device.
    """
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    by_id = dict(zip(saved_ids, params))
    for pid, saved in state_dict["state"].items():
        p = by_id[pid]
        for key, value in saved.items():
            if not isinstance(value, Tensor):
                continue
            on_cpu = key.startswith("refresh.") or key == COUNTER  # clocks stay on the CPU
            device = value.device if on_cpu else p.device
            current = optimizer.state[p][key]
            # torch leaves ``step`` where it was loaded (the CPU) unless a group says fused/capturable; the
            # fused kernel (fused=None: wherever torch has it) needs it beside the weights.
            if current.dtype != value.dtype or current.device != device:
                optimizer.state[p][key] = value.detach().to(device=device, copy=True)


def check_parallel(group: dict, parallel: bool) -> None:
    """Several processes step float32 weights with ``fp32`` states only (what the sharded step supports)."""
    if not parallel:
        return
    if group.get("residual") == "ef":
        raise UserError("gradlore: residual='ef' (error feedback) is not supported on several processes (--parallel) "
                        "yet: its buffer is not sharded. Fix: residual='discard', 'fira' or 'sign', or train on one "
                        "process.")
    if group["state"] != "fp32":
        raise UserError(f"gradlore: state={group['state']!r} is not supported on several processes (--parallel): "
                        "its quantized or factored moments are not sharded. Fix: state='fp32' (--set optim.state=fp32 "
                        "--set optim.plain_state=fp32), or train on one process.")
    narrow = sorted({str(p.dtype) for p in group["params"] if not is_wide(p)})
    if narrow:
        raise UserError(f"gradlore: {', '.join(narrow)} weights are not supported on several processes (--parallel): "
                        "the sharded step updates float32 weights in place. Fix: float32 weights (--set "
                        "memory.weights=fp32, autocast keeps bf16 compute), or train on one process.")


class LowRankAdamW(Optimizer):
    """AdamW whose groups with a ``rank`` key train 2-D weights in a refreshed rank-r subspace.

    Args:
        params: parameters or groups. A group with ``rank`` is projected; its keys and their defaults are
            declared in ``gradlore.optim.parts`` (``scale`` 0.25, ``projector`` "svd", ``residual`` "discard",
            ``refresh`` "every" with ``update_proj_gap`` 200, ``on_refresh`` "keep", and each part's options;
            the presets change them: ``gradlore.presets.dct`` refreshes every step with ``on_refresh`` "remap");
            an unknown key or an illegal value is a UserError with a "did you mean".
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
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=fused)
        for key, value in defaults.items():
            ADAMW_OPTIONS[key].validate(key, value, "LowRankAdamW")
        self.comm: Comm | None = None  # the ranks' process group (gradlore.optim.distributed.attach)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        where = f"param group {len(self.param_groups)}"
        super().add_param_group(normalize_group(dict(param_group), where))
        group = self.param_groups[-1]
        if "rank" in group:
            gi = len(self.param_groups) - 1
            plain = [param_name(group, gi, i) for i, p in enumerate(group["params"]) if not projects(group, p)]
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
        found_inf = getattr(self, "found_inf", None)
        if isinstance(found_inf, DTensor):  # from the norm of sharded gradients: the same on every rank
            found_inf = found_inf.full_tensor()
        for gi, group in enumerate(self.param_groups):
            check_parallel(group, self._comm(group) is not None or any(isinstance(p, DTensor) for p in group["params"]))
            plain, projected = [], []
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise UserError("LowRankAdamW does not support sparse gradients; use torch.optim.SparseAdam.")
                (projected if projects(group, p) else plain).append(i)
            fmt = state_format(group)
            self._plain_step(gi, group, plain, fmt, found_inf)
            # One fused call for the whole group where it can; weight by weight otherwise, so that float32
            # working copies of narrow weights (or a quantized error feedback's G + Ξ̂) never coexist.
            together = fmt.kernel_path and all(is_wide(group["params"][i]) for i in projected) and not (
                projected and getattr(Parts.of(group).residual, "one_at_a_time", False))
            for batch in ([projected] if together else [[i] for i in projected]):
                if batch:
                    self._projected_step(gi, group, batch, found_inf)
        return loss

    @staticmethod
    def _hyper(group: dict) -> Hyper:
        beta1, beta2 = group["betas"]
        return Hyper(group["lr"], beta1, beta2, group["eps"], group["weight_decay"], group["fused"])

    def _plain_step(self, gi: int, group: dict, indices: list[int], fmt, found_inf: Tensor | None) -> None:
        params = [group["params"][i] for i in indices]
        hp = self._hyper(group)
        if fmt.kernel_path and all(is_wide(p) for p in params):  # torch's fused kernel, one call
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                fmt.init_(state, local(p), p.dtype)  # a sharded parameter: its local piece
                step_counter(state, p.device)
            adamw_update_(
                [local(p) for p in params], [local(p.grad) for p in params], [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states], [s["step"] for s in states], lr=hp.lr, beta1=hp.beta1,
                beta2=hp.beta2, eps=hp.eps, weight_decay=hp.weight_decay, fused=hp.fused, found_inf=found_inf,
            )
            return
        for i, p in zip(indices, params):  # one process only (check_parallel)
            adamw_(fmt, p, p.grad, self.state[p], hp, found_inf=found_inf, rounding=group["rounding"],
                   name=param_name(group, gi, i))

    def _refresh(self, parts: Parts, group: dict, name: str, g: Tensor, transposed: bool, state: dict,
                 comm: Comm | None = None) -> Tensor | None:
        """Choose the subspace anew; the refresh rule and the moment policy see the state before and after."""
        before = self._old_subspace(state)
        r = self._choose(parts, group, name, g, transposed, state, comm)
        self._settle(parts, group, g, state, before)
        return r

    @staticmethod
    def _old_subspace(state: dict) -> dict:
        return {k: v for k, v in state.items() if k.startswith("proj.")}  # the old subspace (references)

    @staticmethod
    def _choose(parts: Parts, group: dict, name: str, g: Tensor, transposed: bool, state: dict,
                comm: Comm | None = None) -> Tensor | None:
        """The projector's refresh on g (s, l), or on this rank's columns (s, l_k) given ``comm``."""
        ctx = Context(name, transposed, refresh_seed(group["seed"], name, clock(state)), comm,
                      parts.on_refresh.stable_slots)
        return parts.projector.refresh(g, group["rank"], state, ctx)

    @staticmethod
    def _settle(parts: Parts, group: dict, g: Tensor, state: dict, before: dict) -> None:
        overlap = None
        if parts.refresh.wants_overlap and before:
            s, rank = g.shape[0], group["rank"]
            old = parts.projector.basis(before, s, rank, g.dtype, g.device)  # (s, r)
            new = parts.projector.basis(state, s, rank, g.dtype, g.device)
            overlap = float((old.mT @ new).square().sum()) / rank  # ‖P_oldᵀ P_new‖²_F / r
        parts.refresh.refreshed(state, overlap)
        if before:
            parts.on_refresh.refreshed(state, before, parts.projector)

    def _comm(self, group: dict) -> Comm | None:
        """The process group of a multi-process run (FSDP2's mesh when nobody attached one), else None."""
        if self.comm is None and any(isinstance(p, DTensor) for p in group["params"]):
            mesh = next(p for p in group["params"] if isinstance(p, DTensor)).device_mesh
            self.comm = Comm(mesh.get_group())
        return self.comm if self.comm is not None and self.comm.world > 1 else None

    def _projected_step(self, gi: int, group: dict, indices: list[int], found_inf: Tensor | None) -> None:
        parts = Parts.of(group)
        comm = self._comm(group)
        params = [group["params"][i] for i in indices]
        names = [param_name(group, gi, i) for i in indices]
        skip = None if found_inf is None else found_inf.bool()
        frames = []  # this rank's W and G in the (s, l) frame; a narrow weight: float32 working copies
        for p in params:
            if is_wide(p):
                f = frame(p, comm)  # no copy
            else:  # one process only (check_parallel)
                t = is_transposed(p.shape)
                weight, grad = p.detach().float(), p.grad.float()
                f = Frame(weight.mT if t else weight, grad.mT if t else grad, "whole", t, max(p.shape), None)
            if skip is not None:
                f.g.masked_fill_(skip, 0.0)  # a skipped gradient is discarded anyway; zeros keep every term finite
            frames.append(f)
        states = [self.state[p] for p in params]
        feed = getattr(parts.residual, "feed", None)  # error feedback: every part sees G + Ξ instead of G
        if feed is not None:
            frames = [f._replace(g=feed(f.g, state)) for f, state in zip(frames, states)]
        due = [k for k, state in enumerate(states) if parts.refresh.due(state)]
        if due and found_inf is not None and bool(found_inf):  # the refresh reads the host anyway
            # Never choose a subspace from a skipped gradient: nothing changes for these weights. Under several
            # processes found_inf comes from the global norm, so every rank drops the same weights.
            kept = [k for k in range(len(params)) if k not in set(due)]
            params, names, frames, states = ([xs[k] for k in kept] for xs in (params, names, frames, states))
            due = []
        if comm is None:
            fresh = {k: self._refresh(parts, group, names[k], frames[k].g, frames[k].transposed, states[k]) for k in due}
        else:  # every rank must end with the same subspace
            fresh = refresh_sharded(self, parts, group, names, frames, states, due, comm)
        work = []  # (param, frame, R (r, l), state, name)
        for k, (p, f, state) in enumerate(zip(params, frames, states)):
            r = fresh.get(k)
            if r is None:
                r = parts.projector.down(f.g, state)
            parts.refresh.tick(state)
            work.append((p, f, r, state, names[k]))
        if not work:
            return

        directions = parts.on_refresh.directions([w[2] for w in work], [w[3] for w in work], group["betas"],
                                                 group["eps"], group["fused"], fmt=parts.state,
                                                 found_inf=found_inf)  # D (r, l) each
        lr, wd, scale = group["lr"], group["weight_decay"], group["scale"]
        for (p, f, r, state, name), d in zip(work, directions):
            shards = {"comm": comm} if f.layout == "cols" else {}  # column sums span the ranks
            # on a skipped step the rule leaves its own state as it was
            fix = parts.residual(f.g, r, d, state, parts.projector, group["betas"], skip=skip, **shards)
            if scale != 1:
                d.mul_(scale)
            if fix is not None and fix.low is not None:
                d.add_(fix.low)
            if wd != 0:
                f.w.mul_(1.0 - lr * wd if skip is None else torch.where(skip, 1.0, 1.0 - lr * wd).to(f.w.dtype))
            w = f.w if f.rows is None else torch.zeros_like(f.g)  # rows layout: the whole update, then our rows
            parts.projector.up_add_(w, d, state, -lr)  # W -= lr · P·(scale·D + low), fused into one addmm
            if fix is not None and fix.col is not None:
                w.addcmul_(f.g, fix.col[None, :], value=-lr)
            if fix is not None and fix.dense is not None:
                w.add_(fix.dense, alpha=-lr)
            if f.rows is not None:
                f.w.add_(w[f.rows])
            if not is_wide(p):  # the float32 working copy back into the narrow weight
                gen = generator_for(state, name, p.device) if group["rounding"] == "stochastic" else None
                write_(p, f.w.mT if f.transposed else f.w, group["rounding"], gen)
