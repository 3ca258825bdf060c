"""Perplexity of a causal LM with a stated context length and stride (used to judge WeLore, arXiv 2407.11239).

The token stream x_1..x_N is read in windows of ``context`` tokens whose starts are ``stride`` apart.
Each token is scored once, in the first window that contains it with at least one token before it, so a
token scored in window w sees up to ``context − stride`` tokens of left context that were scored earlier:

    PPL = exp( − (1/T) Σ_t log p(x_t | x_{max(1, start_w)} .. x_{t−1}) ),   T = tokens scored

(T = N − 1 when windows overlap; disjoint windows cannot score their first token, T = N − windows.)

stride == context gives disjoint blocks (fast, less context per token); a smaller stride gives every scored
token more context at the cost of recomputing the overlap.

Beginning of sequence: with ``bos`` (the tokenizer's convention, `gradlore.data.tokenizer.sequence_bos`:
LLaMA-family and Gemma tokenizers add one) every window is ``[BOS] + context − 1`` text tokens, so the model
reads ``context`` positions as before, starts each window as it started its training sequences, and the first
text token is scored too (predicted from BOS alone: T = N). The stride then counts text tokens and is at most
``context − 1``. Dense and compressed models are evaluated alike: the choice comes from the tokenizer saved
with the model, and `PerplexityResult` records it.
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
    bos: int | None = None  # id prepended to every window, None when none

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


def windows(n: int, context: int, stride: int, score_first: bool = False) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window of up to ``context`` text tokens; token begin+i is scored from
    the window's tokens before it. ``score_first``: token 0 has a prefix too (a BOS in front of each window)."""
    if context < 2 - score_first:
        raise UserError(f"--context {context} is too short; use at least 2 tokens (e.g. 512).")
    if not 1 <= stride <= context:
        raise UserError(f"--stride {stride} must lie in [1, context={context}] (stride = context: disjoint blocks).")
    out, scored_until = [], 0 if score_first else 1  # without a BOS, token 0 has no prefix and is never scored
    for begin in range(0, max(n - 1 + score_first, 1), stride):
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
    model: nn.Module, ids: torch.Tensor, context: int = 512, stride: int | None = None, batch_size: int = 4,
    bos: int | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of ``ids`` (1-D, no special tokens) under ``model``; ``bos``: an id to put
    in front of every window (then each holds ``context − 1`` text tokens and the stride is at most that)."""
    span = context - (bos is not None)  # text tokens per window
    stride = min(stride or context, span) if bos is not None else (stride or context)
    ids = ids.reshape(-1).long()
    if ids.numel() < 2 - (bos is not None):
        raise UserError("need at least 2 tokens to compute a perplexity; pass more text.")
    wins = windows(ids.numel(), span, stride, score_first=bos is not None)
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
                x = torch.stack([ids[b:e] for b, e, _ in chunk])  # (B, L) text tokens
                if bos is not None:
                    x = torch.cat([torch.full((x.shape[0], 1), bos, dtype=x.dtype), x], dim=1)  # (B, 1 + L)
                x = x.to(device)
                labels = x.clone()
                lead = int(bos is not None)  # the BOS column is never a target
                for row, (_, _, first) in enumerate(chunk):
                    labels[row, : lead + first] = -100  # already scored in an earlier window (or no prefix)
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
        stride=stride, seconds=time.perf_counter() - t0, bos=bos,
    )
