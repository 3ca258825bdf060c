"""LLaMA-style causal language models from `transformers` (Touvron et al., arXiv:2302.13971).

Sizes follow GaLore's ``configs/llama_*.json`` (Zhao et al., arXiv:2403.03507): RMSNorm, SwiGLU MLP with
intermediate width ~8/3·d, rotary positions, untied embeddings. ``tiny`` and ``small`` train on a CPU
in seconds/minutes. The vocabulary size always comes from the tokenizer; ``--init PATH`` loads a
pretrained Hugging Face model folder instead of building a fresh one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gradlore.errors import UserError


@dataclass(frozen=True)
class LlamaSize:
    hidden: int
    intermediate: int
    heads: int
    layers: int


# name -> shape. GaLore's four sizes plus two CPU-sized ones.
SIZES: dict[str, LlamaSize] = {
    "tiny": LlamaSize(hidden=64, intermediate=172, heads=4, layers=2),
    "small": LlamaSize(hidden=256, intermediate=688, heads=4, layers=4),
    "llama_20m": LlamaSize(hidden=256, intermediate=688, heads=4, layers=4),
    "llama_60m": LlamaSize(hidden=512, intermediate=1376, heads=8, layers=8),
    "llama_130m": LlamaSize(hidden=768, intermediate=2048, heads=12, layers=12),
    "llama_350m": LlamaSize(hidden=1024, intermediate=2736, heads=16, layers=24),
    "llama_1b": LlamaSize(hidden=2048, intermediate=5461, heads=32, layers=24),
}


def check_size(name: str) -> None:
    if name not in SIZES:
        raise UserError(f"unknown model size {name!r}. Fix: --model one of {', '.join(SIZES)} "
                        "(or --init PATH for a pretrained folder).")


def build_model(size: str, vocab_size: int, max_positions: int) -> torch.nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` of the named size (seed torch first for repeatability)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    check_size(size)
    s = SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        num_hidden_layers=s.layers,
        max_position_embeddings=max(max_positions, 128),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_cache=False,
    )
    return LlamaForCausalLM(config)


def load_pretrained(path: str) -> torch.nn.Module:
    """A pretrained causal LM from a local Hugging Face folder, in float32 for training."""
    from transformers import AutoModelForCausalLM

    folder = Path(path).expanduser()
    if not (folder / "config.json").exists():
        raise UserError(f"--init {path}: no config.json there. Fix: give a Hugging Face model folder "
                        "(config.json + weights), e.g. a run's final/ folder.")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except Exception as exc:  # transformers raises OSError/ValueError for unusable folders
        raise UserError(f"--init {path}: could not load the model ({exc}). Fix: check the folder.") from exc
    model.config.use_cache = False
    return model


def model_vocab_size(model: torch.nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])
