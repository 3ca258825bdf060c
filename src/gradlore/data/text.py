"""Text sources: a local file or folder, a JSONL file, a registered corpus, or a Hugging Face dataset.

Every source is read as a sequence of *documents* (strings). Between documents the packer inserts the
tokenizer's end-of-text token, as in GPT-2 / GaLore's C4 pipeline. Spec syntax (``--data``):

* ``path/to/file.txt`` (any non-JSON file is read as UTF-8 text, one document per file; a binary file or
  one that is not UTF-8 is refused with a UserError naming it);
* ``path/to/file.jsonl`` (one JSON object per line; the ``text_field`` key is the document);
* ``path/to/folder`` (every ``*.txt``, ``*.md``, ``*.jsonl`` below it, in sorted order);
* ``shakespeare``, ``tiny-shakespeare`` (a name from :mod:`gradlore.data.corpora`);
* ``hf:NAME`` or ``hf:NAME:CONFIG`` (``datasets.load_dataset``, optionally streaming, e.g. ``hf:allenai/c4:en``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from gradlore.data.corpora import CORPORA, resolve_corpus
from gradlore.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".text", ".jsonl", ".json")
SNIFF_BYTES = 8192          # a NUL byte in a file's head means binary (as git and grep decide)
BAD_UTF8_PER_BYTE = 1e-3    # tolerated invalid UTF-8 sequences per byte (a stray Latin-1 byte or a cut end)
_NOT_TEXT_FIX = ("Fix: give a UTF-8 text file, a folder of them or a JSONL file (convert another encoding "
                 "with e.g. `iconv -t UTF-8`).")


def is_hf_spec(spec: str) -> bool:
    return spec.startswith("hf:")


def local_path(spec: str) -> Path:
    """Resolve ``spec`` (a path or a corpus name) to an existing local path, or raise a UserError."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec in CORPORA:
        return resolve_corpus(spec)
    raise UserError(
        f"data {spec!r} not found. Fix: pass --data with an existing text file, folder or JSONL file, "
        f"a corpus name ({', '.join(sorted(CORPORA))}), or hf:DATASET[:CONFIG]."
    )


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise UserError(f"folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)}). "
                        "Fix: point --data at a folder of .txt/.jsonl files.")
    return files


def _refuse_binary_head(path: Path, head: bytes) -> None:
    if b"\0" in head:
        raise UserError(f"{path} is not UTF-8 text (binary file?): it holds NUL bytes. {_NOT_TEXT_FIX}")


def read_text_file(path: Path) -> str:
    """The text of a UTF-8 file; a binary or non-UTF-8 file raises a UserError that names it.

    A few invalid sequences (at most one per 1,000 bytes, plus one) are replaced by U+FFFD, as before.
    """
    raw = path.read_bytes()
    _refuse_binary_head(path, raw[:SNIFF_BYTES])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        bad = text.count("\ufffd") - raw.count("\ufffd".encode("utf-8"))  # one U+FFFD per invalid sequence
        if bad > 1 + BAD_UTF8_PER_BYTE * len(raw):
            raise UserError(f"{path} is not UTF-8 text (binary file?): {bad} invalid UTF-8 sequences in "
                            f"{len(raw)} bytes. {_NOT_TEXT_FIX}") from None
    if "\r" in text:  # universal newlines, as text-mode reading gives: \r\n and \r become \n
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open("rb") as f:
        _refuse_binary_head(path, f.read(SNIFF_BYTES))
    lineno = 0
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg}). Fix: one JSON object per line.") from None
                if not isinstance(record, dict) or text_field not in record:
                    raise UserError(f"{path}:{lineno}: no {text_field!r} field. "
                                    f"Fix: --set data.text_field=NAME with the field that holds the text.")
                yield str(record[text_field])
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text (binary file?): invalid UTF-8 after line {lineno}. "
                        f"{_NOT_TEXT_FIX}") from None


def local_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """Documents of a local file or folder (text files whole, JSONL files record by record)."""
    for file in _files(path):
        if file.suffix.lower() in (".jsonl", ".json"):
            yield from _read_jsonl(file, text_field)
        else:
            yield read_text_file(file)


def hf_dataset(spec: str, split: str, streaming: bool, data_files: str | None = None) -> Iterable[dict]:
    """``datasets.load_dataset`` for ``hf:NAME[:CONFIG]``; a clear error if ``datasets`` is missing."""
    try:
        import datasets
    except ImportError:
        raise UserError("hf: data needs the `datasets` package. Fix: pip install datasets") from None
    name, _, config = spec[3:].partition(":")
    try:
        return datasets.load_dataset(name, config or None, split=split, streaming=streaming,
                                     data_files=data_files or None)
    except Exception as exc:  # the hub or a builder raises many types; all mean "cannot load this"
        raise UserError(f"could not load dataset {spec!r} split {split!r}: {exc}. "
                        "Fix: check the name/config/split, and network access or HF_HUB_OFFLINE caches.") from exc


def hf_documents(dataset: Iterable[dict], text_field: str) -> Iterator[str]:
    for record in dataset:
        if text_field not in record:
            raise UserError(f"dataset records have no {text_field!r} field (they have {sorted(record)}). "
                            "Fix: --set data.text_field=NAME.")
        yield str(record[text_field])
