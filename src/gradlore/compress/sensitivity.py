"""Output sensitivity of each targeted layer: the weights of the "loss" rank allocation (allocate.py).

Truncating layer i changes its output by δy_i (per token). To second order the language-model loss grows by
½ δyᵀ H_i δy; with the Gauss-Newton / empirical-Fisher approximation H_i ≈ E[g_i g_iᵀ], g_i = ∂L/∂y_i, and
taking it isotropic (only its trace, as WeLore ranks within a layer by the spectrum alone), this is

    ΔL_i ≈ f_i · E‖δy_i‖²,      f_i = E‖g_i‖² / d_out,i        (mean squared output gradient per output unit)

and with the whitened SVD (SVD-LLM arXiv 2403.07378) E‖δy_i‖² is exactly Σ_{j>r} σ_ij(W_i L_i)². So the
allocation minimises Σ_i f_i Σ_{j>r_i} σ_ij², a per-layer-weighted form of the Fisher-weighted SVD idea
(FWSVD, arXiv 2207.00112, which weights rows inside one matrix; here the weight is per layer). The common
factor of all f_i (loss scale, token count) does not change the allocation.

`collect_sensitivity` runs the calibration blocks forward and backward once (next-token loss, mean over
tokens), with a hook on every targeted layer's output accumulating Σ‖g‖² in float64. Only the input
embedding keeps ``requires_grad`` (so the graph reaches every layer) and no parameter gradient is stored
beyond it; the model's flags and training mode are restored afterwards. Deterministic for the same model,
blocks and threads.
"""

from __future__ import annotations

import torch
from torch import nn

from gradlore.compress.lowrank_linear import dense_weight
from gradlore.errors import UserError


def check_loss_method(data_aware: str | None, include_embeddings: bool, sensitivity_tokens: int) -> None:
    """Refuse what the "loss" allocation cannot do, before any work."""
    if not (isinstance(sensitivity_tokens, int) and sensitivity_tokens >= 1):
        raise UserError(f"sensitivity_tokens={sensitivity_tokens!r} must be a positive number of tokens (e.g. 4096).")
    if data_aware != "whiten" or include_embeddings:
        raise UserError("method 'loss' weighs each layer's exact output error, which only the whitened SVD gives "
                        "(and not for embeddings). Fix: use --data-aware whiten without --include-embeddings, or "
                        "--method welore.")


def collect_sensitivity(model: nn.Module, modules: dict[str, nn.Module], blocks: torch.Tensor | None,
                        tokens: int | None = None, batch_size: int = 2) -> dict[str, float]:
    """Name -> f_i = Σ_tokens ‖∂L/∂y_i‖² / (d_out · batches), L the mean next-token loss of each batch, over the
    first ``tokens`` tokens of ``blocks`` (n, L) (whole blocks, at least one; None: all)."""
    if blocks is None:
        raise UserError("method 'loss' needs sensitivities: the given activation_stats have none for these layers. "
                        "Fix: pass calibration text, or set stats.sensitivity = collect_sensitivity(...).")
    if blocks.ndim != 2 or blocks.shape[1] < 2:
        raise UserError("sensitivity needs calibration blocks of at least 2 tokens (n, L). Fix: more calibration text.")
    if tokens is not None:
        blocks = blocks[: max(1, tokens // blocks.shape[1])]
    acc = {name: 0.0 for name in modules}

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(lambda g: acc.__setitem__(name, acc[name] + float(g.double().pow(2).sum())))
        return fn

    flags = {p: p.requires_grad for p in model.parameters()}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or not isinstance(getattr(emb, "weight", None), torch.Tensor):
        raise UserError(f"{type(model).__name__} has no input embedding weight to start the backward pass from; "
                        "Fix: use --method welore.")
    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items() if not isinstance(m, nn.Embedding)]
    was_training = model.training
    model.eval()
    batches = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        emb.weight.requires_grad_(True)
        for i in range(0, len(blocks), batch_size):
            batch = blocks[i : i + batch_size]
            logits = model(input_ids=batch).logits  # (b, L, vocab)
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                               batch[:, 1:].reshape(-1))
            loss.backward()
            emb.weight.grad = None
            batches += 1
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return {name: acc[name] / (dense_weight(m).shape[0] * max(batches, 1)) for name, m in modules.items()}
