"""Build an optimizer from a typed config: the one builder for the training driver, fine-tuning and benchmarks.

- ``adamw``: ``torch.optim.AdamW`` (Loshchilov & Hutter, arXiv 1711.05101), fused where torch has it.
- a gradlore preset (``galore``, ``dct``, ``fira``, ``frugal``, ``dct-fira``; ``gradlore.optim.presets``):
  ``LowRankAdamW(param_groups(model, method=NAME, rank=r, ...))``: every targeted weight W (m×n) keeps Adam
  moments of its projected gradient Pᵀ G (r×n) instead of G.
- ``lora``: LoRA through `peft` (``gradlore.optim.lora``): the model gets rank-r adapters (applied to the model
  by the training driver, ``gradlore.train.lora``) and this builds AdamW over what is trainable: the adapters.
- a peer package, for comparison: ``galore-torch`` (GaLore's authors' ``GaLoreAdamW``), ``fira-adamw``
  (Fira's authors' ``FiraAdamW``) and ``apollo`` (APOLLO's authors' ``APOLLOAdamW``, arXiv 2412.05270: a random
  rank-r projection only estimates channel-wise scales of the raw gradient), on GaLore's own choice of targets
  (the 2-D weights of attention and MLP modules). Their states hold Python projector objects, so they cannot
  be checkpointed with ``weights_only=True`` and the driver refuses to resume them.

``state`` / ``plain_state`` choose the state format (``fp32``, ``8bit``, ``factored``: how the Adam moments are
stored) of the projected weights and of every other parameter (embeddings, output head, norms); ``adamw`` with
a compact format, layer-wise updates or bf16 weights is LowRankAdamW with one plain group (torch's AdamW math).

``plain_lr_ratio`` sets the LR of a preset's unprojected parameters (embeddings, a tied head, norms, biases:
trained with plain AdamW) to ``lr × ratio``; fine-tuning often wants them moved more gently than the projected
weights (LoRA leaves them frozen).

With ``layerwise`` every parameter is updated inside backward (``LayerwiseOptimizer``), for any of them but
the peers. ``no_decay`` names parameters that take no weight decay (Hugging Face's split: biases and norms);
each group is then split in two, the second with ``weight_decay=0``.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradlore.errors import UserError, did_you_mean, require_positive
from gradlore.optim.groups import param_groups, parse_targets
from gradlore.optim.layerwise import LayerwiseOptimizer
from gradlore.optim.lora import check_lora_options
from gradlore.optim.lowrank_adamw import LowRankAdamW
from gradlore.optim.parts import QUANT_OPTIONS, STATE_FORMATS, check_options
from gradlore.optim.presets import PRESETS
from gradlore.optim.rounding import ROUNDING, is_wide


@dataclass
class OptimConfig:
    name: str = "dct-galore"         # "adamw", a gradlore preset, or a peer ("galore-torch", "fira-adamw")
    lr: float = 3e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    rank: int = 64
    update_proj_gap: int | None = None   # None = the preset's own default
    scale: float | None = None           # None = the preset's own default
    target_modules: str = "all-linear"   # "all-linear", comma-separated name fragments, or re:REGEX
    overrides: dict = field(default_factory=dict)  # any other param-group key of the preset, as JSON
    grad_clip: float = 1.0               # clip by global norm; 0 = off
    layerwise: bool = False              # update each weight inside backward and free its grad
    state: str = ""                      # state format of projected weights: fp32 | 8bit | factored ("" = preset's)
    plain_state: str = ""                # state format of every other parameter ("" = as the projected ones)
    rounding: str = "stochastic"         # how an update is rounded into a bf16 weight: stochastic | nearest
    plain_lr_ratio: float = 1.0          # lr of the unprojected parameters (embeddings, head, norms) = lr × this

    def validate(self) -> None:
        require_positive(self, "optim", "lr", "rank")
        if self.update_proj_gap is not None and self.update_proj_gap <= 0:
            raise UserError("optim.update_proj_gap must be > 0. Fix: e.g. --set optim.update_proj_gap=200.")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise UserError("optim.grad_clip and optim.weight_decay must be >= 0.")
        if self.layerwise and self.grad_clip > 0:
            raise UserError("layer-wise updates happen inside backward, so global-norm clipping is impossible. "
                            "Fix: --set optim.grad_clip=0 with optim.layerwise=true.")
        check_optimizer(self.name)
        if self.name in PEERS and self.layerwise:
            raise UserError(f"{self.name} is wired here only in its ordinary (not layer-wise) form. "
                            "Fix: --set optim.layerwise=false.")
        for key in ("state", "plain_state"):
            value = getattr(self, key)
            if value and value not in STATE_FORMATS:
                raise UserError(f"optim.{key}={value!r} is not a state format; choose one of "
                                f"{', '.join(STATE_FORMATS)}.{did_you_mean(value, STATE_FORMATS)}")
            if value and self.name in PEERS:
                raise UserError(f"{self.name} keeps its own state; optim.{key} applies to gradlore's optimizers. "
                                f"Fix: drop optim.{key}.")
        if not self.plain_lr_ratio > 0:
            raise UserError(f"optim.plain_lr_ratio={self.plain_lr_ratio} must be > 0. Fix: to train the unprojected "
                            "parameters not at all, freeze them (e.g. model.get_input_embeddings().requires_grad_(False)).")
        if self.plain_lr_ratio != 1 and self.name not in PRESETS:
            raise UserError(f"optim.plain_lr_ratio scales the LR of a gradlore preset's unprojected parameters; "
                            f"{self.name} projects nothing. Fix: drop it (set the LR itself), or choose a preset.")
        if self.rounding not in ROUNDING:
            raise UserError(f"optim.rounding={self.rounding!r} must be one of {', '.join(ROUNDING)}.")
        if self.name in PRESETS:
            check_options(PRESETS[self.name](rank=self.rank, **self.group_overrides()), f"optimizer {self.name}")
        if self.name == "lora":
            check_lora_options(self.overrides, "optim.overrides of optimizer lora")

    def group_overrides(self) -> dict[str, Any]:
        """The projected group's keys the config sets on top of the preset."""
        extra = dict(self.overrides)
        if self.update_proj_gap is not None:
            extra["update_proj_gap"] = self.update_proj_gap
        if self.scale is not None:
            extra["scale"] = self.scale
        if self.state:
            extra["state"] = self.state
        return extra

    def plain_group_keys(self, projected_state: str) -> dict[str, Any]:
        """State format (and its options given in ``overrides``) of the unprojected parameters."""
        state = self.plain_state or projected_state
        keys: dict[str, Any] = {"state": state, "rounding": self.rounding}
        if state != "fp32":
            keys.update({k: v for k, v in self.overrides.items() if k in QUANT_OPTIONS})
        return keys


def _galore_targets(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """GaLore's README convention: 2-D weights of modules named *attn* or *mlp* are projected."""
    lowrank, regular = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (lowrank if p.dim() == 2 and any(k in name for k in ("attn", "mlp")) else regular).append(p)
    return lowrank, regular


def _peer(module: str, cls: str, scale_key: str, default_scale: float = 0.25,
          **extra: Any) -> Callable[..., torch.optim.Optimizer]:
    """A peer's optimizer class on GaLore's groups; ``scale_key`` is its name for the scale (Fira: alpha);
    ``extra``: further keys of its projected group."""

    def build(model: nn.Module, cfg: OptimConfig, **adamw: Any) -> torch.optim.Optimizer:
        optimizer_cls = getattr(importlib.import_module(module), cls)  # an optional package, imported on use
        lowrank, regular = _galore_targets(model)
        groups = [{"params": regular}, {"params": lowrank, "rank": cfg.rank, "proj_type": "std",
                                        "update_proj_gap": cfg.update_proj_gap or 200,
                                        scale_key: default_scale if cfg.scale is None else cfg.scale, **extra}]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return optimizer_cls(groups, no_deprecation_warning=True, **adamw)

    return build


PEERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "galore-torch": _peer("galore_torch", "GaLoreAdamW", "scale"),
    "fira-adamw": _peer("fira", "FiraAdamW", "alpha"),
    # APOLLO's README setting: random projection, channel-wise scaling, scale 1 (arXiv 2412.05270)
    "apollo": _peer("apollo_torch", "APOLLOAdamW", "scale", 1.0, proj="random", scale_type="channel"),
}


def optimizer_names() -> list[str]:
    return ["adamw", "lora", *PRESETS, *PEERS]


def check_optimizer(name: str) -> None:
    if name not in optimizer_names():
        raise UserError(f"unknown optimizer {name!r}.{did_you_mean(name, optimizer_names())} Fix: --optimizer adamw, "
                        f"lora (peft), one of the gradlore presets ({', '.join(PRESETS)}), or a peer ({', '.join(PEERS)}).")


def split_decay(groups: list[dict], no_decay: Collection[str]) -> list[dict]:
    """Each group split into its decayed parameters and those named in ``no_decay`` (``weight_decay=0``)."""
    out = []
    for group in groups:
        names = group["param_names"]
        for keep, extra in ((lambda n: n not in no_decay, {}), (lambda n: n in no_decay, {"weight_decay": 0.0})):
            idx = [i for i, n in enumerate(names) if keep(n)]
            if idx:
                out.append({**group, **extra, "params": [group["params"][i] for i in idx],
                            "param_names": [names[i] for i in idx]})
    return out


def build_optimizer(model: nn.Module, cfg: OptimConfig, no_decay: Collection[str] = ()) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg`` over ``model``'s trainable parameters (``no_decay``: names without decay)."""
    cfg.validate()
    adamw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name in PEERS:
        return PEERS[cfg.name](model, cfg, **adamw)
    if cfg.name in ("adamw", "lora"):  # lora: the model already carries its adapters; they are what trains
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise UserError("nothing to train: every parameter of the model is frozen.")
        params: Any = [{"params": [p for _, p in named], "param_names": [n for n, _ in named]}]
        cls: type[torch.optim.Optimizer] = torch.optim.AdamW
        keys = cfg.plain_group_keys(cfg.state or "fp32")
        if cfg.layerwise or keys["state"] != "fp32" or not all(is_wide(p) for _, p in named):
            params[0].update(keys)  # torch's AdamW, plus state formats, float32 math for bf16 weights, found_inf
            cls = LowRankAdamW
    else:
        params = param_groups(model, method=cfg.name, rank=cfg.rank, target_modules=parse_targets(cfg.target_modules),
                              **cfg.group_overrides())
        projected_state = params[-1].get("state", "fp32")
        params[-1]["rounding"] = cfg.rounding
        for group in params[:-1]:
            group.update(cfg.plain_group_keys(projected_state))
            if cfg.plain_lr_ratio != 1:  # schedules scale each group's own initial LR, so the ratio holds throughout
                group["lr"] = cfg.lr * cfg.plain_lr_ratio
        if cfg.plain_lr_ratio != 1:  # projected group first: trainers log the first group's LR, which is then lr's
            params = [params[-1], *params[:-1]]
        cls = LowRankAdamW
    if no_decay:
        params = split_decay(params, set(no_decay))
    if cfg.layerwise:
        return LayerwiseOptimizer(params, optimizer_cls=cls, **adamw)
    return cls(params, **adamw)
