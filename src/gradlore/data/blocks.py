"""Packing a corpus into fixed-length blocks, a held-out validation split, and resumable batch order.

Documents are tokenized (once per corpus and tokenizer: :mod:`gradlore.data.tokens` keeps the ids in a
memory-mapped cache file), joined with the end-of-text token and cut into non-overlapping blocks of
``block_size`` tokens (GPT-2 / GaLore packing; no padding, the ragged tail is dropped). The model sees
``input_ids = labels = block`` and shifts internally.

Beginning of sequence (``data.bos``, default the tokenizer's convention, `sequence_bos`): a tokenizer that
puts a BOS before a text (LLaMA, Gemma) gets it at position 0 of *every block*: the stream is cut into
blocks of ``block_size − 1`` tokens and each is prefixed with BOS, so training sequences start as the
model's evaluation windows, calibration blocks and generation prompts do, and BOS is never a target.
Documents inside a block stay separated by the end-of-text token only (the stream, and the token cache,
are the same with or without BOS). A tokenizer without that convention (our byte-level BPE, GPT-2's) packs
exactly as before. Validation blocks are held out *before* training
(the tail of a local corpus, or the head of a stream / a named split) and never trained on.

Batch order is a pure function of ``(seed, epoch)``: a fresh ``torch.randperm`` per epoch over the
training blocks. The sampler's whole state is two integers (epoch, position), which the checkpoint
stores; resuming replays exactly the same batches. Streamed datasets are :mod:`gradlore.data.stream`'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from gradlore.data.config import DataConfig
from gradlore.data.stream import StreamSampler, prepare_stream, with_bos
from gradlore.data.text import hf_dataset, hf_documents, is_hf_spec, local_documents, local_path
from gradlore.data.tokenizer import (
    TextTokenizer,
    corpus_digest,
    describe_bos,
    load_tokenizer,
    sequence_bos,
    train_bpe,
)
from gradlore.data.tokens import encode_corpus
from gradlore.errors import UserError


class BlockSampler:
    """Batches of training blocks in a per-epoch random order; state = (epoch, position).

    ``blocks`` is (N, T) of any integer dtype (a uint16 view of the memory-mapped token file, or a tensor);
    only the rows of a batch are read, and they come out as an int64 tensor.
    """

    def __init__(self, blocks: np.ndarray | torch.Tensor, batch_size: int, seed: int, bos: int | None = None) -> None:
        self.blocks = blocks  # (N, T), or (N, T − 1) when each batch row gets the BOS prefix
        self.batch_size = batch_size
        self.seed = seed
        self.bos = bos
        self.epoch = 0
        self.position = 0
        self._perm = self._permutation(0)
        self.part: slice | None = None  # multi-process: this rank's rows of each batch (the others are not read)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.blocks.shape[0], generator=g)

    def next_batch(self) -> torch.Tensor:
        rows = []
        for _ in range(self.batch_size):  # a batch may straddle two epochs when the corpus is tiny
            if self.position >= self._perm.numel():
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            rows.append(int(self._perm[self.position]))
            self.position += 1
        rows = rows if self.part is None else rows[self.part]
        if isinstance(self.blocks, torch.Tensor):
            return with_bos(self.blocks[rows].to(torch.int64), self.bos)  # (B, T)
        return with_bos(torch.from_numpy(self.blocks[rows].astype(np.int64)), self.bos)  # (B, T)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)


@dataclass
class PreparedData:
    tokenizer: TextTokenizer
    train: BlockSampler | StreamSampler
    val: torch.Tensor  # (N_val, T) int64
    info: dict = field(default_factory=dict)


def _tokenizer_for(cfg: DataConfig, docs: list[str], digest: str) -> TextTokenizer:
    if cfg.tokenizer == "bpe":
        return train_bpe(docs, cfg.vocab_size, digest=digest)
    return load_tokenizer(cfg.tokenizer)


def prepare_data(cfg: DataConfig, batch_size: int, seed: int, tokenizer: TextTokenizer | None = None) -> PreparedData:
    """Tokenize, pack and split ``cfg``'s data; every user mistake raises a UserError before any output."""
    cfg.validate()
    if cfg.block_size < 2:
        raise UserError(f"block size {cfg.block_size} is too small. Fix: --set data.block_size=256.")
    if is_hf_spec(cfg.path) and cfg.streaming:
        tok, sampler, val, info = prepare_stream(cfg, batch_size, tokenizer)
        return PreparedData(tok, sampler, val, info)
    if is_hf_spec(cfg.path):
        ds = hf_dataset(cfg.path, cfg.split, False, cfg.data_files)
        docs = list(hf_documents(ds, cfg.text_field))
        where = cfg.path
    else:
        path = local_path(cfg.path)
        docs = list(local_documents(path, cfg.text_field))
        where = str(path)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"data {where} is empty (no text). Fix: point --data at a non-empty corpus.")
    digest = corpus_digest(docs)  # the corpus is hashed once: it keys both the BPE and the token cache
    tok = tokenizer or _tokenizer_for(cfg, docs, digest)
    ids = encode_corpus(docs, tok, digest)  # (n_tokens,) uint16 / int32, memory-mapped
    bos = sequence_bos(tok, cfg.bos)
    T = cfg.block_size - (bos is not None)  # stream tokens per block; BOS takes position 0
    n_blocks = ids.size // T
    if n_blocks < 2:
        raise UserError(
            f"block size {T} is longer than the corpus allows: {where} has {ids.size} tokens, which gives "
            f"{n_blocks} block(s); at least 2 are needed (one to train on, one to validate). "
            f"Fix: --set data.block_size={max(2, ids.size // 4)} or use more data."
        )
    blocks = ids[: n_blocks * T].reshape(n_blocks, T)  # (N, T), a view of the token file
    if cfg.val_split and is_hf_spec(cfg.path):
        ds = hf_dataset(cfg.path, cfg.val_split, False, cfg.data_files)
        val = encode_corpus(list(hf_documents(ds, cfg.text_field)), tok)  # (n_val_tokens,)
        nv = min(val.size // T, cfg.val_blocks)
        if nv < 1:
            raise UserError(f"validation split {cfg.val_split!r} has fewer than {T} tokens. Fix: another split.")
        train_blocks, val_blocks = blocks, val[: nv * T].reshape(nv, T)
    else:
        # The tail of the corpus is held out: round(val_fraction * N) blocks, at least 1, leaving at least 1.
        n_val = min(max(1, int(round(cfg.val_fraction * n_blocks))), n_blocks - 1)
        train_blocks, val_blocks = blocks[: n_blocks - n_val], blocks[n_blocks - n_val:]
    info = {"source": where, "documents": len(docs), "tokens": int(ids.size),
            "train_blocks": int(train_blocks.shape[0]), "val_blocks": int(val_blocks.shape[0]),
            "vocab_size": int(tok.vocab_size), "token_file": str(getattr(ids, "filename", "") or ""),
            "bos": bos, "bos_note": describe_bos(tok, bos, cfg.bos)}
    val_tensor = with_bos(torch.from_numpy(np.ascontiguousarray(val_blocks, dtype=np.int64)), bos)  # (N_val, T)
    return PreparedData(tok, BlockSampler(train_blocks, batch_size, seed, bos), val_tensor, info)
