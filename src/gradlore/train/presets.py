"""Run presets: each a Python function returning a ``RunConfig`` (``--preset NAME``).

The ``galore_*`` presets reproduce GaLore's C4 pretraining protocol (Zhao et al., arXiv 2403.03507, §5.1):
LLaMA 60M–1B, sequence length 256, 512 sequences per step, LR warmup over 10% of the steps then cosine
decay to 10% of the peak, rank 128–512, projector refresh every 200 steps, scale 0.25, bf16.
"""

from __future__ import annotations

from collections.abc import Callable

from gradlore.errors import UserError, did_you_mean
from gradlore.train.config import RunConfig, apply_override


def default() -> RunConfig:
    """The no-argument job: small LLaMA (4×256), BPE-4k on Shakespeare, DCT rank 64 in GaLore's recipe
    (``dct-galore``: at this budget and LR it beats the per-step published ``dct``; issue 9), a few CPU minutes."""
    cfg = RunConfig(preset="default")
    cfg.train.threads = 2
    return cfg


def tiny() -> RunConfig:
    """Seconds on a CPU: 2×64 LLaMA, BPE-512, 64-token blocks, on the text the package carries."""
    cfg = RunConfig(preset="tiny")
    cfg.data.path = "tiny-shakespeare"
    cfg.model.size = "tiny"
    cfg.data.vocab_size, cfg.data.block_size = 512, 64
    cfg.optim.rank, cfg.optim.update_proj_gap, cfg.optim.lr = 16, 10, 3e-3
    cfg.train.steps, cfg.train.batch_size = 30, 4
    cfg.train.eval_every, cfg.train.eval_batches, cfg.train.ckpt_every = 10, 4, 10
    cfg.train.threads, cfg.train.progress = 1, False
    return cfg


def analyze() -> RunConfig:
    """``gradlore analyze``: a 4×128 LLaMA trained with AdamW while gradient-rank statistics are recorded."""
    cfg = RunConfig(preset="analyze")
    cfg.data.path, cfg.data.vocab_size, cfg.data.block_size = "tiny-shakespeare", 2048, 128
    cfg.model.size = "analyze"
    cfg.optim.name, cfg.optim.lr, cfg.optim.rank, cfg.optim.grad_clip = "adamw", 1e-3, 32, 0.0
    cfg.schedule.min_lr_ratio = 0.0  # warmup over 10% of the steps, then cosine to zero
    cfg.train.steps, cfg.train.batch_size, cfg.train.eval_every, cfg.train.threads = 300, 16, 100, 2
    cfg.analysis.every = 10
    return cfg


def finetune() -> RunConfig:
    """``gradlore finetune``: a pretrained (or compressed) model, its own tokenizer, warmup then a constant LR.

    Only the low-rank components of a WeLore-compressed model train (``model.trainable=lrc``; WeLore
    arXiv 2407.11239); ``gradlore finetune --full`` trains every weight (the dense baseline).
    """
    cfg = RunConfig(preset="finetune")
    cfg.model.trainable = "lrc"
    cfg.optim.name, cfg.optim.lr, cfg.optim.rank = "adamw", 1e-4, 128
    cfg.schedule.min_lr_ratio = 1.0  # warmup over 10% of the steps, then constant
    cfg.train.steps, cfg.train.eval_every, cfg.train.ckpt_every, cfg.train.threads = 100, 50, 50, 2
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
    "analyze": analyze,
    "finetune": finetune,
    "galore_60m": galore_60m,
    "galore_130m": galore_130m,
    "galore_350m": galore_350m,
    "galore_1b": galore_1b,
}


def preset(name: str) -> RunConfig:
    if name not in PRESETS:
        raise UserError(f"unknown config preset {name!r}.{did_you_mean(name, PRESETS)} "
                        f"Fix: --preset one of {', '.join(PRESETS)}.")
    return PRESETS[name]()


def resolve(preset_name: str, overrides: list[str]) -> RunConfig:
    """Preset + overrides, validated."""
    cfg = preset(preset_name)
    for assignment in overrides:
        apply_override(cfg, assignment)
    return cfg.validate()
