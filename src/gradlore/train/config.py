"""Typed, self-validating run configuration, ``--set`` overrides, and what ``--resume`` may change.

A run is one ``RunConfig``: ``data`` (``gradlore.data.config``), ``model``, ``optim``
(``gradlore.optim.build``), ``schedule``, ``train``, ``analysis`` and ``memory`` (``gradlore.train.memory``).
Presets are Python functions (``gradlore.train.presets``). Overrides name a field by its dotted path
(``optim.rank=64``); the value is parsed by the field's type, and an unknown field or a value of the wrong
type is a UserError that names the field, suggests the closest one and lists what would work.

The learning rate at step t (0-based, warmup W, total S, floor ρ) is

    lr(t) = lr · (t+1)/W                                         for t < W
    lr(t) = lr · (ρ + (1-ρ)·½(1 + cos(π·(t-W)/(S-W))))            otherwise.

Resuming continues the *same* run: a field in ``FIXED_ON_RESUME`` (what is trained, on what data, with which
optimizer) is refused when it differs from the saved run, naming both values; every other field (LR, steps,
schedule, cadences, clipping, weight decay) is applied from the resumed step on and recorded.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gradlore.data.config import DataConfig
from gradlore.errors import UserError, did_you_mean, require_positive
from gradlore.models import check_size
from gradlore.optim.build import OptimConfig
from gradlore.train.memory import MemoryConfig

TRAINABLE = ("all", "lrc", "lrc+norms")
PARALLEL = ("none", "ddp", "fsdp2")  # train.parallel (gradlore.train.distributed)


@dataclass
class ModelConfig:
    size: str = "small"              # a name in gradlore.models.SIZES
    init: str = ""                   # model folder (dense or compressed) or alias to fine-tune ("" = from scratch)
    trainable: str = "all"           # all | lrc (low-rank factors only) | lrc+norms

    def validate(self) -> None:
        if not self.init:
            check_size(self.size)
        if self.trainable not in TRAINABLE:
            raise UserError(f"model.trainable={self.trainable!r} is not one of {', '.join(TRAINABLE)}."
                            f"{did_you_mean(self.trainable, TRAINABLE)}")


@dataclass
class ScheduleConfig:
    warmup_steps: int = -1           # -1 = 10% of train.steps (GaLore)
    min_lr_ratio: float = 0.1        # cosine floor as a fraction of the peak LR (1.0 = constant after warmup)

    def validate(self) -> None:
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"schedule.min_lr_ratio={self.min_lr_ratio} must be in [0, 1].")


@dataclass
class TrainConfig:
    steps: int = 300                 # optimizer steps
    batch_size: int = 4              # sequences per micro-batch
    grad_accum: int = 1              # micro-batches per optimizer step
    bf16: bool = False               # bfloat16 autocast for forward/backward
    seed: int = 0
    eval_every: int = 100            # steps between validation passes (and one at the end)
    eval_batches: int = 16           # validation micro-batches per pass (0 = all held-out blocks)
    log_every: int = 1
    ckpt_every: int = 100            # steps between checkpoints (and at the end, and on SIGINT/SIGTERM)
    save_final_model: bool = True    # write final/ as a Hugging Face folder (usable with --init)
    max_bad_steps: int = 5           # consecutive non-finite steps that stop the run
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    threads: int = 0                 # torch.set_num_threads (0 = leave torch's default)
    progress: bool = True            # tqdm progress bar
    parallel: str = "none"           # none | ddp | fsdp2 (under torchrun; gradlore.train.distributed)
    owner_refresh: bool = True       # parallel: each projection refresh computed by one rank and broadcast

    def validate(self) -> None:
        require_positive(self, "train", "steps", "batch_size", "grad_accum", "eval_every", "log_every",
                         "ckpt_every", "max_bad_steps")
        if self.eval_batches < 0 or self.threads < 0:
            raise UserError("train.eval_batches and train.threads must be >= 0.")
        if self.parallel not in PARALLEL:
            raise UserError(f"train.parallel={self.parallel!r} is not one of {', '.join(PARALLEL)}."
                            f"{did_you_mean(self.parallel, PARALLEL)}")


@dataclass
class AnalysisConfig:
    every: int = 0                   # record gradient-rank statistics every K steps (0 = off)
    rank: int = 8                    # r of the subspace whose drift between records is measured
    top_k: int = 8                   # leading singular values stored per record
    weights: bool = True             # also record each weight's stable rank
    target_modules: str = "all-linear"  # "all-linear", comma-separated name fragments, or re:REGEX

    def validate(self) -> None:
        if self.every < 0:
            raise UserError(f"analysis.every={self.every} must be >= 0 (0 = off).")
        if self.every:
            require_positive(self, "analysis", "rank", "top_k")


@dataclass
class RunConfig:
    preset: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def sections(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "preset"}

    def validate(self) -> RunConfig:
        for section in self.sections().values():
            section.validate()
        if self.schedule.warmup_steps >= self.train.steps:
            raise UserError(f"schedule.warmup_steps={self.schedule.warmup_steps} must be below train.steps="
                            f"{self.train.steps}. Fix: fewer warmup steps (or -1 for 10%).")
        if self.train.parallel != "none":  # the sharded step takes float32 weights and fp32 moments only
            compact = [f"optim.{k}={v}" for k, v in (("state", self.optim.state),
                                                     ("plain_state", self.optim.plain_state)) if v not in ("", "fp32")]
            if self.memory.weights != "fp32" or compact:
                what = ", ".join([*([f"memory.weights={self.memory.weights}"] if self.memory.weights != "fp32" else []),
                                  *compact])
                raise UserError(f"train.parallel={self.train.parallel}: {what} is not supported on several processes "
                                "(the sharded step updates float32 weights with fp32 moments). Fix: --set "
                                "memory.weights=fp32 --set optim.state=fp32 --set optim.plain_state=fp32 (--memory low "
                                "sets them), or train on one process.")
            if self.optim.group_overrides().get("residual") == "ef":
                raise UserError(f"train.parallel={self.train.parallel}: optim.residual=ef (error feedback) is not "
                                "supported on several processes yet (its buffer is not sharded). Fix: another "
                                "residual (discard, fira, sign), or train on one process.")
        return self

    @property
    def warmup(self) -> int:
        return self.schedule.warmup_steps if self.schedule.warmup_steps >= 0 else self.train.steps // 10

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Rebuild a config written by ``to_dict``; a key this version does not know is a UserError."""
        cfg = cls()
        for name, value in d.items():
            if name == "preset":
                cfg.preset = value
                continue
            section = cfg.sections().get(name)
            if section is None or not isinstance(value, dict):
                raise UserError(f"config section {name!r} is not known here.{did_you_mean(name, cfg.sections())}")
            known = {f.name for f in dataclasses.fields(section)}
            for key, v in value.items():
                if key not in known:
                    raise UserError(f"config field {name}.{key} is not known here.{did_you_mean(key, known)}")
                setattr(section, key, v)
        return cfg


def load_run_config(path: Path) -> RunConfig:
    """A run folder's saved ``config.json``; unreadable or foreign content is a UserError naming the file."""
    try:
        return RunConfig.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, UserError, AttributeError, TypeError) as exc:
        raise UserError(f"--resume: {path} is not a readable gradlore run config ({str(exc)[:200]}). Fix: restore "
                        "the file from the run (it is rewritten at every start), or start again with --overwrite.") from None


# -------------------------------------------------------------------------------------------- overrides
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _parse(text: str, typ: Any, where: str) -> Any:
    """Parse ``text`` as a value of the annotated type ``typ`` (int, float, bool, str, dict, X | None)."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        (typ,) = [a for a in args if a is not type(None)]
    try:
        if typ is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError
        if typ is int:
            return int(float(text)) if "e" in text.lower() and float(text).is_integer() else int(text)
        if typ is float:
            return float(text)
        if typ is dict or typing.get_origin(typ) is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError
            return value
        return text
    except (ValueError, json.JSONDecodeError):
        name = getattr(typ, "__name__", str(typ))
        article = "an" if name[:1] in "aeiou" else "a"
        raise UserError(f"--set {where}={text}: expected {article} {name} value. "
                        f"Fix: e.g. --set {where}={_example(typ)}.") from None


def _example(typ: Any) -> str:
    return {bool: "true", int: "64", float: "1e-3", dict: '\'{"key": 1}\''}.get(typ, "VALUE")


def field_names(cfg: RunConfig) -> list[str]:
    return [f"{s}.{f.name}" for s, obj in cfg.sections().items() for f in dataclasses.fields(obj)]


def apply_override(cfg: RunConfig, assignment: str) -> str:
    """Apply one ``section.field=value`` assignment to ``cfg`` in place; returns the field's dotted name."""
    key, eq, text = assignment.partition("=")
    key = key.strip()
    if not eq or "." not in key:
        raise UserError(f"--set {assignment!r}: expected SECTION.FIELD=VALUE. Fix: e.g. --set optim.rank=64.")
    section_name, _, field_name = key.partition(".")
    section = cfg.sections().get(section_name)
    if section is None or field_name not in {f.name for f in dataclasses.fields(section)}:
        valid = field_names(cfg)
        raise UserError(f"--set: unknown config field {key!r}.{did_you_mean(key, valid)} "
                        f"Fix: use one of {', '.join(valid)}.")
    hints = typing.get_type_hints(type(section))
    setattr(section, field_name, _parse(text.strip(), hints[field_name], key))
    return key


# ----------------------------------------------------------------------------------------------- resume
# What a resumed run may not change: the model, its data, the optimizer and its subspace, the batch.
FIXED_ON_RESUME = (
    "data.*", "model.*", "optim.name", "optim.rank", "optim.update_proj_gap", "optim.scale", "optim.target_modules",
    "optim.overrides", "optim.layerwise", "optim.beta1", "optim.beta2", "optim.eps", "train.batch_size",
    "train.grad_accum", "train.seed", "train.bf16", "optim.state", "optim.plain_state", "optim.plain_lr_ratio",
    "memory.weights",
)


def _fixed(key: str) -> bool:
    return key in FIXED_ON_RESUME or f"{key.split('.')[0]}.*" in FIXED_ON_RESUME


def resume_changes(saved: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """Fields that differ between the saved run and the resumed one: {field: (old, new)}.

    Raises a UserError naming every field that a resumed run may not change.
    """
    old_d, new_d = saved.to_dict(), new.to_dict()
    changes = {f"{s}.{k}": (old_d[s][k], v) for s in new.sections() for k, v in new_d[s].items() if old_d[s][k] != v}
    refused = {k: v for k, v in changes.items() if _fixed(k)}
    if refused:
        listed = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, (a, b) in refused.items())
        raise UserError(f"--resume continues the same run, so these cannot change: {listed}. Fix: drop them to "
                        "continue the run, or start a new run (--out NEW_DIR, or --overwrite).")
    return changes
