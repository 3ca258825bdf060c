"""Errors shared by the library and the command line, and the small checks that raise them."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class UserError(ValueError):
    """Bad input from the user. The CLI prints it without a traceback and exits with status 2."""


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """' Did you mean X?' for the closest candidates of a misspelt ``word``, or ''."""
    by_lower = {str(c).lower(): c for c in candidates}  # "L1" is close to "l1"
    close = difflib.get_close_matches(str(word).lower(), list(by_lower), n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(by_lower[c]) for c in close)}?" if close else ""


def require_positive(obj: Any, section: str, *names: str) -> None:
    """Each named attribute of ``obj`` must be > 0; the error names ``section.name``."""
    for name in names:
        if getattr(obj, name) <= 0:
            raise UserError(f"{section}.{name}={getattr(obj, name)} must be > 0.")
