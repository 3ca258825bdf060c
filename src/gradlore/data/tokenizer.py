"""Tokenizers: a pretrained one (model folder or SentencePiece file) or a byte-level BPE trained on the corpus.

Byte-level BPE (Sennrich et al., arXiv:1508.07909; GPT-2's byte alphabet) is trained with the
`tokenizers` library on the training documents and cached under ``CACHE/tokenizers/`` by the SHA-256 of
the documents and the vocabulary size, so a second run on the same corpus reuses it. Every tokenizer is
seen through one small adapter: ``encode_batch(texts) -> ids``, ``vocab_size``, ``eos_id``, ``save(dir)``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from gradlore.data.corpora import cache_dir
from gradlore.errors import UserError

EOS = "<|endoftext|>"
BPE_VERSION = "bytebpe-v1"  # bump when the training recipe changes so caches do not mix


class TextTokenizer(Protocol):
    vocab_size: int
    eos_id: int | None

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def save(self, directory: Path) -> None: ...


class HFTokenizer:
    """A `transformers` tokenizer loaded from a model folder (``AutoTokenizer.from_pretrained``)."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.vocab_size = len(tok)
        self.eos_id = tok.eos_token_id

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def save(self, directory: Path) -> None:
        self.tok.save_pretrained(str(directory))


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file (LLaMA-1/2 style)."""

    def __init__(self, path: Path) -> None:
        import sentencepiece

        self.path = path
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = int(self.sp.get_piece_size())
        eos = int(self.sp.eos_id())
        self.eos_id = eos if eos >= 0 else None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, directory / "tokenizer.model")


class BPETokenizer:
    """A `tokenizers.Tokenizer` (our trained byte-level BPE or any ``tokenizer.json``)."""

    def __init__(self, tok, path: Path | None = None) -> None:
        self.tok = tok
        self.path = path
        self.vocab_size = int(tok.get_vocab_size())
        self.eos_id = tok.token_to_id(EOS)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def save(self, directory: Path) -> None:
        # Saved as a transformers fast tokenizer so that the run's model folder loads with from_pretrained.
        from transformers import PreTrainedTokenizerFast

        fast = PreTrainedTokenizerFast(tokenizer_object=self.tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)
        fast.save_pretrained(str(directory))


def train_bpe(documents: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Train (or fetch from the cache) a byte-level BPE with ``vocab_size`` entries on ``documents``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise UserError(f"BPE vocab size {vocab_size} is below the 256-byte alphabet plus specials. "
                        "Fix: --set data.vocab_size=4096 (or any value >= 300).")
    docs = list(documents)
    digest = hashlib.sha256()
    for d in docs:
        digest.update(hashlib.sha256(d.encode("utf-8")).digest())
    key = f"{BPE_VERSION}-v{vocab_size}-{digest.hexdigest()[:20]}"
    path = cache_dir() / "tokenizers" / f"{key}.json"
    if path.exists():
        try:
            return BPETokenizer(Tokenizer.from_file(str(path)), path)
        except Exception:  # a corrupt cache entry: retrain below and overwrite it
            pass
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_chunks(docs), trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)  # atomic: concurrent runs never read half a file
    return BPETokenizer(tok, path)


def _chunks(docs: list[str], size: int = 1 << 16) -> Iterable[str]:
    """Split long documents at line ends into ~64 KB pieces (parallel training/encoding, same pre-tokens)."""
    for doc in docs:
        start = 0
        while start < len(doc):
            end = doc.find("\n", start + size)
            end = len(doc) if end < 0 else end + 1
            yield doc[start:end]
            start = end


def load_tokenizer(spec: str) -> TextTokenizer:
    """A pretrained tokenizer from a model folder, a SentencePiece ``.model`` or a ``tokenizer.json`` file."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"tokenizer {spec!r} not found. Fix: --set data.tokenizer=bpe to train one on the "
                        "corpus, or give a model folder / SentencePiece .model / tokenizer.json path.")
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.is_file() and path.suffix == ".json":
        from tokenizers import Tokenizer

        return BPETokenizer(Tokenizer.from_file(str(path)), path)
    from transformers import AutoTokenizer

    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(str(path)))
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError for unusable folders
        raise UserError(f"could not load a tokenizer from {path}: {exc}. "
                        "Fix: point data.tokenizer at a folder with tokenizer files, or use bpe.") from exc
