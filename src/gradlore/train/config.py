"""Typed, self-validating training configuration, presets as Python functions, and ``--set`` overrides.

The protocol reproduced by the ``galore_*`` presets is GaLore's C4 pretraining (Zhao et al.,
arXiv:2403.03507, §5.1): LLaMA 60M–1B, sequence length 256, 512 sequences per step, LR warmup over
10% of the steps then cosine decay to 10% of the peak, rank 128–512, projector refresh every 200
steps, scale 0.25, bf16. The learning rate at step t (0-based, warmup W, total S, floor ρ) is

    lr(t) = lr · (t+1)/W                                         for t < W
    lr(t) = lr · (ρ + (1-ρ)·½(1 + cos(π·(t-W)/(S-W))))            otherwise.

Overrides name a field by its dotted path (``optim.rank=64``); the value is parsed by the field's type,
and an unknown field or a value of the wrong type is a UserError that lists what would work.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from gradlore.errors import UserError


@dataclass
class DataConfig:
    path: str = "shakespeare"        # file, folder, JSONL, corpus name, or hf:NAME[:CONFIG]
    tokenizer: str = "bpe"           # "bpe" (train on the corpus, cached) or a folder / .model / .json
    vocab_size: int = 4096           # BPE vocabulary when tokenizer == "bpe"
    block_size: int = 256            # tokens per training sequence
    val_fraction: float = 0.05       # tail of a local corpus held out for validation
    val_blocks: int = 64             # validation blocks taken from a stream or a val split
    text_field: str = "text"         # JSONL / dataset field that holds the text
    split: str = "train"             # dataset split to train on (hf: only)
    val_split: str = ""              # dataset split to validate on (hf: only; "" = hold out the stream head)
    streaming: bool = False          # stream an hf: dataset instead of downloading it whole
    data_files: str = ""             # passed to datasets.load_dataset (e.g. hf:json with a local file)
    bpe_train_docs: int = 20000      # documents of a stream used to train the BPE

    def validate(self) -> None:
        _positive(self, "vocab_size", "block_size", "val_blocks", "bpe_train_docs")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction={self.val_fraction} must be in (0, 1). Fix: e.g. 0.05.")
        if self.streaming and not self.path.startswith("hf:"):
            raise UserError("data.streaming=true needs an hf:DATASET path. Fix: drop data.streaming.")


@dataclass
class ModelConfig:
    size: str = "small"              # a name in gradlore.train.models.SIZES
    init: str = ""                   # pretrained Hugging Face folder to fine-tune ("" = train from scratch)

    def validate(self) -> None:
        if not self.init:
            from gradlore.train.models import check_size

            check_size(self.size)


@dataclass
class OptimConfig:
    name: str = "dct"                # "adamw", a gradlore preset (gradlore.presets.PRESETS), or "galore-torch"
    lr: float = 3e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    rank: int = 64
    update_proj_gap: int | None = None   # None = the preset's own default
    scale: float | None = None           # None = the preset's own default
    target_modules: str = "all-linear"
    overrides: dict = field(default_factory=dict)  # any other param-group key of the preset, as JSON
    grad_clip: float = 1.0               # clip by global norm; 0 = off
    layerwise: bool = False              # update each weight inside backward and free its grad

    def validate(self) -> None:
        _positive(self, "lr", "rank")
        if self.update_proj_gap is not None and self.update_proj_gap <= 0:
            raise UserError("optim.update_proj_gap must be > 0. Fix: e.g. --set optim.update_proj_gap=200.")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise UserError("optim.grad_clip and optim.weight_decay must be >= 0.")
        if self.layerwise and self.grad_clip > 0:
            raise UserError("layer-wise updates happen inside backward, so global-norm clipping is impossible. "
                            "Fix: --set optim.grad_clip=0 with optim.layerwise=true.")
        from gradlore.train.optimizers import check_optimizer

        check_optimizer(self.name)


@dataclass
class ScheduleConfig:
    warmup_steps: int = -1           # -1 = 10% of train.steps (GaLore)
    min_lr_ratio: float = 0.1        # cosine floor as a fraction of the peak LR

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

    def validate(self) -> None:
        _positive(self, "steps", "batch_size", "grad_accum", "eval_every", "log_every", "ckpt_every",
                  "max_bad_steps")
        if self.eval_batches < 0 or self.threads < 0:
            raise UserError("train.eval_batches and train.threads must be >= 0.")


@dataclass
class RunConfig:
    preset: str = "default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> RunConfig:
        for section in (self.data, self.model, self.optim, self.schedule, self.train):
            section.validate()
        if self.schedule.warmup_steps >= self.train.steps:
            raise UserError(f"schedule.warmup_steps={self.schedule.warmup_steps} must be below train.steps="
                            f"{self.train.steps}. Fix: fewer warmup steps (or -1 for 10%).")
        if self.optim.layerwise and self.train.grad_accum > 1 and self.optim.name == "galore-torch":
            raise UserError("galore-torch has no layer-wise mode with accumulation here. Fix: optim.layerwise=false.")
        return self

    @property
    def warmup(self) -> int:
        return self.schedule.warmup_steps if self.schedule.warmup_steps >= 0 else self.train.steps // 10

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        cfg = cls()
        for name, value in d.items():
            if name == "preset":
                cfg.preset = value
                continue
            section = getattr(cfg, name)
            for key, v in value.items():
                setattr(section, key, v)
        return cfg


def _positive(obj: Any, *names: str) -> None:
    section = type(obj).__name__.replace("Config", "").lower()
    for name in names:
        if getattr(obj, name) <= 0:
            raise UserError(f"{section}.{name}={getattr(obj, name)} must be > 0.")


# ---------------------------------------------------------------------------------------------- presets
def default() -> RunConfig:
    """The no-argument job: small LLaMA (4×256), BPE-4k on Shakespeare, DCT rank 64, a few CPU minutes."""
    cfg = RunConfig(preset="default")
    cfg.train.threads = 2
    return cfg


def tiny() -> RunConfig:
    """Seconds on a CPU: 2×64 LLaMA, BPE-512, 64-token blocks; tests and the golden loss curve use it."""
    cfg = RunConfig(preset="tiny")
    cfg.model.size = "tiny"
    cfg.data.vocab_size, cfg.data.block_size = 512, 64
    cfg.optim.rank, cfg.optim.update_proj_gap, cfg.optim.lr = 16, 10, 3e-3
    cfg.train.steps, cfg.train.batch_size = 30, 4
    cfg.train.eval_every, cfg.train.eval_batches, cfg.train.ckpt_every = 10, 4, 10
    cfg.train.threads, cfg.train.progress = 1, False
    return cfg


def _galore(size: str, steps: int, rank: int) -> RunConfig:
    cfg = RunConfig(preset=f"galore_{size.split('_')[1]}")
    cfg.model.size = size
    cfg.data.path, cfg.data.streaming, cfg.data.val_split = "hf:allenai/c4:en", True, "validation"
    cfg.data.vocab_size, cfg.data.block_size = 32000, 256
    cfg.optim.name, cfg.optim.lr, cfg.optim.rank = "galore", 1e-2, rank
    cfg.optim.update_proj_gap, cfg.optim.scale, cfg.optim.grad_clip = 200, 0.25, 0.0
    cfg.train.steps, cfg.train.batch_size, cfg.train.grad_accum, cfg.train.bf16 = steps, 128, 4, True
    cfg.train.eval_every, cfg.train.ckpt_every, cfg.train.eval_batches = 1000, 1000, 80
    return cfg


def galore_60m() -> RunConfig:
    """GaLore Table 2: LLaMA 60M on C4, 10K steps (1.1B tokens), rank 128."""
    return _galore("llama_60m", 10_000, 128)


def galore_130m() -> RunConfig:
    """GaLore Table 2: LLaMA 130M on C4, 20K steps (2.2B tokens), rank 256."""
    return _galore("llama_130m", 20_000, 256)


def galore_350m() -> RunConfig:
    """GaLore Table 2: LLaMA 350M on C4, 60K steps (6.4B tokens), rank 256."""
    return _galore("llama_350m", 60_000, 256)


def galore_1b() -> RunConfig:
    """GaLore Table 2: LLaMA 1B on C4, 100K steps (13.1B tokens), rank 512."""
    return _galore("llama_1b", 100_000, 512)


PRESETS: dict[str, Callable[[], RunConfig]] = {
    "default": default,
    "tiny": tiny,
    "galore_60m": galore_60m,
    "galore_130m": galore_130m,
    "galore_350m": galore_350m,
    "galore_1b": galore_1b,
}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise UserError(f"unknown config preset {name!r}. Fix: --preset one of {', '.join(PRESETS)}.")
    return PRESETS[name]()


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


def apply_override(cfg: RunConfig, assignment: str) -> None:
    """Apply one ``section.field=value`` assignment to ``cfg`` in place."""
    key, eq, text = assignment.partition("=")
    key = key.strip()
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "preset"}
    valid = [f"{s}.{f.name}" for s, obj in sections.items() for f in dataclasses.fields(obj)]
    if not eq or "." not in key:
        raise UserError(f"--set {assignment!r}: expected SECTION.FIELD=VALUE. Fix: e.g. --set optim.rank=64.")
    section_name, _, field_name = key.partition(".")
    section = sections.get(section_name)
    if section is None or field_name not in {f.name for f in dataclasses.fields(section)}:
        import difflib

        close = difflib.get_close_matches(key, valid, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"--set: unknown config field {key!r}.{hint} Fix: use one of {', '.join(valid)}.")
    hints = typing.get_type_hints(type(section))
    setattr(section, field_name, _parse(text.strip(), hints[field_name], key))


def resolve(preset_name: str, overrides: list[str]) -> RunConfig:
    """Preset + overrides, validated."""
    cfg = preset(preset_name)
    for assignment in overrides:
        apply_override(cfg, assignment)
    return cfg.validate()
