"""Perplexity of a causal LM with a stated context length and stride (used to judge WeLore, arXiv 2407.11239).

The token stream x_1..x_N is read in windows of ``context`` tokens whose starts are ``stride`` apart.
Each token is scored once, in the first window that contains it with at least one token before it, so a
token scored in window w sees up to ``context − stride`` tokens of left context that were scored earlier:

    PPL = exp( − (1/T) Σ_t log p(x_t | x_{max(1, start_w)} .. x_{t−1}) ),   T = tokens scored = N − 1

stride == context gives disjoint blocks (fast, less context per token); a smaller stride gives every scored
token more context at the cost of recomputing the overlap.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gradlore.data.text import hf_dataset, hf_documents, is_hf_spec, local_documents, local_path
from gradlore.data.tokenizer import TextTokenizer
from gradlore.errors import UserError


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens_scored: int
    windows: int
    context: int
    stride: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_text(spec: str | Path, max_chars: int | None = None) -> str:
    """Documents of a text file / folder / JSONL / ``hf:NAME[:CONFIG]`` joined by blank lines (first ``max_chars``)."""
    spec = str(spec)
    docs = hf_documents(hf_dataset(spec, "test", streaming=False), "text") if is_hf_spec(spec) else local_documents(local_path(spec))
    parts, size = [], 0
    for doc in docs:
        parts.append(doc)
        size += len(doc)
        if max_chars is not None and size >= max_chars:
            break
    text = "\n\n".join(parts)[:max_chars]  # no need to tokenize more than will be used
    if not text.strip():
        raise UserError(f"data {spec!r} holds no text; pass a non-empty text file.")
    return text


def tokenize(tokenizer: TextTokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """1-D int64 token ids (no special tokens added), truncated to ``max_tokens``."""
    ids = torch.tensor(tokenizer.encode_batch([text])[0], dtype=torch.int64)
    return ids[:max_tokens] if max_tokens else ids


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window; position i of a window predicts token begin+i from its prefix."""
    if context < 2:
        raise UserError(f"--context {context} is too short; use at least 2 tokens (e.g. 512).")
    if not 1 <= stride <= context:
        raise UserError(f"--stride {stride} must lie in [1, context={context}] (stride = context: disjoint blocks).")
    out, scored_until = [], 1  # token 0 has no prefix and is never scored
    for begin in range(0, max(n - 1, 1), stride):
        end = min(begin + context, n)
        if end <= scored_until:
            continue
        out.append((begin, end, scored_until - begin))
        scored_until = end
        if end == n:
            break
    return out


@torch.no_grad()
def perplexity(
    model: nn.Module, ids: torch.Tensor, context: int = 512, stride: int | None = None, batch_size: int = 4
) -> PerplexityResult:
    """Sliding-window perplexity of ``ids`` (1-D) under ``model``."""
    stride = stride or context
    ids = ids.reshape(-1).long()
    if ids.numel() < 2:
        raise UserError("need at least 2 tokens to compute a perplexity; pass more text.")
    wins = windows(ids.numel(), context, stride)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, count, t0 = 0.0, 0, time.perf_counter()
    try:
        # Windows of equal length go through the model together.
        groups: dict[int, list[tuple[int, int, int]]] = {}
        for w in wins:
            groups.setdefault(w[1] - w[0], []).append(w)
        for ws in groups.values():
            for i in range(0, len(ws), batch_size):
                chunk = ws[i : i + batch_size]
                x = torch.stack([ids[b:e] for b, e, _ in chunk]).to(device)  # (B, L)
                labels = x.clone()
                for row, (_, _, first) in enumerate(chunk):
                    labels[row, :first] = -100  # already scored in an earlier window (or no prefix)
                logits = model(input_ids=x).logits  # (B, L, V)
                nll_sum += float(
                    F.cross_entropy(
                        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                        labels[:, 1:].reshape(-1),
                        ignore_index=-100,
                        reduction="sum",
                    )
                )
                count += int((labels[:, 1:] != -100).sum())
    finally:
        model.train(was_training)
    nll = nll_sum / count
    return PerplexityResult(
        perplexity=math.exp(nll), nll=nll, tokens_scored=count, windows=len(wins), context=context,
        stride=stride, seconds=time.perf_counter() - t0,
    )
