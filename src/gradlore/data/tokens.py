"""Corpus-scale tokenization: encode a list of documents once, keep the ids in a memory-mapped token file.

Encoding a corpus is the slow part of preparing data (minutes for a few GB), and the ids only change when
the documents or the tokenizer do. So the ids are written once to ``CACHE/tokens/<key>.npy`` and every
later run on the same corpus and tokenizer memory-maps that file (``np.load(mmap_mode="r")``) instead of
tokenizing again. The key hashes the documents (:func:`corpus_digest`), the tokenizer's fingerprint (its
serialized JSON / model bytes) and :data:`TOKENS_FORMAT`.

The ids are exactly those of encoding each document as its :func:`text_chunks` (pieces of ~64 KB cut at
line ends) and appending the end-of-text id after the document. Pieces of many documents are encoded
together in large batches (the Rust tokenizer spreads a batch over all cores) and streamed to the file as
they come, so memory stays at one batch of text and ids. File layout: NPY 1.0, a fixed 128-byte header
(rewritten with the final length once the ids are in, then the temporary file replaces the target
atomically), then the ids as little-endian uint16 when the vocabulary fits in 65,536 ids, else int32.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gradlore.cache import cache_dir
from gradlore.data.tokenizer import (
    CHUNK_CHARS,
    TextTokenizer,
    corpus_digest,
    text_chunks,
    tokenizer_fingerprint,
)

TOKENS_FORMAT = f"tokens-v1-c{CHUNK_CHARS}"  # bump when the encoding recipe or the file layout changes
BATCH_CHARS = 1 << 22    # text characters per encode_batch call (~4 MB: many pieces for every core)
BATCH_TEXTS = 4096       # pieces per call, whatever their size (corpora of many short documents)
HEADER_BYTES = 128       # NPY magic + length + header dict, space-padded; a multiple of 64 keeps ids aligned


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest dtype that holds every id of a ``vocab_size`` vocabulary: uint16 up to 65,536, else int32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<i4")


def token_file(digest: str, tok: TextTokenizer) -> Path:
    """Cache path of the ids of the documents with :func:`corpus_digest` ``digest`` under ``tok``."""
    parts = [TOKENS_FORMAT, digest, tokenizer_fingerprint(tok), f"eos={tok.eos_id}", f"vocab={tok.vocab_size}"]
    key = hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()
    return cache_dir() / "tokens" / f"{TOKENS_FORMAT}-{key[:32]}.npy"


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    """NPY 1.0 header of a 1-D array of ``n`` items, padded to exactly HEADER_BYTES."""
    header = repr({"descr": dtype.str, "fortran_order": False, "shape": (n,)})
    body = (header.ljust(HEADER_BYTES - 10 - 1) + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body


def _load(path: Path) -> np.ndarray | None:
    """The cached ids at ``path`` memory-mapped, or None when absent or unreadable (then encode again)."""
    if not path.exists():
        return None
    try:
        ids = np.load(path, mmap_mode="r")
    except (OSError, ValueError):  # truncated or foreign file: overwritten below
        return None
    return ids if ids.ndim == 1 and ids.dtype in (np.dtype("<u2"), np.dtype("<i4")) else None


def _encode(texts: list[str], eos_after: list[bool], tok: TextTokenizer, dtype: np.dtype) -> np.ndarray:
    """(n,) ids of ``texts`` in order, the end-of-text id after each text flagged in ``eos_after``."""
    encoded = iter(tok.encode_batch([t for t in texts if t]))  # the tokenizer never sees an empty text
    eos = None if tok.eos_id is None else np.array([tok.eos_id], dtype=np.int64)
    parts = []
    for text, end in zip(texts, eos_after):
        if text:
            parts.append(np.array(next(encoded), dtype=np.int64))
        if end and eos is not None:
            parts.append(eos)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # (n,)
    limit = np.iinfo(dtype).max
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) > limit):
        raise ValueError(f"tokenizer produced ids in [{int(ids.min())}, {int(ids.max())}], beyond the {dtype} "
                         f"range its vocab_size {tok.vocab_size} implies.")
    return ids.astype(dtype)


def _batches(docs: list[str], tok: TextTokenizer, dtype: np.dtype) -> Iterator[np.ndarray]:
    """Ids of the whole corpus, one (n_i,) array per batch of pieces."""
    texts: list[str] = []
    eos_after: list[bool] = []
    size = 0
    for doc in docs:
        pieces = list(text_chunks([doc])) or [""]  # an empty document still ends with end-of-text
        for i, piece in enumerate(pieces):
            texts.append(piece)
            eos_after.append(i == len(pieces) - 1)
            size += len(piece)
            if size >= BATCH_CHARS or len(texts) >= BATCH_TEXTS:
                yield _encode(texts, eos_after, tok, dtype)
                texts, eos_after, size = [], [], 0
    if texts:
        yield _encode(texts, eos_after, tok, dtype)


def encode_corpus(docs: list[str], tok: TextTokenizer, digest: str | None = None) -> np.ndarray:
    """(n_tokens,) ids of ``docs`` (uint16 or int32), each document followed by the end-of-text id.

    Memory-mapped from the token cache when this corpus was encoded with this tokenizer before; otherwise
    encoded in batches into the cache first. ``digest`` is :func:`corpus_digest` of ``docs`` if known.
    """
    path = token_file(digest or corpus_digest(docs), tok)
    cached = _load(path)
    if cached is not None:
        return cached
    dtype = token_dtype(tok.vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with open(tmp, "wb") as f:
            f.write(_npy_header(dtype, 0))
            for ids in _batches(docs, tok, dtype):
                f.write(ids.tobytes())
                n += ids.size
            f.seek(0)
            f.write(_npy_header(dtype, n))  # same length: the ids stay where they are
        os.replace(tmp, path)  # atomic: a concurrent or later run never sees half a file
    finally:
        tmp.unlink(missing_ok=True)
    if n == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.load(path, mmap_mode="r")
