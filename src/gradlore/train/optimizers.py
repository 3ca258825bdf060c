"""Optimizer construction for the training driver: plain AdamW, any gradlore preset, or the galore-torch peer.

AdamW (Loshchilov & Hutter, arXiv:1711.05101) is ``torch.optim.AdamW``. A gradlore preset
(GaLore arXiv:2403.03507, SVD-free DCT arXiv:2505.17967, Fira arXiv:2410.01623, FRUGAL arXiv:2411.07837, …)
is ``gradlore.LowRankAdamW(gradlore.param_groups(model, method=NAME, rank=r, ...))``: every targeted
weight W (m×n) keeps Adam moments of the projected gradient Pᵀ G (r×n) instead of G. ``galore-torch`` is
the authors' package (``GaLoreAdamW``), kept as a benchmark reference; its state holds Python projector
objects, so it cannot be checkpointed with ``weights_only=True`` and the driver refuses to resume it.
"""

from __future__ import annotations

from typing import Any

import torch

from gradlore.errors import UserError

PEERS = ("galore-torch",)


def gradlore_presets() -> list[str]:
    from gradlore.presets import PRESETS

    return sorted(PRESETS)


def check_optimizer(name: str) -> None:
    if name == "adamw" or name in PEERS:
        return
    names = gradlore_presets()
    if name not in names:
        raise UserError(f"unknown optimizer {name!r}. Fix: --optimizer adamw, one of the gradlore presets "
                        f"({', '.join(names)}), or {', '.join(PEERS)}.")


def _projected_overrides(cfg: Any) -> dict[str, Any]:
    extra = dict(cfg.overrides)
    if cfg.update_proj_gap is not None:
        extra["update_proj_gap"] = cfg.update_proj_gap
    if cfg.scale is not None:
        extra["scale"] = cfg.scale
    return extra


def build_optimizer(model: torch.nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg`` (an OptimConfig) over ``model``'s trainable parameters."""
    check_optimizer(cfg.name)
    betas = (cfg.beta1, cfg.beta2)
    common = dict(lr=cfg.lr, betas=betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "galore-torch":
        return _galore_torch(model, cfg, common)
    if cfg.name == "adamw":
        params: Any = [p for p in model.parameters() if p.requires_grad]
        cls: Any = torch.optim.AdamW
    else:
        import gradlore

        try:
            params = gradlore.param_groups(model, method=cfg.name, rank=cfg.rank,
                                           target_modules=cfg.target_modules, **_projected_overrides(cfg))
        except TypeError as exc:  # an override key the preset does not know
            raise UserError(f"optimizer {cfg.name}: {exc}. Fix: check optim.overrides.") from exc
        cls = gradlore.LowRankAdamW
    if cfg.layerwise:
        from gradlore.optim.layerwise import LayerwiseOptimizer

        return LayerwiseOptimizer(params, optimizer_cls=cls, **common)
    return cls(params, **common)


def _galore_torch(model: torch.nn.Module, cfg: Any, common: dict[str, Any]) -> torch.optim.Optimizer:
    """GaLore's own optimizer with GaLore's own target choice: the 2-D weights of attention and MLP."""
    if cfg.layerwise:
        raise UserError("galore-torch is only wired here in its ordinary (not layer-wise) form. "
                        "Fix: --set optim.layerwise=false.")
    from galore_torch import GaLoreAdamW

    lowrank, regular = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_target = p.dim() == 2 and any(k in name for k in ("self_attn", "mlp"))
        (lowrank if is_target else regular).append(p)
    groups = [
        {"params": regular},
        {"params": lowrank, "rank": cfg.rank, "update_proj_gap": cfg.update_proj_gap or 200,
         "scale": 0.25 if cfg.scale is None else cfg.scale, "proj_type": "std"},
    ]
    return GaLoreAdamW(groups, lr=common["lr"], betas=common["betas"], eps=common["eps"],
                       weight_decay=common["weight_decay"])


def state_bytes(optimizer: Any) -> int:
    """Bytes really retained by the optimizer state (any optimizer; see ``gradlore.optim.state_bytes``)."""
    from gradlore.optim import state_bytes as retained

    return int(retained(optimizer))
