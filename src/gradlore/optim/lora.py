"""LoRA (Hu et al., arXiv 2106.09685) through the real `peft` library: the baseline gradlore is compared with.

LoRA freezes every weight W (out, in) and trains a low-rank update beside the chosen linear layers:

    y = x Wᵀ + (α / r) · x Aᵀ Bᵀ          A (r, in) random, B (out, r) zero at the start

so only r·(in + out) numbers per layer train (with AdamW). It changes the *model*, not the optimizer, so in
``gradlore train --optimizer lora`` it is applied to the model (``add_lora``) and the optimizer is plain
AdamW over the adapters. The layers are chosen with gradlore's own ``target_modules`` rule
(``gradlore.optim.groups.select_targets``: "all-linear" = every linear layer but the head and embeddings,
name fragments, or a regex), so LoRA and the projected optimizers train the same layers. peft is given
their full names, which it matches exactly.

Options (``--set optim.overrides='{"lora_alpha": 32}'``): ``lora_alpha`` (default 2·r, the common
heuristic; the update is scaled by α/r), ``lora_dropout`` (0), ``use_rslora`` (α/√r instead of α/r,
arXiv 2312.03732).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from gradlore.compress.lowrank_linear import is_dense_linear
from gradlore.errors import UserError, did_you_mean
from gradlore.optim.groups import parse_targets, select_targets
from gradlore.registry import Option

LORA_OPTIONS: dict[str, Option] = {
    "lora_alpha": Option(None, (float, type(None)), check=lambda v: v is None or v > 0, rule="a positive number",
                         doc="scale numerator α (the update is α/r · B A); None = 2·rank"),
    "lora_dropout": Option(0.0, float, check=lambda v: 0 <= v < 1, rule="in [0, 1)", doc="dropout on the adapter's input"),
    "use_rslora": Option(False, bool, doc="scale by α/√r (rank-stabilised LoRA, arXiv 2312.03732)"),
}


def check_lora_options(options: dict[str, Any], where: str = "optimizer lora") -> dict[str, Any]:
    """The LoRA options with their defaults filled in; an unknown key or a bad value is a UserError."""
    for key, value in options.items():
        if key not in LORA_OPTIONS:
            raise UserError(f"{where}: unknown option {key!r}.{did_you_mean(key, LORA_OPTIONS)} "
                            f"Valid keys: {', '.join(LORA_OPTIONS)}.")
        LORA_OPTIONS[key].validate(key, value, where)
    return {k: options.get(k, opt.default) for k, opt in LORA_OPTIONS.items()}


def lora_targets(model: nn.Module, target_modules: str) -> list[str]:
    """Full names of the dense linear layers LoRA wraps (gradlore's target rule; factored layers are skipped)."""
    modules = dict(model.named_modules())
    names = [n.rsplit(".", 1)[0] for n in select_targets(model, parse_targets(target_modules))]
    chosen = [n for n in dict.fromkeys(names) if is_dense_linear(modules[n])]
    if not chosen:
        raise UserError(f"LoRA: target_modules={target_modules!r} selects no dense linear layer (peft cannot wrap "
                        "gradlore's factored layers). Fix: choose dense layers, e.g. --set optim.target_modules=all-linear.")
    return chosen


def add_lora(model: nn.Module, rank: int, target_modules: str = "all-linear",
             options: dict[str, Any] | None = None) -> nn.Module:
    """``model`` wrapped by ``peft.get_peft_model``: every weight frozen, rank-``rank`` adapters on the targets."""
    from peft import LoraConfig, get_peft_model  # optional, heavy: imported when LoRA is used

    opts = check_lora_options(dict(options or {}))
    config = LoraConfig(r=rank, lora_alpha=opts["lora_alpha"] or 2 * rank, lora_dropout=opts["lora_dropout"],
                        use_rslora=opts["use_rslora"], target_modules=lora_targets(model, target_modules),
                        bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft 0.21 calls a transformers API that 5.x renamed
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def is_lora(model: nn.Module) -> bool:
    return callable(getattr(model, "merge_and_unload", None)) and hasattr(model, "peft_config")


def merged(model: nn.Module) -> nn.Module:
    """The base model with each adapter folded into its weight (W + α/r · B A): a plain model, no peft needed."""
    return model.merge_and_unload() if is_lora(model) else model
