"""Packing token streams into fixed-length blocks, a held-out validation split, and resumable batch order.

Documents are tokenized, joined with the end-of-text token and cut into non-overlapping blocks of
``block_size`` tokens (GPT-2 / GaLore packing; no padding, the ragged tail is dropped). The model sees
``input_ids = labels = block`` and shifts internally. Validation blocks are held out *before* training
(the tail of a local corpus, or the head of a stream / a named split) and never trained on.

Batch order is a pure function of ``(seed, epoch)``: a fresh ``torch.randperm`` per epoch over the
training blocks. The sampler's whole state is two integers (epoch, position), which the checkpoint
stores; resuming replays exactly the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from gradlore.data.text import hf_dataset, hf_documents, is_hf_spec, local_documents, local_path
from gradlore.data.tokenizer import TextTokenizer, _chunks, load_tokenizer, train_bpe
from gradlore.errors import UserError


@dataclass
class DataSpec:
    """What the data pipeline needs (a view of the training config's ``data`` section)."""

    path: str
    block_size: int
    tokenizer: str = "bpe"
    vocab_size: int = 4096
    val_fraction: float = 0.05
    val_blocks: int = 64
    text_field: str = "text"
    split: str = "train"
    val_split: str = ""
    streaming: bool = False
    data_files: str = ""
    bpe_train_docs: int = 20000


def encode_documents(docs: list[str], tok: TextTokenizer) -> torch.Tensor:
    """All documents as one 1-D int64 token tensor, documents separated by the end-of-text token."""
    ids: list[int] = []
    for doc in docs:
        for piece in tok.encode_batch(list(_chunks([doc]))):
            ids.extend(piece)
        if tok.eos_id is not None:
            ids.append(tok.eos_id)
    return torch.tensor(ids, dtype=torch.int64)


class BlockSampler:
    """Batches of training blocks in a per-epoch random order; state = (epoch, position)."""

    def __init__(self, blocks: torch.Tensor, batch_size: int, seed: int) -> None:
        self.blocks = blocks  # (N, T) int64
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._perm = self._permutation(0)

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
        return self.blocks[rows]  # (B, T)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)


class StreamSampler:
    """Batches from a streamed dataset (e.g. C4): blocks in stream order; state = (epoch, blocks consumed).

    Resuming re-opens the stream and skips the consumed blocks (as GaLore's C4 loader does).
    """

    def __init__(self, spec: DataSpec, tok: TextTokenizer, batch_size: int, skip_blocks: int) -> None:
        self.spec, self.tok, self.batch_size = spec, tok, batch_size
        self.skip_blocks = skip_blocks  # blocks at the head of the stream that went to validation
        self.epoch = 0
        self.consumed = 0
        self._it: Iterator[torch.Tensor] | None = None

    def _open(self) -> Iterator[torch.Tensor]:
        ds = hf_dataset(self.spec.path, self.spec.split, True, self.spec.data_files)
        blocks = stream_blocks(hf_documents(ds, self.spec.text_field), self.tok, self.spec.block_size)
        for _ in range(self.skip_blocks + self.consumed):
            next(blocks, None)
        return blocks

    def next_batch(self) -> torch.Tensor:
        rows = []
        while len(rows) < self.batch_size:
            if self._it is None:
                self._it = self._open()
            block = next(self._it, None)
            if block is None:  # end of the stream: next epoch
                if self.consumed == 0 and not rows:
                    raise UserError(f"stream {self.spec.path} yields no training block. Fix: more data "
                                    "or a smaller data.block_size / data.val_blocks.")
                self.epoch, self.consumed, self._it = self.epoch + 1, 0, None
                continue
            rows.append(block)
            self.consumed += 1
        return torch.stack(rows)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed, self._it = int(state["epoch"]), int(state["position"]), None


def stream_blocks(docs: Iterator[str], tok: TextTokenizer, block_size: int,
                  docs_per_batch: int = 64) -> Iterator[torch.Tensor]:
    """Pack a document stream into consecutive (block_size,) int64 blocks."""
    buffer: list[int] = []
    batch: list[str] = []

    def flush() -> Iterator[torch.Tensor]:
        for piece in tok.encode_batch(batch):
            buffer.extend(piece)
            if tok.eos_id is not None:
                buffer.append(tok.eos_id)
        batch.clear()
        while len(buffer) >= block_size:
            yield torch.tensor(buffer[:block_size], dtype=torch.int64)
            del buffer[:block_size]

    for doc in docs:
        batch.append(doc)
        if len(batch) >= docs_per_batch:
            yield from flush()
    yield from flush()


@dataclass
class PreparedData:
    tokenizer: TextTokenizer
    train: BlockSampler | StreamSampler
    val: torch.Tensor  # (N_val, T) int64
    info: dict = field(default_factory=dict)


def _tokenizer_for(spec: DataSpec, docs: list[str]) -> TextTokenizer:
    if spec.tokenizer == "bpe":
        return train_bpe(docs, spec.vocab_size)
    return load_tokenizer(spec.tokenizer)


def prepare_data(spec: DataSpec, batch_size: int, seed: int, tokenizer: TextTokenizer | None = None) -> PreparedData:
    """Tokenize, pack and split ``spec``'s data; every user mistake raises a UserError before any output."""
    if spec.block_size < 2:
        raise UserError(f"block size {spec.block_size} is too small. Fix: --set data.block_size=256.")
    if is_hf_spec(spec.path) and spec.streaming:
        return _prepare_stream(spec, batch_size, tokenizer)
    if is_hf_spec(spec.path):
        ds = hf_dataset(spec.path, spec.split, False, spec.data_files)
        docs = list(hf_documents(ds, spec.text_field))
        where = spec.path
    else:
        path = local_path(spec.path)
        docs = list(local_documents(path, spec.text_field))
        where = str(path)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"data {where} is empty (no text). Fix: point --data at a non-empty corpus.")
    tok = tokenizer or _tokenizer_for(spec, docs)
    ids = encode_documents(docs, tok)  # (n_tokens,)
    T = spec.block_size
    n_blocks = ids.numel() // T
    if n_blocks < 2:
        raise UserError(
            f"block size {T} is longer than the corpus allows: {where} has {ids.numel()} tokens, which gives "
            f"{n_blocks} block(s); at least 2 are needed (one to train on, one to validate). "
            f"Fix: --set data.block_size={max(2, ids.numel() // 4)} or use more data."
        )
    blocks = ids[: n_blocks * T].view(n_blocks, T)  # (N, T)
    if spec.val_split and is_hf_spec(spec.path):
        ds = hf_dataset(spec.path, spec.val_split, False, spec.data_files)
        val = encode_documents(list(hf_documents(ds, spec.text_field)), tok)
        nv = min(val.numel() // T, spec.val_blocks)
        if nv < 1:
            raise UserError(f"validation split {spec.val_split!r} has fewer than {T} tokens. Fix: another split.")
        train_blocks, val_blocks = blocks, val[: nv * T].view(nv, T)
    else:
        # The tail of the corpus is held out: ceil(val_fraction * N) blocks, at least 1, leaving at least 1.
        n_val = min(max(1, int(round(spec.val_fraction * n_blocks))), n_blocks - 1)
        train_blocks, val_blocks = blocks[: n_blocks - n_val], blocks[n_blocks - n_val:]
    info = {"source": where, "documents": len(docs), "tokens": int(ids.numel()),
            "train_blocks": int(train_blocks.shape[0]), "val_blocks": int(val_blocks.shape[0]),
            "vocab_size": int(tok.vocab_size)}
    return PreparedData(tok, BlockSampler(train_blocks.contiguous(), batch_size, seed), val_blocks.contiguous(), info)


def _prepare_stream(spec: DataSpec, batch_size: int, tokenizer: TextTokenizer | None) -> PreparedData:
    ds = hf_dataset(spec.path, spec.split, True, spec.data_files)
    if tokenizer is not None:
        tok = tokenizer
    elif spec.tokenizer == "bpe":
        head = []
        for i, doc in enumerate(hf_documents(ds, spec.text_field)):
            if i >= spec.bpe_train_docs:
                break
            head.append(doc)
        if not any(d.strip() for d in head):
            raise UserError(f"stream {spec.path} is empty. Fix: check the dataset, split and text field.")
        tok = train_bpe(head, spec.vocab_size)
    else:
        tok = load_tokenizer(spec.tokenizer)
    src = hf_dataset(spec.path, spec.val_split, True, spec.data_files) if spec.val_split else ds
    val_rows = []
    for block in stream_blocks(hf_documents(src, spec.text_field), tok, spec.block_size):
        val_rows.append(block)
        if len(val_rows) >= spec.val_blocks:
            break
    if not val_rows:
        raise UserError(f"block size {spec.block_size} is longer than the stream {spec.path} allows "
                        "(not one validation block). Fix: a smaller data.block_size.")
    skip = 0 if spec.val_split else len(val_rows)
    sampler = StreamSampler(spec, tok, batch_size, skip_blocks=skip)
    info = {"source": spec.path, "streaming": True, "val_blocks": len(val_rows), "vocab_size": int(tok.vocab_size)}
    return PreparedData(tok, sampler, torch.stack(val_rows), info)
