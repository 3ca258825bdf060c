"""``gradlore bench tokenize``: preparing a 50 MB corpus, before and after the token cache.

Why: tokenizing is the slow step of data preparation, and it used to be repeated by every run. Now a
corpus is encoded once, in large parallel batches (:mod:`gradlore.data.tokens`), into a token file that
later runs memory-map. This benchmark shows both halves of that on a real corpus.

Corpus: tiny-shakespeare (``--shakespeare``; the packaged 300 KB head if that file is absent) followed by
the prose of CPython's ``pydoc_data.topics``, repeated to ``--size-mb`` MB and cut at a line end, written
once under ``--work`` (never inside the repository). Tokenizer: gradlore's default byte-level BPE
(``--vocab-size``, 4096), trained on the corpus and cached beforehand (training is not timed).

Measured, each in a fresh Python process with the corpus file in the page cache:

* first run: tokens/s of encoding the corpus with the token cache empty (``encode_corpus``, including
  writing the token file);
* second run: wall time from calling ``prepare_data`` to data ready (read + hash the corpus, load the
  cached BPE, map the token file, split), with the token file present; the tokenizer is not called;
* ``--baseline-src DIR`` (a checkout of the code before the token cache, e.g. a git worktree): the old
  ``prepare_data`` in a process with ``PYTHONPATH=DIR``, timing its ``encode_documents`` inside; with no
  cache its every run encodes, so its "second run" is the same work. The sha256 of both id sequences (as
  int64) is compared: the ids must be identical.

Run: ``gradlore bench tokenize [--baseline-src /work/baseline/src]`` (``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pydoc_data.topics
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from gradlore.data import blocks, tokens
from gradlore.data.config import DataConfig
from gradlore.data.corpora import resolve_corpus
from gradlore.data.text import local_documents, local_path
from gradlore.data.tokenizer import corpus_digest, train_bpe
from gradlore.errors import UserError

SRC = Path(blocks.__file__).resolve().parents[2]  # the src/ folder that holds this gradlore

# Run with PYTHONPATH=<baseline src>: the old pipeline, with its encode_documents timed from inside.
BASELINE = r"""
import hashlib, json, sys, time
from gradlore.data import blocks
corpus, vocab, block = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seen = {}
encode = blocks.encode_documents
def timed(docs, tok):
    t0 = time.perf_counter()
    seen["ids"] = encode(docs, tok)
    seen["encode_s"] = time.perf_counter() - t0
    return seen["ids"]
blocks.encode_documents = timed
t0 = time.perf_counter()
data = blocks.prepare_data(blocks.DataSpec(path=corpus, block_size=block, vocab_size=vocab), 8, 0)
ready = time.perf_counter() - t0
ids = seen["ids"]
print(json.dumps({"gradlore": blocks.__file__, "tokens": int(ids.numel()), "encode_s": seen["encode_s"],
                  "ready_s": ready, "sha256": hashlib.sha256(ids.numpy().astype("<i8").tobytes()).hexdigest()}))
"""


def build_corpus(path: Path, size_mb: float, shakespeare: Path) -> Path:
    """Write the benchmark corpus to ``path`` unless it is there already."""
    if path.exists():
        return path
    source = shakespeare if shakespeare.is_file() else resolve_corpus("tiny-shakespeare")
    prose = "\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    unit = source.read_text(encoding="utf-8") + "\n" + prose + "\n"
    n = int(size_mb * 1_000_000)
    text = unit * (n // len(unit) + 1)
    text = text[: text.rfind("\n", 0, n) + 1]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    print(f"built {path}: {len(text):,} characters from {source} + pydoc_data.topics", file=sys.stderr)
    return path


def first_run(corpus: str, vocab_size: int) -> dict:
    """Encode the corpus with the token cache empty; the BPE is trained (or loaded) first, untimed."""
    docs = [d for d in local_documents(local_path(corpus)) if d.strip()]
    digest = corpus_digest(docs)
    t0 = time.perf_counter()
    tok = train_bpe(docs, vocab_size, digest=digest)
    bpe_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = tokens.encode_corpus(docs, tok, digest)  # (n,) uint16
    encode_s = time.perf_counter() - t0
    return {"tokens": int(ids.size), "encode_s": encode_s, "bpe_s": bpe_s, "dtype": str(ids.dtype),
            "documents": len(docs), "token_file": str(ids.filename),
            "sha256": hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest()}


def second_run(corpus: str, vocab_size: int, block_size: int, token_file: str) -> dict:
    """``prepare_data`` with the token file present: call to data ready."""
    before = Path(token_file).stat().st_mtime_ns
    t0 = time.perf_counter()
    data = blocks.prepare_data(DataConfig(path=corpus, vocab_size=vocab_size, block_size=block_size), 8, 0)
    ready_s = time.perf_counter() - t0
    data.train.next_batch()
    mapped = data.info["token_file"] == token_file and Path(token_file).stat().st_mtime_ns == before
    return {"ready_s": ready_s, "tokens": data.info["tokens"], "mapped": mapped}


def _ours(function: str, **kwargs: object) -> tuple[str, list[str]]:
    """Code and arguments that run ``function(**kwargs)`` of this module in a fresh process."""
    code = (f"import json, sys; from gradlore.bench.tokenize import {function}; "
            f"print(json.dumps({function}(**json.loads(sys.argv[1]))))")
    return code, [json.dumps(kwargs)]


def _child(code: str, args: list[str], src: Path, cache: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), GRADLORE_CACHE=str(cache), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark process failed ({src}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--work", default="/tmp/gradlore-bench/tokenize", help="corpus and cache folder (default: %(default)s)")
    p.add_argument("--size-mb", type=float, default=50.0, help="corpus size in MB (default: 50)")
    p.add_argument("--shakespeare", default="/work/shared/data/tinyshakespeare.txt",
                   help="tiny-shakespeare text (default: %(default)s; the packaged head if absent)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--baseline-src", help="src/ folder of the code before the token cache, to time the old path")
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p


def run(args: argparse.Namespace) -> int:
    if args.size_mb <= 0 or args.vocab_size < 300 or args.block_size < 2:
        raise UserError("--size-mb must be > 0, --vocab-size >= 300, --block-size >= 2. Fix: e.g. the defaults.")
    baseline = Path(args.baseline_src).resolve() if args.baseline_src else None
    if baseline is not None and not (baseline / "gradlore" / "data" / "blocks.py").is_file():
        raise UserError(f"--baseline-src {baseline} holds no gradlore/data/blocks.py. "
                        "Fix: pass the src/ folder of a checkout of the old code.")
    work = Path(args.work).expanduser().resolve()
    if work.is_relative_to(SRC.parent):
        raise UserError(f"--work {work} is inside the repository. Fix: a folder under /tmp.")
    corpus = build_corpus(work / f"corpus-{args.size_mb:g}MB.txt", args.size_mb, Path(args.shakespeare))
    cache = work / "cache"
    shutil.rmtree(cache / "tokens", ignore_errors=True)  # the first run starts with no token file
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    print(f"machine: {cpus} CPUs, load average {load:.2f} before the runs"
          + ("  (BUSY: figures are pessimistic)" if load > 0.5 * cpus else ""))

    first = _child(*_ours("first_run", corpus=str(corpus), vocab_size=args.vocab_size), SRC, cache)
    second = _child(*_ours("second_run", corpus=str(corpus), vocab_size=args.vocab_size,
                           block_size=args.block_size, token_file=first["token_file"]), SRC, cache)
    old = None
    if baseline is not None:
        old = _child(BASELINE, [str(corpus), str(args.vocab_size), str(args.block_size)], baseline, cache)
        if not str(Path(old["gradlore"]).resolve()).startswith(str(baseline)):
            raise RuntimeError(f"the baseline process imported {old['gradlore']}, not the code under {baseline}")

    mb = corpus.stat().st_size / 1e6
    print(f"corpus: {corpus} ({mb:.1f} MB, {first['documents']} document(s)); byte-level BPE, vocab "
          f"{args.vocab_size} (trained or loaded in {first['bpe_s']:.1f} s, not timed); {first['tokens']:,} "
          f"tokens ({first['dtype']} token file)")
    rows = [("first run: encode, tokens/s", "{:,.0f}", lambda r: r["tokens"] / r["encode_s"]),
            ("first run: encode wall time", "{:.2f} s", lambda r: r["encode_s"]),
            ("second run: prepare_data to data ready", "{:.2f} s", lambda r: r["ready_s"])]
    after = {**first, **second}
    print(f"{'':42s}{'before':>14s}{'after':>14s}")
    for label, fmt, get in rows:
        print(f"{label:42s}{fmt.format(get(old)) if old else '-':>14s}{fmt.format(get(after)):>14s}")
    print(f"second run mapped the token file without re-encoding: {'yes' if second['mapped'] else 'NO'}")
    if old is not None:
        same = old["sha256"] == first["sha256"] and old["tokens"] == first["tokens"]
        print(f"token ids identical to the old encoding: {'yes' if same else 'NO'} (sha256 {first['sha256'][:16]})")
    if args.json:
        Path(args.json).write_text(json.dumps({"corpus": str(corpus), "after": after, "before": old}, indent=2) + "\n")
    return 0 if old is None or old["sha256"] == first["sha256"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gradlore bench tokenize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return run(build_parser(p).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
