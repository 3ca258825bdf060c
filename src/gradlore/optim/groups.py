"""Build param groups: which weights are projected, with which preset.

``target_modules`` follows peft/GaLore conventions:
- ``"all-linear"``: the 2-D weights of every ``nn.Linear`` (and GPT-2 ``Conv1D``, and the two factors of a
  factored layer, any module that names them in ``factor_names``) except the output head and embeddings;
- a list of name fragments (GaLore's ``["attn", "mlp"]``): a module whose name contains one;
- any other string: a regular expression searched in the module name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from gradlore.errors import UserError
from gradlore.optim.presets import PRESETS


def parse_targets(spec: str) -> str | list[str]:
    """A command line's target spec: "all-linear", "re:REGEX" (a regex), or comma-separated name fragments."""
    if spec == "all-linear":
        return spec
    if spec.startswith("re:"):
        return spec[3:]
    return [s.strip() for s in spec.split(",") if s.strip()]


def _output_head_ids(model: nn.Module) -> set[int]:
    """Weights of the output head and of embeddings (tied or not): never projected by 'all-linear'."""
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        ids.update(id(getattr(head, w)) for w in ("weight", *_weights(head)) if getattr(head, w, None) is not None)
    return ids


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' GPT-2 ``Conv1D`` (a linear layer with its weight stored transposed)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _weights(module: nn.Module) -> list[str]:
    """Names (within the module) of a linear layer's 2-D weights: ``weight``, or a factored layer's factors."""
    names = getattr(module, "factor_names", None) or (("weight",) if _is_linear(module) else ())
    return [n for n in names if isinstance(getattr(module, n, None), nn.Parameter) and getattr(module, n).dim() == 2]


def linear_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if _weights(m)]


def select_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the weight parameters to project."""
    candidates = linear_candidates(model)
    excluded = _output_head_ids(model)
    if target_modules == "all-linear":
        chosen = [n for n, m in candidates if not any(id(getattr(m, w)) in excluded for w in _weights(m))]
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise UserError(f"target_modules {target_modules!r} is not a valid regular expression: {exc}") from exc
        chosen = [n for n, _ in candidates if pattern.search(n)]
    else:
        fragments = list(target_modules)
        chosen = [n for n, _ in candidates if any(f in n for f in fragments)]
    if not chosen:
        names = [n for n, _ in candidates]
        shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        raise UserError(f"target_modules={target_modules!r} matches no linear layer of this model. "
                        f"candidates: {shown or '(none: the model has no nn.Linear)'}. "
                        "Pass 'all-linear', a list of name fragments, or a regex.")
    modules = dict(candidates)
    return [f"{n}.{w}" if n else w for n in chosen for w in _weights(modules[n])]


def param_groups(
    model: nn.Module,
    method: str = "galore",
    rank: int = 128,
    target_modules: str | Sequence[str] = "all-linear",
    **overrides: Any,
) -> list[dict]:
    """Two groups: the targeted weights with the preset's keys, everything else as plain AdamW.

    ``method="adamw"`` gives one plain group. Extra keyword arguments override the preset's keys
    (e.g. ``update_proj_gap=50``, ``scale=1.0``, ``lr=...`` for the projected group only).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise UserError("the model has no trainable parameters (all have requires_grad=False).")
    if method == "adamw":
        return [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]
    if method not in PRESETS:
        raise UserError(f"unknown method {method!r}; valid: adamw, {', '.join(PRESETS)}.")
    targets = set(select_targets(model, target_modules))
    # A weight whose shorter side is not above the rank would train as AdamW anyway: keep it with the rest.
    projected = [(n, p) for n, p in named if n in targets and min(p.shape) > rank]
    regular = [(n, p) for n, p in named if not (n in targets and min(p.shape) > rank)]
    groups = []
    if regular:
        groups.append({"params": [p for _, p in regular], "param_names": [n for n, _ in regular]})
    groups.append({"params": [p for _, p in projected], "param_names": [n for n, _ in projected],
                   **PRESETS[method](rank=rank, **overrides)})
    return groups
