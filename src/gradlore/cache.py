"""gradlore's on-disk cache: downloaded corpora, trained tokenizers, token files, converted models, spectra.

One root for everything, ``$GRADLORE_CACHE`` or ``~/.cache/gradlore``; nothing is ever written inside the
git tree.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of gradlore's cache: ``$GRADLORE_CACHE`` or ``~/.cache/gradlore``."""
    root = os.environ.get("GRADLORE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gradlore")
    return Path(root).expanduser()
