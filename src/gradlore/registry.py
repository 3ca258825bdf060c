"""Registries of parts with closed option vocabularies.

A *part* (a projector, a residual rule, a refresh rule, a moment policy) is registered under a name
with the options it reads and their legal values. Options live where the part is registered and
nowhere else: the optimizer validates a param group against the union of its own keys and the keys of
the parts the group chose, so a typo (``fira_gama``) or an illegal value (``dct_norm="L1"``) is a
clear error with a "did you mean" hint instead of a silently ignored key.

    PROJECTORS = Registry("projector")
    PROJECTORS.add("dct", DCTProjector, dct_norm=Option("l1", choices=("l1", "l2"), doc="..."))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from gradlore.errors import UserError, did_you_mean


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(k, k.__name__)
                       for k in kinds)


@dataclass(frozen=True)
class Option:
    """One option of a part: its default, its type, and what values are legal.

    ``kind`` is int, float (ints accepted), str or bool; ``choices`` closes the set of values;
    ``check`` (with ``rule``, its wording) is any further condition, e.g. a range.
    """

    default: Any
    kind: type | tuple[type, ...] | None = None
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], bool] | None = None
    rule: str = ""
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind is None:
            object.__setattr__(self, "kind", type(self.default) if self.choices is None else type(self.choices[0]))

    def _has_kind(self, value: Any) -> bool:
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        if isinstance(value, bool) and bool not in kinds:
            return False  # True is an int to Python, never to us
        return any(isinstance(value, int if k is int else (int, float) if k is float else k) for k in kinds)

    def validate(self, key: str, value: Any, where: str) -> None:
        """Raise a UserError naming ``key``, the bad value and the legal ones."""
        if self.choices is not None:
            if value not in self.choices:
                raise UserError(f"{where}: {key}={value!r} is not allowed; choose one of "
                                f"{', '.join(repr(c) for c in self.choices)}.{did_you_mean(value, self.choices)}")
            return
        wanted = self.rule or _type_name(self.kind)
        if not self._has_kind(value) or (self.check is not None and not self.check(value)):
            raise UserError(f"{where}: {key}={value!r} must be {wanted}. Fix: e.g. {key}={self.default!r}.")


def positive_int(doc: str = "", default: int = 1) -> Option:
    return Option(default, int, check=lambda v: v >= 1, rule="a positive integer", doc=doc)


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    options: dict[str, Option]


class Registry:
    """Name -> part factory with its declared options. Registration is explicit: one decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, factory: Callable[..., Any], **options: Option) -> None:
        """Register ``factory`` under ``name``; it is called with the group's values of ``options``."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = Entry(name, factory, dict(options))

    def entry(self, name: Any, where: str = "") -> Entry:
        if name not in self._entries:
            raise UserError(f"{where + ': ' if where else ''}unknown {self.kind} {name!r}; valid: "
                            f"{', '.join(self._entries)}.{did_you_mean(name, self._entries)}")
        return self._entries[name]

    def options(self, name: str) -> dict[str, Option]:
        return self.entry(name).options

    def all_options(self) -> dict[str, tuple[str, Option]]:
        """Every option key of every part -> (part name, option); a key shared by parts appears once."""
        out: dict[str, tuple[str, Option]] = {}
        for entry in self._entries.values():
            for key, opt in entry.options.items():
                out.setdefault(key, (entry.name, opt))
        return out

    def build(self, name: str, group: dict) -> Any:
        """The part, built from the group's values of its options."""
        entry = self.entry(name)
        return entry.factory(**{k: group.get(k, opt.default) for k, opt in entry.options.items()})

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)
