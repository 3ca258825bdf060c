"""Atomic, resumable checkpoints.

A checkpoint is one ``torch.save`` file holding model, optimizer (projectors included: gradlore keeps
them as tensors in the optimizer state), LR scheduler, RNG states, the data position and the run's
counters; every entry is a tensor or a plain value, so it loads with ``torch.load(weights_only=True)``.

Writing: serialize to ``checkpoints/.checkpoint.pt.tmp``, flush + fsync, move the current newest to
``checkpoint.prev.pt``, then ``os.replace`` the temporary onto ``checkpoint.pt`` and fsync the folder.
A crash at any point leaves either the new checkpoint or the previous one complete, never half a file
under a checkpoint name. Reading tries the newest, then the previous one, naming each file it rejects.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradlore.errors import UserError

FORMAT = 1
NEWEST = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's state is (name, uint32[624], pos, has_gauss, gauss): kept as a tensor + ints.
        "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, payload: dict[str, Any]) -> Path:
    """Atomically write ``payload`` as the newest checkpoint, keeping the previous one."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{NEWEST}.tmp"
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, **payload}, f)
        f.flush()
        os.fsync(f.fileno())
    newest = folder / NEWEST
    if newest.exists():
        os.replace(newest, folder / PREVIOUS)
    os.replace(tmp, newest)
    _fsync_dir(folder)
    return newest


def _load(path: Path) -> dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"not a gradlore checkpoint of format {FORMAT}")
    missing = {"step", "model", "optimizer", "scheduler", "rng", "data", "counters"} - payload.keys()
    if missing:
        raise ValueError(f"missing entries {sorted(missing)}")
    return payload


def load_checkpoint(run_dir: Path) -> tuple[dict[str, Any], Path]:
    """The newest readable checkpoint of ``run_dir`` and its path; warns about each rejected file."""
    folder = checkpoint_dir(run_dir)
    tried: list[str] = []
    for name in (NEWEST, PREVIOUS):
        path = folder / name
        if not path.exists():
            continue
        try:
            return _load(path), path
        except Exception as exc:  # truncated zip, bad pickle, wrong format: all mean "unusable"
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            tried.append(f"{path} ({reason})")
            then = "trying the previous one" if name == NEWEST and (folder / PREVIOUS).exists() else "no other is left"
            print(f"gradlore train: warning: checkpoint {path} is corrupt or truncated: {reason}; {then}.",
                  file=sys.stderr)
    if tried:
        raise UserError("no usable checkpoint: " + "; ".join(tried) +
                        ". Fix: --overwrite to start the run again (or restore a checkpoint file).")
    raise UserError(f"{run_dir} has no checkpoint to resume from. Fix: drop --resume, or --overwrite.")
