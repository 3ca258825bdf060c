"""Streamed datasets (e.g. C4 with ``data.streaming=true``): blocks in stream order, and a resume that does
not tokenize what was already trained on.

Documents are read from the stream 64 at a time, encoded together, each followed by the end-of-text id,
appended to a token buffer and cut into consecutive blocks of ``block_size`` tokens (the ragged tail of the
stream is dropped), as GaLore's C4 loader packs. When the stream has no validation split, its first
``val_blocks`` blocks are validation and training starts right after them, every epoch.

The position in the stream is (documents read, token buffer): the buffer holds every token read but not
yet served, i.e. fewer than ``block_size`` tokens plus any whole blocks not yet served. That is the
sampler's state (plain ints and an int64 tensor, so a checkpoint loads with ``torch.load(weights_only=True)``).
Resuming skips the documents already read without tokenizing them (``IterableDataset.skip``) and restores
the buffer, so the next batch is the one the uninterrupted run would have drawn. With a BOS (``data.bos``,
see :mod:`gradlore.data.blocks`) the stream is cut into blocks of ``block_size − 1`` and each row gets it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch

from gradlore.data.config import DataConfig
from gradlore.data.text import hf_dataset, hf_documents
from gradlore.data.tokenizer import TextTokenizer, describe_bos, load_tokenizer, sequence_bos, train_bpe
from gradlore.errors import UserError

DOCS_PER_FILL = 64  # documents encoded per tokenizer call


def with_bos(rows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """(B, S) int64 -> (B, S + 1) with ``bos`` in column 0; unchanged when ``bos`` is None."""
    if bos is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos, dtype=rows.dtype), rows], dim=1)


def skip_records(dataset: Iterable[dict], n: int) -> Iterable[dict]:
    """``dataset`` without its first ``n`` records, which are never handed to the tokenizer."""
    if n <= 0:
        return dataset
    if callable(getattr(dataset, "skip", None)):  # datasets.IterableDataset: skipped below the formatting
        return dataset.skip(n)
    return itertools.islice(dataset, n, None)


class StreamPacker:
    """Consecutive (block_size,) int64 blocks of a document stream, from a position in it."""

    def __init__(self, open_docs: Callable[[int], Iterator[str]], tok: TextTokenizer, block_size: int,
                 documents: int = 0, buffer: np.ndarray | None = None) -> None:
        self.open_docs = open_docs  # n -> the documents after the first n
        self.tok, self.block_size = tok, block_size
        self.documents = documents  # documents read (and tokenized into the buffer) so far
        self.buffer = np.zeros(0, dtype=np.int64) if buffer is None else np.asarray(buffer, dtype=np.int64)  # (n,)
        self._docs: Iterator[str] | None = None

    def _fill(self) -> bool:
        """Read and encode the next documents into the buffer; False at the end of the stream."""
        if self._docs is None:
            self._docs = self.open_docs(self.documents)
        batch = list(itertools.islice(self._docs, DOCS_PER_FILL))
        if not batch:
            return False
        parts = [self.buffer]
        for ids in self.tok.encode_batch(batch):
            parts.append(np.array(ids, dtype=np.int64))
            if self.tok.eos_id is not None:
                parts.append(np.array([self.tok.eos_id], dtype=np.int64))
        self.buffer = np.concatenate(parts)
        self.documents += len(batch)
        return True

    def next_block(self) -> np.ndarray | None:
        """The next (block_size,) block, or None when the stream has no full block left."""
        while self.buffer.size < self.block_size:
            if not self._fill():
                return None
        block, self.buffer = self.buffer[: self.block_size], self.buffer[self.block_size:]
        return block


class StreamSampler:
    """Batches from a streamed dataset, blocks in stream order; state = (epoch, position, documents, buffer)."""

    def __init__(self, cfg: DataConfig, tok: TextTokenizer, batch_size: int, start_documents: int = 0,
                 start_buffer: np.ndarray | None = None) -> None:
        self.cfg, self.tok, self.batch_size = cfg, tok, batch_size
        self.bos = sequence_bos(tok, cfg.bos)
        self.span = cfg.block_size - (self.bos is not None)  # stream tokens per block; BOS takes position 0
        # Where training starts in every epoch: after the documents and tokens that went to validation.
        self.start_documents = start_documents
        self.start_buffer = np.zeros(0, np.int64) if start_buffer is None else np.array(start_buffer, np.int64)
        self.epoch = 0
        self.position = 0  # blocks served in this epoch
        self._dataset: Iterable[dict] | None = None
        self._packer = self._packer_at(self.start_documents, self.start_buffer)

    def _documents(self, skip: int) -> Iterator[str]:
        if self._dataset is None:
            self._dataset = hf_dataset(self.cfg.path, self.cfg.split, True, self.cfg.data_files)
        return hf_documents(skip_records(self._dataset, skip), self.cfg.text_field)

    def _packer_at(self, documents: int, buffer: np.ndarray) -> StreamPacker:
        return StreamPacker(self._documents, self.tok, self.span, documents, buffer.copy())

    def next_batch(self) -> torch.Tensor:
        rows: list[np.ndarray] = []
        while len(rows) < self.batch_size:
            block = self._packer.next_block()
            if block is None:  # end of the stream: next epoch
                if self.position == 0 and not rows:
                    raise UserError(f"stream {self.cfg.path} yields no training block. Fix: more data "
                                    "or a smaller data.block_size / data.val_blocks.")
                self.epoch, self.position = self.epoch + 1, 0
                self._packer = self._packer_at(self.start_documents, self.start_buffer)
                continue
            rows.append(block)
            self.position += 1
        return with_bos(torch.from_numpy(np.stack(rows)), self.bos)  # (B, T) int64

    def state_dict(self) -> dict[str, int | torch.Tensor]:
        return {"epoch": self.epoch, "position": self.position, "documents": self._packer.documents,
                "buffer": torch.from_numpy(self._packer.buffer.copy())}  # (n,) int64, n small

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if "documents" in state:
            buffer = torch.as_tensor(state["buffer"], dtype=torch.int64).numpy()
            self._packer = self._packer_at(int(state["documents"]), buffer)
            return
        # A checkpoint from before the stream position was recorded: replay the blocks served this epoch.
        self._packer = self._packer_at(self.start_documents, self.start_buffer)
        for _ in range(self.position):
            self._packer.next_block()


def prepare_stream(cfg: DataConfig, batch_size: int, tokenizer: TextTokenizer | None
                   ) -> tuple[TextTokenizer, StreamSampler, torch.Tensor, dict]:
    """Tokenizer, training sampler, (N_val, T) int64 validation blocks and info of a streamed dataset."""
    ds = hf_dataset(cfg.path, cfg.split, True, cfg.data_files)
    if tokenizer is not None:
        tok = tokenizer
    elif cfg.tokenizer == "bpe":
        head = list(itertools.islice(hf_documents(ds, cfg.text_field), cfg.bpe_train_docs))
        if not any(d.strip() for d in head):
            raise UserError(f"stream {cfg.path} is empty. Fix: check the dataset, split and text field.")
        tok = train_bpe(head, cfg.vocab_size)
    else:
        tok = load_tokenizer(cfg.tokenizer)
    src = hf_dataset(cfg.path, cfg.val_split, True, cfg.data_files) if cfg.val_split else ds
    bos = sequence_bos(tok, cfg.bos)
    span = cfg.block_size - (bos is not None)
    val = StreamPacker(lambda skip: hf_documents(skip_records(src, skip), cfg.text_field), tok, span)
    val_rows = []
    while len(val_rows) < cfg.val_blocks and (block := val.next_block()) is not None:
        val_rows.append(block)
    if not val_rows:
        raise UserError(f"block size {cfg.block_size} is longer than the stream {cfg.path} allows "
                        "(not one validation block). Fix: a smaller data.block_size.")
    if cfg.val_split:
        sampler = StreamSampler(cfg, tok, batch_size)
    else:  # training goes on from where the validation head stopped
        sampler = StreamSampler(cfg, tok, batch_size, val.documents, val.buffer)
    info = {"source": cfg.path, "streaming": True, "val_blocks": len(val_rows), "vocab_size": int(tok.vocab_size),
            "bos": bos, "bos_note": describe_bos(tok, bos, cfg.bos)}
    return tok, sampler, with_bos(torch.from_numpy(np.stack(val_rows)), bos), info
