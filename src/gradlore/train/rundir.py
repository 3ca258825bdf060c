"""The run directory: refusing to clobber it, the metrics log (JSONL + TensorBoard), the loss plot.

A run folder holds ``config.json`` (the resolved config), ``data.json``, ``metrics.jsonl`` (one JSON object
per line: train / eval / skip / resume records), ``tensorboard/``, ``loss.png``, ``summary.json``,
``checkpoints/`` and ``final/``. Nothing here trains.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import sys
from pathlib import Path
from typing import Any

from gradlore.errors import UserError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "loss.png"


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run directory; nothing is written here."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other. Fix: pass one of them.")
    exists = out.exists() and any(out.iterdir()) if out.is_dir() else out.exists()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file. Fix: choose a folder path.")
    if resume:
        if not (out / CONFIG_FILE).exists():
            raise UserError(f"--resume: {out} is not a gradlore run directory (no {CONFIG_FILE}). "
                            "Fix: pass the --out of the run to resume.")
        return
    if exists and not overwrite:
        raise UserError(f"run directory {out} already exists. Fix: --resume to continue it, --overwrite to "
                        "replace it, or --out NEW_DIR.")
    if exists and overwrite and not (out / CONFIG_FILE).exists():
        raise UserError(f"--overwrite: {out} is not empty and is not a gradlore run directory; refusing to "
                        "delete it. Fix: choose another --out.")


def reset_run_dir(out: Path, overwrite: bool) -> None:
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def truncate_log(path: Path, step: int) -> None:
    """Drop JSONL lines a killed run wrote after its last checkpoint, so the resumed log has no duplicates."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if record.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class MetricsLog:
    """metrics.jsonl (one JSON object per line, flushed) + TensorBoard scalars."""

    def __init__(self, out: Path, purge_step: int | None) -> None:
        self.file = open(out / METRICS_FILE, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)
        except ImportError:  # tensorboard is a declared dependency; keep training if it is broken
            self.tb = None

    def write(self, record: dict[str, Any], prefix: str) -> None:
        self.file.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def plot_losses(out: Path) -> Path:
    """loss.png: training loss (raw and smoothed) and validation loss against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_losses(out / METRICS_FILE)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        steps, losses = zip(*train, strict=False)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
        ax.plot(steps, ema(list(losses)), color="tab:blue", lw=1.5, label="train (EMA 0.9)")
    if val:
        vs, vl = zip(*val, strict=False)
        ax.plot(vs, vl, "o-", color="tab:red", lw=1.5, ms=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(out.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / PLOT_FILE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ema(values: list[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (Adam's debiasing), so the curve starts on the data."""
    out, acc = [], 0.0
    for k, v in enumerate(values, 1):
        acc = beta * acc + (1 - beta) * v
        out.append(acc / (1 - beta**k))
    return out


def read_losses(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, train loss) and (step, validation loss) pairs from a metrics.jsonl."""
    train, val = [], []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train":
            train.append((r["step"], r["loss"]))
        elif r.get("kind") == "eval":
            val.append((r["step"], r["val_loss"]))
    return train, val
