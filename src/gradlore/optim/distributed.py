"""Low-rank optimizers on several processes (DDP, FSDP2): what the optimizer knows about ranks, and the refresh.

GaLore-style training keeps W (m, n) in the oriented frame G (s, l), s <= l, and every projector acts on the
left (R = Pᵀ G, up = P D): column j of R, of Adam's moments and of the update depends on column j of G only.
A projected weight is held in one of three layouts:

- ``whole``: the rank holds all of W and the same averaged gradient as every other rank (one process, DDP).
- ``cols``: FSDP2 shards W along its long side l (``long_side_placement``: ``Shard(1)`` where l is dim 1 of W,
  ``Shard(0)`` where it is dim 0), so the rank holds whole columns G_k (s, l_k). R_k = Pᵀ G_k, the moments
  (r, l_k), Adam's direction and the update of W_k stay local. Only choosing P needs the other ranks:
    * dct / columns: each rank scores the basis on its columns, one all-reduce of the s scores (s·4 bytes)
      gives every rank the same top-r indices (``Context.comm``; L1 scores add exactly, L2 as squares);
    * svd: the whole G is needed, gathered on refresh steps only: to one owner rank, which broadcasts P
      (s·r·4 bytes), or to every rank (all-gather, each computes P);
    * random, identity: nothing (seeded / no basis).
  Fira's residual adds one scalar all-reduce per step (‖S ⊙ φ‖ runs over all columns).
- ``rows``: FSDP2 cannot split dim 1 unevenly (``Shard(1)`` needs l divisible by the world size; GaLore's
  LLaMA-1B has l = 5461), so such a weight keeps FSDP2's ``Shard(0)`` (its short side): its gradient is
  gathered every step, every rank computes the same update and keeps its rows; moments (r, l) replicated.

Owner-rank refresh (``Comm.owner_refresh``) for projectors that need the whole gradient (SVD): each weight's
refresh is computed by one rank (owners balanced by the cost s²·l, longest first) and its ``proj.*`` tensors
are broadcast, so a refresh step costs about 1/N of the single-process time. A DCT/columns refresh on a
whole gradient (DDP, ``rows``) is computed by every rank: scoring costs about one projection, which every
rank needs anyway, so an owner could only add a broadcast (measured: ``gradlore bench distributed``).
Every collective is issued in the same order on every rank; ``Comm.bytes`` counts the bytes each puts on
the wire (all ranks together, bandwidth-optimal algorithms: ``wire_bytes``), ``Comm.seconds`` its time.
"""

from __future__ import annotations

import collections
import heapq
import pickle
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from gradlore.errors import UserError
from gradlore.projectors.base import is_transposed

MOMENTS = ("exp_avg", "exp_avg_sq")  # state tensors shaped like the (projected) gradient: sharded with it


def wire_bytes(kind: str, nbytes: int, world: int) -> int:
    """Bytes on the wire, all ranks together, of one collective over ``nbytes`` (ring/tree algorithms).

    all_reduce: each rank sends and receives 2(N-1)/N of the tensor; all_gather (nbytes = the whole
    output): each rank receives the (N-1)/N it lacks; gather: the destination receives (N-1)/N of the
    output; broadcast: N-1 ranks receive the tensor.
    """
    n = world
    return {"all_reduce": 2 * (n - 1) * nbytes, "all_gather": (n - 1) * nbytes, "gather": (n - 1) * nbytes // n,
            "broadcast": (n - 1) * nbytes}[kind]


class Comm:
    """The process group a low-rank optimizer talks over, and whether refreshes have owner ranks.

    ``bytes`` counts, per purpose, what its collectives put on the wire (``wire_bytes``): the benchmark
    and the tests read it.
    """

    def __init__(self, group: Any = None, owner_refresh: bool = True) -> None:
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.owner_refresh = owner_refresh
        self.bytes: collections.Counter[str] = collections.Counter()
        self.seconds: collections.Counter[str] = collections.Counter()
        self.purpose = "refresh"  # what the next collectives are for (a label of ``bytes``)

    def _count(self, kind: str, t: Tensor | int) -> None:
        nbytes = t if isinstance(t, int) else t.numel() * t.element_size()
        self.bytes[f"{self.purpose}.{kind}"] += wire_bytes(kind, nbytes, self.world)

    def all_reduce_(self, t: Tensor) -> Tensor:
        """Sum ``t`` over the ranks in place (the ``Reducer`` a projector sees)."""
        self._count("all_reduce", t)
        tick = time.perf_counter()
        dist.all_reduce(t, group=self.group)
        self.seconds[self.purpose] += time.perf_counter() - tick
        return t

    def all_reduce_async(self, t: Tensor) -> Callable[[], None]:
        """Start summing ``t`` over the ranks in place; returns the wait."""
        self._count("all_reduce", t)
        work = dist.all_reduce(t, group=self.group, async_op=True)

        def wait() -> None:
            tick = time.perf_counter()
            work.wait()
            self.seconds[self.purpose] += time.perf_counter() - tick

        return wait

    def gather_cols(self, g: Tensor, l: int, dst: int | None = None) -> Tensor | None:
        """The whole (s, l) from every rank's columns g (s, l_k) (l split as torch.chunk does), on every
        rank (``dst`` None: all-gather) or on rank ``dst`` only (the others get None)."""
        chunk = -(-l // self.world)
        buf = g.new_zeros(g.shape[0], chunk)  # (s, ⌈l/N⌉): collectives want equal pieces
        buf[:, : g.shape[1]] = g
        kind = "all_gather" if dst is None else "gather"
        self._count(kind, g.shape[0] * l * g.element_size())
        tick = time.perf_counter()
        if dst is None:
            parts = [torch.empty_like(buf) for _ in range(self.world)]
            dist.all_gather(parts, buf, group=self.group)
        else:
            parts = [torch.empty_like(buf) for _ in range(self.world)] if self.rank == dst else None
            dist.gather(buf, parts, group=self.group, group_dst=dst)
        self.seconds[self.purpose] += time.perf_counter() - tick
        return None if parts is None else torch.cat(parts, dim=1)[:, :l]  # (s, l)

    def broadcast_(self, t: Tensor, src: int) -> Tensor:
        self._count("broadcast", t)
        tick = time.perf_counter()
        dist.broadcast(t, group=self.group, group_src=src)
        self.seconds[self.purpose] += time.perf_counter() - tick
        return t


def attach(optimizer: torch.optim.Optimizer, comm: Comm | None) -> None:
    """Give a gradlore optimizer (and the inner ones of a layer-wise optimizer) its process group."""
    for opt in (optimizer, *getattr(optimizer, "_inner", {}).values()):
        if hasattr(opt, "comm"):
            opt.comm = comm


def chunk(n: int, world: int, rank: int) -> slice:
    """Rank ``rank``'s part of a dim of size n split over ``world`` ranks, as DTensor and FSDP2 split it
    (torch.chunk: pieces of ⌈n/N⌉, the last ones shorter or empty)."""
    size = -(-n // world)
    return slice(min(n, rank * size), min(n, (rank + 1) * size))


def local(t: Tensor) -> Tensor:
    """This rank's piece of a DTensor (a view: writing it writes the parameter), or t itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_dim(p: Tensor) -> int | None:
    """The dim of ``p`` (a parameter) that its DTensor is sharded on; None for a whole tensor."""
    if not isinstance(p, DTensor):
        return None
    if len(p.placements) != 1:
        raise UserError(f"gradlore optimizers support parameters sharded over a 1-D device mesh (FSDP2), not "
                        f"{p.placements}. Fix: fully_shard over a 1-D mesh.")
    placement = p.placements[0]
    return placement.dim if isinstance(placement, Shard) else None


def layout(p: Tensor) -> str:
    """``whole``, ``cols`` (this rank holds whole columns of the oriented (s, l) frame) or ``rows``."""
    dim = shard_dim(p)
    if dim is None:
        return "whole"
    oriented = 1 - dim if is_transposed(p.shape) else dim
    return "cols" if oriented == 1 else "rows"


class Frame(NamedTuple):
    """A projected parameter as this rank sees it, in the oriented (s, l) frame."""

    w: Tensor  # this rank's part of W: (s, l) whole, (s, l_k) cols, (s_k, l) rows — a view of the parameter
    g: Tensor  # the gradient the parts see: (s, l) whole, (s, l_k) cols, (s, l) rows (gathered)
    layout: str
    transposed: bool
    l: int  # the whole long side
    rows: slice | None  # rows of the (s, l) frame this rank holds (layout rows)


def frame(p: Tensor, comm: Comm | None) -> Frame:
    """The oriented view of ``p`` and its gradient on this rank (no copy, except the ``rows`` gather)."""
    transposed = is_transposed(p.shape)  # from the whole shape: a shard may look the other way round

    def orient(t: Tensor) -> Tensor:
        return t.mT if transposed else t

    l = max(p.shape)
    kind = layout(p)
    w, g = orient(local(p)), orient(local(p.grad))
    if kind != "rows":
        return Frame(w, g, kind, transposed, l, None)
    full = p.grad.full_tensor()  # (m, n): the fallback gathers the gradient every step
    if comm is not None:
        comm.bytes["step.all_gather"] += wire_bytes("all_gather", full.numel() * full.element_size(), comm.world)
    mesh = p.device_mesh
    return Frame(w, orient(full), kind, transposed, l, chunk(p.shape[shard_dim(p)], mesh.size(), mesh.get_local_rank()))


def long_side_placement(projected: Iterable[tuple[str, Tensor]], world: int) -> Callable[[nn.Parameter], Shard | None]:
    """FSDP2's ``shard_placement_fn``: each projected weight is split along its long side, so that a rank
    holds whole columns of its oriented gradient; everything else keeps FSDP2's default (Shard(0)).

    ``Shard(1)`` needs dim 1 divisible by the world size; where it is not, the weight keeps Shard(0) and
    trains in the ``rows`` layout (its gradient gathered every step), with one warning naming it.
    """
    ids = {id(p): name for name, p in projected}
    fallback: list[str] = []

    def place(p: nn.Parameter) -> Shard | None:
        if id(p) not in ids:
            return None
        if is_transposed(p.shape):
            return Shard(0)
        if p.shape[1] % world == 0:
            return Shard(1)
        fallback.append(f"{ids[id(p)]} {tuple(p.shape)}")
        if len(fallback) == 1:
            warnings.warn(f"gradlore: FSDP2 can split dim 1 only evenly, and {world} ranks do not divide the long "
                          f"side of {fallback[0]} (and of any later weight of that shape), so it is sharded on its "
                          "short side: its gradient is gathered every step. Fix: a world size that divides it.",
                          UserWarning, stacklevel=2)
        return None

    place.fallback = fallback  # type: ignore[attr-defined]  # names of the weights in the rows layout
    return place


def moment_dim(group: dict, p: Tensor, key: str) -> int | None:
    """The dim along which the state tensor ``key`` of parameter ``p`` is split across ranks (None: the same
    whole tensor on every rank). Only Adam's moments are split: like a plain parameter, or along l for a
    projected weight in the ``cols`` layout ((r, l) in the oriented frame)."""
    dim = shard_dim(p)
    if dim is None or key not in MOMENTS:
        return None
    if "rank" in group and p.dim() == 2 and group["rank"] < min(p.shape):  # projected (lowrank_adamw.projects)
        return 1 if layout(p) == "cols" else None
    return dim


def _owners(frames: list[Frame], world: int) -> list[int]:
    """One rank per refresh, longest (s²·l) first onto the least loaded rank: the same on every rank."""
    order = sorted(range(len(frames)), key=lambda k: (-frames[k].g.shape[0] ** 2 * frames[k].l, k))
    heap = [(0, rank) for rank in range(world)]
    owners = [0] * len(frames)
    for k in order:
        load, rank = heapq.heappop(heap)
        owners[k] = rank
        heapq.heappush(heap, (load + frames[k].g.shape[0] ** 2 * frames[k].l, rank))
    return owners


def _broadcast_proj(comm: Comm, keys: list[int], owners: list[int], states: list[dict],
                    devices: list[torch.device]) -> None:
    """Every rank gets the ``proj.*`` tensors that the owner of each refresh computed (new tensors, so the
    references a non-owner kept to its old subspace stay valid)."""
    mine = {k: [(key, tuple(v.shape), str(v.dtype)) for key, v in sorted(states[k].items()) if key.startswith("proj.")]
            for k, owner in zip(keys, owners) if owner == comm.rank}
    metas: list[dict] = [None] * comm.world  # type: ignore[list-item]
    tick = time.perf_counter()
    dist.all_gather_object(metas, mine, group=comm.group)  # shapes and dtypes (a few bytes a weight)
    comm.seconds["refresh"] += time.perf_counter() - tick
    comm.bytes["refresh.meta"] += comm.world * (comm.world - 1) * max(len(pickle.dumps(m)) for m in metas)
    for k, owner in zip(keys, owners):
        for key, shape, dtype in metas[owner][k]:
            if owner == comm.rank:
                comm.broadcast_(states[k][key].contiguous(), owner)
            else:
                t = torch.empty(shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=devices[k])
                states[k][key] = comm.broadcast_(t, owner)


IN_FLIGHT = 2  # score all-reduces in flight: each keeps one (s, l_k) coefficient matrix alive


def _select_on_shards(opt: Any, parts: Any, group: dict, frames: list[Frame], states: list[dict], due: list[int],
                      comm: Comm) -> dict[int, Tensor]:
    """Score each weight on this rank's columns and select once the scores are summed over the ranks; the
    all-reduce of one weight's s scores runs while the next weights are scored (at most IN_FLIGHT)."""
    out: dict[int, Tensor] = {}
    pending: list[tuple] = []

    def finish(k: int, before: dict, coeffs: Tensor, scores: Tensor, wait: Callable[[], None]) -> None:
        wait()
        out[k] = parts.projector.select(coeffs, scores, group["rank"], states[k],
                                        parts.on_refresh.stable_slots)  # (r, l_k)
        opt._settle(parts, group, frames[k].g, states[k], before)

    for k in due:
        before = opt._old_subspace(states[k])
        coeffs, scores = parts.projector.score(frames[k].g)  # (s, l_k), (s,)
        pending.append((k, before, coeffs, scores, comm.all_reduce_async(scores)))
        if len(pending) > IN_FLIGHT:
            finish(*pending.pop(0))
    for item in pending:
        finish(*item)
    return out


def refresh_sharded(opt: Any, parts: Any, group: dict, names: list[str], frames: list[Frame], states: list[dict],
                    due: list[int], comm: Comm) -> dict[int, Tensor | None]:
    """Refresh the weights ``due`` (positions in ``frames``) so that every rank ends with the same subspace;
    returns each refresh's by-product R (this rank's columns) where there is one."""
    out: dict[int, Tensor | None] = {}
    owned: list[int] = []
    comm.purpose = "refresh"
    projector = parts.projector
    if hasattr(projector, "score"):  # DCT / columns on shards: the score all-reduces overlap the scoring
        shards = [k for k in due if frames[k].layout == "cols"]
        out.update(_select_on_shards(opt, parts, group, frames, states, shards, comm))
        due = [k for k in due if frames[k].layout != "cols"]
    for k in due:
        f = frames[k]
        if not projector.reads_gradient or projector.refreshes_on_shards:
            # seeded bases: no communication; DCT/columns: scores on shards and one s-sized all-reduce (cols),
            # or every rank scores the whole gradient it holds (as cheap as the projection it needs anyway)
            out[k] = opt._refresh(parts, group, names[k], f.g, f.transposed, states[k],
                                  comm if f.layout == "cols" else None)
        elif comm.owner_refresh:
            owned.append(k)
        else:  # every rank computes the same refresh from the whole gradient
            g = comm.gather_cols(f.g, f.l) if f.layout == "cols" else f.g
            r = opt._refresh(parts, group, names[k], g, f.transposed, states[k])
            out[k] = r if f.layout != "cols" else None  # a by-product of the whole G is not this rank's columns
    if owned:
        owners = _owners([frames[k] for k in owned], comm.world)
        whole: dict[int, Tensor] = {}
        for k, owner in zip(owned, owners):  # gathers first, in the same order everywhere
            f = frames[k]
            g = comm.gather_cols(f.g, f.l, dst=owner) if f.layout == "cols" else f.g
            if owner == comm.rank:
                whole[k] = g
        before = {k: opt._old_subspace(states[k]) for k in owned}
        for k, owner in zip(owned, owners):
            if owner == comm.rank:
                opt._choose(parts, group, names[k], whole.pop(k), frames[k].transposed, states[k])
        _broadcast_proj(comm, owned, owners, states, [f.g.device for f in frames])
        for k in owned:  # the refresh rule and the moment policy, identically on every rank
            opt._settle(parts, group, frames[k].g, states[k], before[k])
            out[k] = None  # the owner's by-product would make its R differ in rounding from the others'
    comm.purpose = "step"
    return out
