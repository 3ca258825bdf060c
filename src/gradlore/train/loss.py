"""Next-token cross-entropy without the (tokens × vocab) logits: the output head and the loss in chunks.

For N = B·(T-1) predicted tokens with last hidden states H (N, d), the head W (V, d) (bias b) and targets y,

    L = 1/N Σ_i [ lse_i - z_i,y_i ],    z_i = W h_i + b,    lse_i = log Σ_v exp z_iv
    ∂L/∂z_i = (softmax(z_i) - onehot(y_i)) / N,   ∂L/∂h_i = Wᵀ ∂L/∂z_i,   ∂L/∂W = Σ_i ∂L/∂z_i h_iᵀ

Forward computes z for ``chunk`` tokens at a time and keeps only lse (N floats); backward recomputes each
chunk's z (one more head matmul per chunk) to form its gradient. So at most (chunk × V) logits exist at
once, instead of the N × V float32 logits (plus their bf16 copy, softmax and gradient) that the Hugging Face
loss materialises: 2.1 GiB at 32×256 tokens and a 32k vocabulary, 4.2 GB per 128 sequences. The matmuls
run in the autocast dtype when autocast is on (as the plain head would), the softmax in float32 (as the
Hugging Face loss does after its upcast): the same loss and gradients to float tolerance.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gradlore.errors import UserError

IGNORE = -100  # Hugging Face's ignore_index


class ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk: int,
                dtype: torch.dtype) -> Tensor:
        n = hidden.shape[0]
        w = weight.to(dtype)  # (V, d): the autocast copy, made once
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        valid = labels != IGNORE
        for a in range(0, n, chunk):
            z = _logits(hidden[a:a + chunk], w, bias, dtype)  # (c, V) float32
            lse[a:a + chunk] = torch.logsumexp(z, dim=1)
            y = labels[a:a + chunk].clamp_min(0)
            picked = z.gather(1, y[:, None]).squeeze(1)
            total += torch.where(valid[a:a + chunk], lse[a:a + chunk] - picked, 0.0).sum()
        count = valid.sum().clamp_min(1)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, count)
        ctx.chunk, ctx.dtype = chunk, dtype
        return total / count

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, labels, lse, count = ctx.saved_tensors
        chunk, dtype = ctx.chunk, ctx.dtype
        w = weight.to(dtype)
        scale = (grad_out / count).to(torch.float32)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        # ∂L/∂W summed over chunks in float32 (a bf16 running sum would round at every chunk)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        for a in range(0, hidden.shape[0], chunk):
            h = hidden[a:a + chunk]
            z = _logits(h, w, bias, dtype)  # (c, V) float32, recomputed
            dz = torch.exp_(z.sub_(lse[a:a + chunk, None]))  # softmax, in place
            y = labels[a:a + chunk]
            valid = y != IGNORE
            dz.scatter_add_(1, y.clamp_min(0)[:, None], torch.full_like(dz[:, :1], -1.0))
            dz.mul_((scale * valid)[:, None])  # (c, V) = ∂L/∂z
            dz_c = dz.to(dtype)
            if need_h:
                grad_h[a:a + chunk] = (dz_c @ w).to(hidden.dtype)  # (c, d)
            if need_w and dtype == torch.float32:
                grad_w.addmm_(dz_c.mT, h.float())  # (V, d)
            elif need_w:
                grad_w.add_((dz_c.mT @ h.to(dtype)).float())
            if need_b:
                grad_b += dz.sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


def _logits(h: Tensor, w: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    z = h.to(dtype) @ w.mT  # (c, V)
    if bias is not None:
        z = z + bias.to(dtype)
    return z.float()


def _head_and_body(model: nn.Module) -> tuple[nn.Linear, nn.Module]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    config = getattr(model, "config", None)
    if not isinstance(head, nn.Linear) or body is None or body is model:
        raise UserError("memory.chunked_loss needs a causal LM whose output head is an nn.Linear under a base model "
                        "(LLaMA-style). Fix: --set memory.chunked_loss=0 for this model.")
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        raise UserError("memory.chunked_loss does not apply logit soft-capping or scaling. "
                        "Fix: --set memory.chunked_loss=0 for this model.")
    return head, body


def chunked_lm_loss(model: nn.Module, batch: Tensor, chunk: int) -> Tensor:
    """Mean next-token cross-entropy of ``batch`` (B, T) as the model's own loss, ``chunk`` tokens at a time."""
    head, body = _head_and_body(model)
    hidden = body(input_ids=batch).last_hidden_state[:, :-1]  # (B, T-1, d): every position but the last
    labels = batch[:, 1:]  # (B, T-1)
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else head.weight.dtype
    with torch.autocast(device, enabled=False):
        return ChunkedCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias,
                                         labels.reshape(-1), chunk, dtype)
