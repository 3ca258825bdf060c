"""Tokenizers: a pretrained one (model folder or SentencePiece file) or a byte-level BPE trained on the corpus.

Byte-level BPE (Sennrich et al., arXiv:1508.07909; GPT-2's byte alphabet) is trained with the
`tokenizers` library on the training documents and cached under ``CACHE/tokenizers/`` by the SHA-256 of
the documents and the vocabulary size, so a second run on the same corpus reuses it. Every tokenizer is
seen through one small adapter: ``encode_batch(texts) -> ids``, ``vocab_size``, ``eos_id``, ``save(dir)``
and ``fingerprint()`` (a hash of what decides its ids, which keys the token cache of
:mod:`gradlore.data.tokens`).

Beginning of sequence: each adapter reports ``bos_id``, the token its tokenizer itself puts in front of a
text when special tokens are added (``tok(text)`` vs ``tok(text, add_special_tokens=False)``: LLaMA-family and
Gemma tokenizers add ``<s>`` / ``<bos>``; GPT-2-style ones and our byte-level BPE add nothing, so None).
`sequence_bos` turns that convention (or a user's ``always`` / ``never``) into the id that starts every
sequence a model reads: a training block, a perplexity window, a calibration block. Texts themselves are
always encoded without special tokens; the BOS goes where a sequence starts, not where a document does.

Encoding goes through the Rust `tokenizers` library wherever one sits underneath (our BPE, any
``tokenizer.json``, transformers' fast tokenizers): ``encode_batch_fast`` encodes a batch on all cores and,
unlike ``encode_batch``, skips the character offsets that training never reads (about 3x faster; the ids
are the same).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from gradlore.cache import cache_dir
from gradlore.errors import UserError

EOS = "<|endoftext|>"
BPE_VERSION = "bytebpe-v1"  # bump when the training recipe changes so caches do not mix
CHUNK_CHARS = 1 << 16       # documents are cut at line ends into pieces of about this many characters

# Where transformers defines the generic encoding path; a tokenizer class that overrides one of the methods
# below elsewhere adds Python-side steps, so it is called through transformers, not its Rust backend.
_GENERIC_HF_MODULES = ("transformers.tokenization_utils_base", "transformers.tokenization_utils_fast",
                       "transformers.tokenization_utils_tokenizers")
_HF_ENCODE_METHODS = ("__call__", "_call_one", "encode_plus", "batch_encode_plus", "_encode_plus",
                      "_batch_encode_plus")


BOS_CHOICES = ("auto", "always", "never")
_PROBE = "Hello world. 12"  # any plain text: special tokens are what differs between the two encodings


class TextTokenizer(Protocol):
    vocab_size: int
    eos_id: int | None
    bos_id: int | None  # the id the tokenizer puts before a text (its convention), None when it adds none

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def save(self, directory: Path) -> None: ...

    def fingerprint(self) -> str: ...


def _fast_ids(backend, texts: list[str]) -> list[list[int]]:
    """Ids of ``texts`` from a `tokenizers.Tokenizer`, without special tokens, encoded in parallel."""
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast: tokenizers >= 0.20
    return [e.ids for e in encode(texts, add_special_tokens=False)]


def added_prefix(with_special: list[int], plain: list[int]) -> int | None:
    """The token an encoding with special tokens puts in front of the plain ids, else None."""
    if len(with_special) > len(plain) and with_special[1: 1 + len(plain)] == plain:
        return int(with_special[0])
    return None


def sequence_bos(tok: TextTokenizer, choice: str = "auto") -> int | None:
    """The id that starts every sequence the model reads, or None.

    ``auto``: the tokenizer's own convention (``bos_id``); ``always``: its BOS token even if it does not add
    it (``bos_token_id``); ``never``: none.
    """
    if choice not in BOS_CHOICES:
        raise UserError(f"BOS choice {choice!r} is not one of {', '.join(BOS_CHOICES)}. Fix: auto (the "
                        "tokenizer's convention), always or never.")
    if choice == "never":
        return None
    bos = getattr(tok, "bos_id", None)
    if choice == "always" and bos is None:
        bos = getattr(tok, "bos_token_id", None)
        if bos is None:
            raise UserError("this tokenizer has no beginning-of-sequence token, so BOS cannot be 'always'. "
                            "Fix: auto or never.")
    return None if bos is None else int(bos)


def describe_bos(tok: TextTokenizer, bos: int | None, choice: str = "auto") -> str:
    """One line saying what starts each sequence, for logs and eval output."""
    if bos is None:
        why = "the tokenizer adds none" if choice == "auto" else f"bos={choice}"
        return f"no BOS token ({why})"
    name = getattr(tok, "token_name", lambda i: None)(bos)
    why = "the tokenizer's convention" if choice == "auto" else f"bos={choice}"
    return f"BOS {name + ' ' if name else ''}(id {bos}) at the start of every sequence ({why})"


def folder_digest(directory: Path) -> str:
    """SHA-256 (hex) of the names and contents of every file below ``directory``."""
    digest = hashlib.sha256()
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(file.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


class HFTokenizer:
    """A `transformers` tokenizer loaded from a model folder (``AutoTokenizer.from_pretrained``)."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.vocab_size = len(tok)
        self.eos_id = tok.eos_token_id
        self.bos_token_id = tok.bos_token_id
        self._backend = self._plain_backend(tok)
        self.bos_id = added_prefix(tok(_PROBE)["input_ids"], tok(_PROBE, add_special_tokens=False)["input_ids"])

    def token_name(self, i: int) -> str | None:
        return self.tok.convert_ids_to_tokens(i)

    @staticmethod
    def _plain_backend(tok):
        """A private copy of the Rust tokenizer under a fast ``tok`` whose class encodes with transformers'
        generic path (then its ids equal ``tok(texts, add_special_tokens=False)``), else None."""
        if not getattr(tok, "is_fast", False) or getattr(tok, "backend_tokenizer", None) is None:
            return None
        for name in _HF_ENCODE_METHODS:
            method = getattr(type(tok), name, None)
            if method is not None and getattr(method, "__module__", "") not in _GENERIC_HF_MODULES:
                return None
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
        backend.no_truncation()  # what transformers sets before each call without truncation / padding
        backend.no_padding()
        backend.encode_special_tokens = bool(getattr(tok, "split_special_tokens", False))
        return backend

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._backend is not None:
            return _fast_ids(self._backend, texts)
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def save(self, directory: Path) -> None:
        self.tok.save_pretrained(str(directory))

    def fingerprint(self) -> str:
        with tempfile.TemporaryDirectory(prefix="gradlore-tok-") as tmp:
            self.save(Path(tmp))
            return f"hf-{type(self.tok).__name__}-{folder_digest(Path(tmp))}"


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file (LLaMA-1/2 style)."""

    def __init__(self, path: Path) -> None:
        import sentencepiece

        self.path = path
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = int(self.sp.get_piece_size())
        eos = int(self.sp.eos_id())
        self.eos_id = eos if eos >= 0 else None
        bos = int(self.sp.bos_id())
        # A SentencePiece model does not say whether to add its BOS; LLaMA-1/2 (whose format this is) always do
        # (Meta's encode(bos=True), transformers' add_bos_token=True), so a model that defines one adds it.
        self.bos_id = self.bos_token_id = bos if bos >= 0 else None

    def token_name(self, i: int) -> str | None:
        return self.sp.id_to_piece(i)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)  # a list is encoded on several threads

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, directory / "tokenizer.model")

    def fingerprint(self) -> str:
        return "spm-" + hashlib.sha256(self.sp.serialized_model_proto()).hexdigest()


class BPETokenizer:
    """A `tokenizers.Tokenizer` (our trained byte-level BPE or any ``tokenizer.json``)."""

    def __init__(self, tok, path: Path | None = None) -> None:
        self.tok = tok
        self.path = path
        self.vocab_size = int(tok.get_vocab_size())
        self.eos_id = tok.token_to_id(EOS)
        # its post-processor's convention (a tokenizer.json of LLaMA-3 / Gemma adds one; our BPE has none)
        self.bos_id = added_prefix(tok.encode(_PROBE).ids, tok.encode(_PROBE, add_special_tokens=False).ids)
        self.bos_token_id = self.bos_id

    def token_name(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return _fast_ids(self.tok, texts)

    def save(self, directory: Path) -> None:
        # Saved as a transformers fast tokenizer so that the run's model folder loads with from_pretrained.
        from transformers import PreTrainedTokenizerFast

        fast = PreTrainedTokenizerFast(tokenizer_object=self.tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)
        fast.save_pretrained(str(directory))

    def fingerprint(self) -> str:
        return "json-" + hashlib.sha256(self.tok.to_str().encode("utf-8")).hexdigest()  # the tokenizer.json


def tokenizer_fingerprint(tok: TextTokenizer) -> str:
    """What decides ``tok``'s ids: its ``fingerprint()``, or for other objects a hash of what ``save`` writes."""
    if callable(getattr(tok, "fingerprint", None)):
        return str(tok.fingerprint())
    with tempfile.TemporaryDirectory(prefix="gradlore-tok-") as tmp:
        tok.save(Path(tmp))
        return f"{type(tok).__name__}-{folder_digest(Path(tmp))}"


def corpus_digest(docs: Iterable[str]) -> str:
    """SHA-256 (hex) of a list of documents: of the SHA-256 of each, so that boundaries count."""
    digest = hashlib.sha256()
    for d in docs:
        digest.update(hashlib.sha256(d.encode("utf-8")).digest())
    return digest.hexdigest()


def train_bpe(documents: Iterable[str], vocab_size: int, digest: str | None = None) -> BPETokenizer:
    """Train (or fetch from the cache) a byte-level BPE with ``vocab_size`` entries on ``documents``.

    ``digest`` is :func:`corpus_digest` of the documents when the caller has it already (hashing a large
    corpus twice costs time).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise UserError(f"BPE vocab size {vocab_size} is below the 256-byte alphabet plus specials. "
                        "Fix: --set data.vocab_size=4096 (or any value >= 300).")
    docs = list(documents)
    key = f"{BPE_VERSION}-v{vocab_size}-{(digest or corpus_digest(docs))[:20]}"
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
    tok.train_from_iterator(text_chunks(docs), trainer=trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)  # atomic: concurrent runs never read half a file
    return BPETokenizer(tok, path)


def text_chunks(docs: Iterable[str], size: int = CHUNK_CHARS) -> Iterator[str]:
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
