"""Checkpoints of a multi-process run (``--parallel ddp|fsdp2``) through ``torch.distributed.checkpoint``.

A checkpoint is the folder ``checkpoints/dcp`` (and the one before it, ``checkpoints/dcp.prev``):

- DCP files, written by every rank in parallel: ``model/<name>`` (FSDP2: each rank its shard; DDP: one copy)
  and ``optim/<name>/<key>``: Adam's moments as sharded tensors (FSDP2: a plain weight's like the weight, a
  projected weight's (r, l) moments along l, ``gradlore.optim.distributed.moment_dim``), everything else
  (projection indices or bases, refresh clocks, Fira's norm, step counts) replicated and written once;
- ``meta.pt`` (rank 0; ``torch.load(weights_only=True)``): step, param groups, LR scheduler, data position,
  counters, config, world size and mode; ``rng-<rank>.pt``: each rank's RNG states.

Writing goes to ``checkpoints/.dcp.tmp``; after every rank has finished, rank 0 moves the newest folder to
``dcp.prev`` and renames the temporary one to ``dcp``: a crash leaves a complete newest or previous
checkpoint. Reading takes the newest folder with a readable ``meta.pt`` and DCP metadata, else the previous
one. Every tensor is stored with its global shape, so a resume on another world size (or from DDP to FSDP2)
reshards it onto the new layout; on the same world size the run continues exactly.
The single-process format (``gradlore.train.checkpoint``, one ``torch.save`` file) is untouched; a run
cannot move between the two (the error names the launch that resumes it).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.tensor import DTensor, Shard

from gradlore.errors import UserError
from gradlore.optim.distributed import chunk, local, moment_dim, shard_dim
from gradlore.optim.layerwise import LayerwiseOptimizer
from gradlore.optim.lowrank_adamw import LowRankAdamW
from gradlore.train.checkpoint import FORMAT, NEWEST, _fsync_dir, checkpoint_dir, rng_state

FOLDER, PREVIOUS, TMP, META = "dcp", "dcp.prev", ".dcp.tmp", "meta.pt"


def _params(optimizer: torch.optim.Optimizer) -> list[tuple[Tensor, dict]]:
    """(parameter, group) in the order ``state_dict()`` numbers them."""
    return [(p, g) for g in optimizer.param_groups for p in g["params"]]


def _keeps_local_state(optimizer: torch.optim.Optimizer) -> bool:
    """gradlore's optimizers keep a sharded parameter's state as local tensors; torch's keep DTensors."""
    cls = optimizer.optimizer_cls if isinstance(optimizer, LayerwiseOptimizer) else type(optimizer)
    return issubclass(cls, LowRankAdamW)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def _sharded(local_t: Tensor, p: DTensor, dim: int, shape: tuple[int, ...]) -> DTensor:
    return DTensor.from_local(local_t, p.device_mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_stride(shape))


def _global(value: Tensor, p: Tensor, dim: int | None) -> Tensor:
    """A local state tensor as the global tensor it is a piece of (or itself, when it is whole everywhere)."""
    if dim is None or isinstance(value, DTensor):
        return value
    shape = list(value.shape)
    shape[dim] = p.shape[shard_dim(p)]  # the split dim is the parameter's (a projected one: its long side l)
    return _sharded(value, p, dim, tuple(shape))


def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, Tensor]:
    params = _params(optimizer)
    out = {}
    for idx, state in optimizer.state_dict()["state"].items():
        p, group = params[idx]
        for key, value in state.items():
            out[f"optim/{names[id(p)]}/{key}"] = _global(value, p, moment_dim(group, p, key))
    return out


def save_distributed(trainer: Any) -> Path:
    """Every rank writes its part of the checkpoint; returns the newest checkpoint folder."""
    par, folder = trainer.par, checkpoint_dir(trainer.out)
    tmp, newest = folder / TMP, folder / FOLDER
    if par.main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    par.barrier()
    model = par.unwrap(trainer.model)
    names = {id(p): n for n, p in model.named_parameters()}
    state = {f"model/{k}": v for k, v in model.state_dict().items()}
    state.update(optimizer_tensors(trainer.optimizer, names))
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng-{par.rank}.pt")
    if par.main:
        torch.save({"format": FORMAT, "step": trainer.step, "param_groups": trainer.optimizer.state_dict()["param_groups"],
                    "scheduler": trainer.scheduler.state_dict(), "data": trainer.data.train.state_dict(),
                    "counters": dict(trainer.counters), "config": trainer.cfg.to_dict(), "world": par.world,
                    "parallel": par.mode}, tmp / META)
    par.barrier()
    if par.main:
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if newest.exists():
            shutil.rmtree(folder / PREVIOUS, ignore_errors=True)
            os.replace(newest, folder / PREVIOUS)
        os.replace(tmp, newest)
        _fsync_dir(folder)
    par.barrier()
    return newest


def check_format(out: Path, distributed: bool, mode: str) -> None:
    """Refuse to resume a checkpoint written by the other kind of run (one process vs several)."""
    folder = checkpoint_dir(out)
    single, multi = (folder / NEWEST).exists(), (folder / FOLDER).exists() or (folder / PREVIOUS).exists()
    if distributed and single and not multi:
        raise UserError(f"{out} was checkpointed by a single process ({folder / NEWEST}); --parallel {mode} resumes "
                        "runs checkpointed by torchrun processes. Fix: resume it without torchrun, with "
                        "--parallel none.")
    if not distributed and multi and not single:
        raise UserError(f"{out} was checkpointed by torchrun processes ({folder / FOLDER}). Fix: resume it with "
                        "torchrun --nproc_per_node N -m gradlore.cli train --out ... --resume (any N: the "
                        "checkpoint is resharded), keeping its --parallel ddp|fsdp2.")


def _pick(folder: Path) -> tuple[Path, dict, Any]:
    """The newest readable checkpoint folder, its meta and DCP metadata; warns about each rejected one."""
    tried = []
    for name in (FOLDER, PREVIOUS):
        path = folder / name
        if not path.exists():
            continue
        try:
            meta = torch.load(path / META, map_location="cpu", weights_only=True)
            if meta.get("format") != FORMAT:
                raise ValueError(f"not a gradlore checkpoint of format {FORMAT}")
            return path, meta, dcp.FileSystemReader(str(path)).read_metadata()
        except Exception as exc:  # missing or truncated files: the folder is unusable
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            tried.append(f"{path} ({reason})")
            print(f"gradlore train: warning: checkpoint {path} is incomplete or corrupt: {reason}.", file=sys.stderr)
    if tried:
        raise UserError("no usable checkpoint: " + "; ".join(tried) + ". Fix: --overwrite to start the run again.")
    raise UserError(f"{folder.parent} has no checkpoint to resume from. Fix: drop --resume, or --overwrite.")


def _placeholder(p: Tensor, group: dict, key: str, md: Any) -> Tensor:
    """An empty tensor of the saved global shape, laid out as this run holds ``key`` of ``p``."""
    dtype, shape = md.properties.dtype, tuple(md.size)
    dim = moment_dim(group, p, key)
    if dim is None:
        return torch.empty(shape, dtype=dtype)
    part = chunk(shape[dim], p.device_mesh.size(), p.device_mesh.get_local_rank())
    local_shape = (*shape[:dim], part.stop - part.start, *shape[dim + 1:])
    return _sharded(torch.empty(local_shape, dtype=dtype, device=local(p).device), p, dim, shape)


def load_distributed(trainer: Any) -> dict[str, Any]:
    """Load model and optimizer in place from the newest checkpoint (resharding them to this run's layout);
    returns the rest (step, scheduler, data position, counters, this rank's RNG states)."""
    par = trainer.par
    path, meta, metadata = _pick(checkpoint_dir(trainer.out))
    model = par.unwrap(trainer.model)
    saved = metadata.state_dict_metadata
    model_sd = model.state_dict()
    missing = [k for k in model_sd if f"model/{k}" not in saved]
    if missing:
        raise UserError(f"checkpoint {path} has no {', '.join(missing[:5])}: it is not a checkpoint of this model.")
    state: dict[str, Tensor] = {f"model/{k}": v for k, v in model_sd.items()}
    names = {id(p): n for n, p in model.named_parameters()}
    params = _params(trainer.optimizer)
    wanted: dict[int, dict[str, str]] = {}
    for idx, (p, group) in enumerate(params):
        prefix = f"optim/{names[id(p)]}/"
        for key, md in saved.items():
            if key.startswith(prefix):
                state[key] = _placeholder(p, group, key[len(prefix):], md)
                wanted.setdefault(idx, {})[key[len(prefix):]] = key
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict({k: state[f"model/{k}"] for k in model_sd})
    unwrap = _keeps_local_state(trainer.optimizer)
    trainer.optimizer.load_state_dict({
        "state": {idx: {k: local(state[key]) if unwrap else state[key] for k, key in keys.items()}
                  for idx, keys in wanted.items()},
        "param_groups": meta["param_groups"],
    })
    if (meta["world"], meta["parallel"]) != (par.world, par.mode) and par.main:
        print(f"gradlore train: resharded the checkpoint of {meta['world']} processes ({meta['parallel']}) onto "
              f"{par.world} ({par.mode}); the run continues up to the order of float sums.", file=sys.stderr)
    rng = path / f"rng-{par.rank}.pt"
    meta["rng"] = torch.load(rng if rng.exists() else path / "rng-0.pt", weights_only=True)
    return meta

