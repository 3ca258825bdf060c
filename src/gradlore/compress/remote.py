"""Compressed folders that standard Hugging Face tools load: ``auto_map`` to a modeling file written beside the weights.

``gradlore compress`` output (``model.safetensors`` with each low-rank component as ``weight_a`` (r, in) and
``weight_b`` (out, r), ``welore.json`` with every layer's rank) gets two more things here:

- ``modeling_welore.py``: a copy of :mod:`gradlore.compress.remote_modeling` (torch + transformers only) that
  builds the base architecture and swaps in the factored layers;
- ``config.json``: ``model_type = "gradlore_welore"``, the base ``welore_base_model_type``, the layer table
  ``welore_layers`` and ``auto_map`` for ``AutoConfig`` / ``AutoModelForCausalLM``.

So ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` (and everything built on it:
``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True``, pipelines, Trainer) gives the model
``gradlore.load_compressed(DIR)`` gives, with identical outputs. Without ``trust_remote_code`` the unknown model
type is an error, never a dense model with missing weights. ``base_config`` reads either kind of folder back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODELING_FILE = "modeling_welore.py"
MODEL_TYPE = "gradlore_welore"
_TEMPLATE = Path(__file__).with_name("remote_modeling.py")
_BASE_LINE = 'BASE_MODEL_TYPE = "llama"'
_OWN_KEYS = ("model_type", "welore_base_model_type", "welore_layers", "auto_map", "architectures",
             "welore_base_architectures")


def write_remote_code(folder: Path, layers: dict[str, Any], architectures: list[str]) -> None:
    """Make ``folder`` (a compressed model being saved) loadable through ``trust_remote_code``."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    base = config.get("welore_base_model_type", config["model_type"])
    code = _TEMPLATE.read_text()
    if _BASE_LINE not in code:
        raise RuntimeError(f"{_TEMPLATE} lost its line {_BASE_LINE!r}")
    (folder / MODELING_FILE).write_text(code.replace(_BASE_LINE, f"BASE_MODEL_TYPE = {base!r}", 1))
    stem = MODELING_FILE.removesuffix(".py")
    config.update(model_type=MODEL_TYPE, welore_base_model_type=base, welore_layers=layers,
                  architectures=["WeLoreForCausalLM"],
                  auto_map={"AutoConfig": f"{stem}.WeLoreConfig", "AutoModelForCausalLM": f"{stem}.WeLoreForCausalLM"},
                  welore_base_architectures=architectures)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def base_config(path: Path) -> Any:
    """The dense architecture's config of a compressed folder (written with or without the remote code)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") != MODEL_TYPE:
        return AutoConfig.from_pretrained(path)
    base = config["welore_base_model_type"]
    dense = {k: v for k, v in config.items() if k not in _OWN_KEYS}
    return CONFIG_MAPPING[base].from_dict({**dense, "architectures": config.get("welore_base_architectures")})
