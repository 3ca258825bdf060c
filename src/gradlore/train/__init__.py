"""The training driver: typed config and presets, the one training loop (``Trainer``) with hooks, checkpoints."""

from gradlore.train.config import RunConfig
from gradlore.train.hooks import Hook
from gradlore.train.presets import PRESETS, preset, resolve
from gradlore.train.trainer import Trainer, run

__all__ = ["PRESETS", "Hook", "RunConfig", "Trainer", "preset", "resolve", "run"]
