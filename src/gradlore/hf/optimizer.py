"""gradlore optimizers inside Hugging Face ``transformers.Trainer`` and ``accelerate`` loops.

How the Trainer (transformers >= 5.2, ``Trainer.create_optimizer``) uses ``optimizer_cls_and_kwargs=(cls, kwargs)``:
a ``cls`` that is not a ``torch.optim.Optimizer`` subclass is a *factory*: the Trainer calls
``cls()(model, **kwargs)`` with the model it trains (``trainer_optimizer.is_optimizer_factory``) and gives it
nothing else: not the ``TrainingArguments``, not its decay split. ``OptimizerFactory`` therefore

- reads the learning rate, weight decay, Adam betas and epsilon from the Trainer that calls it (found on the
  call stack; any of them given in ``kwargs`` wins), so ``TrainingArguments`` keep their meaning;
- builds the optimizer through gradlore's one builder (``gradlore.optim.build.build_optimizer``: the preset's
  projected group on ``target_modules``, plain AdamW for the rest), with the Trainer's weight-decay split
  (``Trainer.get_decay_parameter_names``: no decay on biases and norms);
- returns a real optimizer whose ``param_groups`` the Trainer's LR scheduler (built afterwards from
  ``TrainingArguments``: warmup, cosine, linear, ...) scales step by step, and whose state is tensors only, so
  the Trainer's ``optimizer.pt`` reloads with ``torch.load(weights_only=True)`` and a resumed run continues.

Layer-wise mode (GaLore §4.3, ``layerwise=True``): each weight is updated inside backward and its gradient
freed (``gradlore.optim.layerwise.LayerwiseOptimizer``). With gradient accumulation a weight may only step
on the micro-batch whose gradients are synchronised: the Trainer (and ``accelerator.accumulate``) says which
through accelerate's ``GradientState.sync_gradients``, set before each micro-batch's backward, so the
optimizer's ``accumulate`` flag follows it (``AcceleratorSync``). The Trainer's global-norm clipping has no
gradients left to clip, so it is switched off (``max_grad_norm=0``) with a warning. Refused with a UserError:
layer-wise under DDP (the hooks fire before DDP averages the gradients across processes, so each process
would step on its own gradient) and FSDP1's flattened 1-D parameters for any projected method (the 2-D filter
would silently project nothing).

Older Trainers, which call ``cls(param_groups, **kwargs)``, get ``create_optimizer(model, args, ...)`` instead:
``Trainer(..., optimizers=(gradlore.hf.create_optimizer(model, args, method="dct"), None))``.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
from torch import nn

from gradlore.compress.lowrank_linear import is_dense_linear
from gradlore.errors import UserError
from gradlore.optim.build import PEERS, OptimConfig, build_optimizer, check_optimizer
from gradlore.optim.layerwise import LayerwiseOptimizer

MIN_TRANSFORMERS = "5.2"  # the first release whose Trainer calls an optimizer factory with the model
OLD_ROUTE = ("Fix: pass the optimizer itself, Trainer(..., optimizers=(gradlore.hf.create_optimizer(model, args, "
             "method='dct', rank=128), None)), or upgrade transformers (>= " + MIN_TRANSFORMERS + ").")


class AcceleratorSync:
    """True while accelerate says gradients are *not* synchronised (a micro-batch before the last one).

    Set as ``LayerwiseOptimizer.accumulate``: the Trainer and ``accelerator.accumulate`` set
    ``GradientState.sync_gradients`` before each micro-batch's backward, so the hooks step only on the last.
    """

    def __bool__(self) -> bool:
        from accelerate.state import GradientState  # a singleton: every instance reads the same state

        return not GradientState().sync_gradients


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_parallel(model: nn.Module, projected: bool, layerwise: bool) -> None:
    """Refuse what would silently train wrongly: FSDP1 flat parameters under projection, layer-wise under DDP."""
    flat = [n for n, p in model.named_parameters() if type(p).__name__ == "FlatParameter" or "_flat_param" in n]
    flat += [f"{n}.weight" for n, m in model.named_modules() if is_dense_linear(m) and m.weight.dim() != 2]
    if projected and flat:
        raise UserError(f"the model's linear weights are flattened to 1-D ({', '.join(flat[:3])}{', ...' if len(flat) > 3 else ''}"
                        "), as FSDP1 stores them (FlatParameter, also with use_orig_params=True); a low-rank projection "
                        "needs each weight as a 2-D matrix and would silently project nothing. Fix: shard with FSDP2 "
                        "(torch fully_shard; accelerate fsdp_version: 2), use DDP, or method='adamw'.")
    if layerwise and world_size() > 1:
        raise UserError(f"layer-wise updates with {world_size()} processes: each weight would be updated by its "
                        "post-accumulate-grad hook before DDP averages the gradients across processes, so every "
                        "process would step on its own gradient and the replicas would drift apart. Fix: "
                        "layerwise=False under DDP (the gradlore optimizer itself works there), or one process.")


def calling_trainer(max_depth: int = 8) -> Any:
    """The ``transformers.Trainer`` whose ``create_optimizer`` (or a subclass's override) is calling us, if any."""
    from transformers import Trainer

    frame = sys._getframe(1)
    for _ in range(max_depth):
        frame = frame.f_back
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
    return None


def decay_parameter_names(model: nn.Module, trainer: Any = None) -> set[str]:
    """The Trainer's own split (``get_decay_parameter_names``: every weight but biases and norms)."""
    from transformers import Trainer

    get = trainer.get_decay_parameter_names if trainer is not None else (
        lambda m: Trainer.get_decay_parameter_names(None, m))  # it reads only the model
    return set(get(model))


def _targets(spec: Any) -> str:
    """gradlore's target spec from a Trainer-style value: a list of name fragments or a string."""
    if isinstance(spec, (list, tuple)):
        return ",".join(str(s) for s in spec)
    if not isinstance(spec, str):
        raise UserError(f"target_modules={spec!r} must be 'all-linear', a list of name fragments or 're:REGEX'.")
    return spec


def create_optimizer(model: nn.Module, args: Any = None, *, method: str = "dct", rank: int = 128,
                     target_modules: Any = "all-linear", layerwise: bool = False, trainer: Any = None,
                     **kwargs: Any) -> torch.optim.Optimizer:
    """A gradlore optimizer for ``model`` with the Trainer's conventions.

    Args:
        model: the model to train (a PeftModel too: its trainable adapters are then what trains).
        args: ``TrainingArguments`` (or None): the defaults of ``lr``, ``weight_decay``, ``betas``, ``eps``;
            with ``layerwise`` its ``max_grad_norm`` is set to 0 (clipping is impossible inside backward).
        method: ``adamw`` or a gradlore preset (``galore``, ``dct``, ``fira``, ``frugal``, ``dct-fira``).
        rank, target_modules: the projection rank and the layers it applies to ("all-linear", a list of
            name fragments, or "re:REGEX").
        layerwise: update each weight inside backward (gradient accumulation follows accelerate's sync state).
        kwargs: ``lr``, ``weight_decay``, ``betas``, ``eps`` (override ``args``), ``update_proj_gap``,
            ``scale``, ``plain_lr_ratio`` (the unprojected parameters, embeddings and norms, train at
            ``lr × plain_lr_ratio``; the Trainer's schedule keeps the ratio), and any other key of the
            preset's param group (``projector``, ``fira_gamma``, ...), validated like ``gradlore.param_groups``.
    """
    check_optimizer(method)
    if method == "lora":
        raise UserError("LoRA changes the model, not the optimizer. Fix: wrap the model first (peft.get_peft_model, or "
                        "gradlore.optim.lora.add_lora) and use method='adamw' (or a gradlore preset) on it.")
    if method in PEERS:
        raise UserError(f"{method} keeps Python objects in its state, so the Trainer's checkpoints would not reload with "
                        "weights_only=True. Fix: use the gradlore preset of the same method (galore, fira).")
    hyper = {"lr": getattr(args, "learning_rate", None), "weight_decay": getattr(args, "weight_decay", 0.0),
             "betas": (getattr(args, "adam_beta1", 0.9), getattr(args, "adam_beta2", 0.999)),
             "eps": getattr(args, "adam_epsilon", 1e-8)}
    hyper.update({k: kwargs.pop(k) for k in list(kwargs) if k in hyper})
    if hyper["lr"] is None:
        raise UserError("no learning rate: the optimizer was built outside a Trainer and without lr=... . "
                        "Fix: pass lr=... (or the TrainingArguments: create_optimizer(model, args, ...)).")
    projection = {k: kwargs.pop(k) for k in ("update_proj_gap", "scale") if k in kwargs}
    plain_lr_ratio = float(kwargs.pop("plain_lr_ratio", 1.0))
    if method == "adamw" and (kwargs or projection):
        raise UserError(f"method='adamw' projects nothing, so {sorted({**kwargs, **projection})} would be ignored. "
                        "Fix: drop them, or choose a gradlore preset (method='dct', 'galore', 'fira', ...).")
    cfg = OptimConfig(name=method, lr=float(hyper["lr"]), weight_decay=float(hyper["weight_decay"]),
                      beta1=float(hyper["betas"][0]), beta2=float(hyper["betas"][1]), eps=float(hyper["eps"]),
                      rank=int(rank), target_modules=_targets(target_modules), overrides=kwargs, grad_clip=0.0,
                      layerwise=bool(layerwise), plain_lr_ratio=plain_lr_ratio, **projection)
    check_parallel(model, projected=method != "adamw", layerwise=layerwise)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(model, cfg, no_decay=trainable - decay_parameter_names(model, trainer))
    if isinstance(optimizer, LayerwiseOptimizer):
        optimizer.accumulate = AcceleratorSync()
        if getattr(args, "max_grad_norm", 0) and args.max_grad_norm > 0:
            warnings.warn(f"gradlore: layer-wise updates happen inside backward, so no moment holds every gradient and "
                          f"the Trainer's global-norm clipping (max_grad_norm={args.max_grad_norm}) would clip nothing; "
                          "it is switched off (max_grad_norm=0). Pass TrainingArguments(max_grad_norm=0) to silence "
                          "this, or train with layerwise=False to clip.", UserWarning, stacklevel=3)
            args.max_grad_norm = 0.0
    return optimizer


class OptimizerFactory:
    """``Trainer(..., optimizer_cls_and_kwargs=(gradlore.hf.OptimizerFactory, {"method": "dct", "rank": 128,
    "target_modules": "all-linear"}))``: the Trainer instantiates it and calls it with its model and these
    keyword arguments (those of ``create_optimizer``); lr, weight decay, betas and eps default to the
    Trainer's ``TrainingArguments``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if args or kwargs:  # transformers < 5.2 calls cls(param_groups, **kwargs) and never hands over the model
            raise UserError("this Trainer calls the optimizer class with parameter groups, not with the model (transformers "
                            f"older than {MIN_TRANSFORMERS}), so gradlore cannot choose the layers to project. {OLD_ROUTE}")

    def __call__(self, model: nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
        trainer = calling_trainer()
        return create_optimizer(model, getattr(trainer, "args", None), trainer=trainer, **kwargs)
