"""The vocabulary of a param group: the optimizer's own keys, the part slots, and each part's options.

Every group chooses a state format (how its Adam moments are stored) and how an update is rounded into a
low-precision weight:

    state       fp32 | 8bit | factored                      (STATE_FORMATS; gradlore.optim.formats)
    rounding    stochastic | nearest                        (bf16/fp16 weights only; gradlore.optim.rounding)

A group that carries ``rank`` is projected. Its keys are also the projection keys below and the options
of the four parts it chose (one per slot):

    projector   svd | svd-int4 | dct | columns | random | identity     (gradlore.projectors.PROJECTORS)
    residual    discard | fira | sign | ef                  (RESIDUALS)
    refresh     every | lazy                                (gradlore.projectors.REFRESH)
    on_refresh  keep | reset | remap                        (ON_REFRESH; remap needs an index-selecting projector)

``normalize_group`` fills every default from these declarations (the one place defaults live) and
rejects an unknown key, a key of a part the group did not choose, or an illegal value, naming the fix.
A group without ``rank`` is plain AdamW and may carry only AdamW's keys, ``state``, ``rounding`` and the
options of its state format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gradlore.errors import UserError, did_you_mean
from gradlore.optim.formats import Blockwise8bit, Factored, Full
from gradlore.optim.moments import Keep, Remap, Reset
from gradlore.optim.residual import Discard, ErrorFeedback, FiraScale, SignDescent
from gradlore.optim.rounding import ROUNDING
from gradlore.projectors import PROJECTORS, REFRESH
from gradlore.quant import CODES
from gradlore.registry import Option, Registry, positive_int

RESIDUALS = Registry("residual")
RESIDUALS.add("discard", Discard)
RESIDUALS.add("fira", FiraScale, fira_gamma=Option(1.01, float, check=lambda v: v >= 1, rule="at least 1",
                                                   doc="Fira's norm-growth limit γ"))
RESIDUALS.add("sign", SignDescent, residual_lr_ratio=Option(1.0, float, check=lambda v: v >= 0, rule="at least 0",
                                                            doc="LR ratio of FRUGAL's signSGD on the residual"))
RESIDUALS.add("ef", ErrorFeedback, ef_bits=Option(32, choices=(32, 8, 4),
                                                  doc="bits per value of the error-feedback buffer: float32, blockwise 8-bit (dynamic code) or int4 (groups of 256)"))

ON_REFRESH = Registry("on_refresh")
ON_REFRESH.add("keep", Keep)
ON_REFRESH.add("reset", Reset)
ON_REFRESH.add("remap", Remap, remap_bias=Option("global", choices=("global", "row"),
                                                 doc="bias correction of moment rows: the tensor's count (DCTAdamW), or per row age"))

QUANT_OPTIONS = {
    "quant_block": positive_int("values per block sharing one float32 absmax scale", 256),
    "quant_code": Option("dynamic", choices=CODES, doc="8-bit code book: dynamic tree (arXiv 2110.02861) or linear"),
    "quant_min_size": Option(4096, int, check=lambda v: v >= 0, rule="a non-negative integer",
                             doc="tensors with fewer values keep fp32 moments"),
}
STATE_FORMATS = Registry("state")
STATE_FORMATS.add("fp32", Full)
STATE_FORMATS.add("8bit", Blockwise8bit, **QUANT_OPTIONS)
STATE_FORMATS.add("factored", Factored, **QUANT_OPTIONS)

SLOTS: dict[str, Registry] = {"projector": PROJECTORS, "residual": RESIDUALS, "refresh": REFRESH,
                              "on_refresh": ON_REFRESH, "state": STATE_FORMATS}
GROUP_SLOTS = ("state",)  # the slots every group has, projected or not


def _betas_ok(v: Any) -> bool:
    return isinstance(v, (tuple, list)) and len(v) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in v)


# AdamW's keys: every group has them (the constructor's arguments are their defaults).
ADAMW_OPTIONS: dict[str, Option] = {
    "lr": Option(1e-3, float, check=lambda v: v >= 0, rule="at least 0"),
    "betas": Option((0.9, 0.999), (tuple, list), check=_betas_ok, rule="two numbers in [0, 1)"),
    "eps": Option(1e-8, float, check=lambda v: v >= 0, rule="at least 0"),
    "weight_decay": Option(0.0, float, check=lambda v: v >= 0, rule="at least 0"),
    "fused": Option(None, (bool, type(None)), rule="(None: wherever torch has the kernel)"),
}
# Keys a group may carry that are not options: what the optimizer and torch's LR schedulers put there.
BOOKKEEPING = ("params", "param_names", "initial_lr")

# Keys of every group besides AdamW's (projected or not).
GROUP_OPTIONS: dict[str, Option] = {
    "state": Option("fp32", choices=tuple(STATE_FORMATS), doc="how the Adam moments are stored"),
    "rounding": Option("stochastic", choices=ROUNDING, doc="how an update is rounded into a bf16/fp16 weight"),
}
# Keys of a projected group, besides its parts' options.
PROJECTION_OPTIONS: dict[str, Option] = {
    "rank": Option(128, int, check=lambda v: v >= 0, rule="a positive integer (0 only with residual='sign')"),
    "scale": Option(0.25, float, doc="factor on the projected update on its way back (alias: alpha)"),
    "projector": Option("svd", choices=tuple(PROJECTORS)),
    "residual": Option("discard", choices=tuple(RESIDUALS)),
    "refresh": Option("every", choices=tuple(REFRESH)),
    "on_refresh": Option("keep", choices=tuple(ON_REFRESH)),
    "proj_type": Option("std", choices=("std",), doc="galore-torch's key; gradlore always projects the shorter side"),
    "seed": Option(0, int, doc="seed of random bases (with the parameter and the refresh step)"),
}
ALIASES = {"alpha": "scale"}  # Fira's name for the scale


def _slot_option(slot: str) -> Option:
    return GROUP_OPTIONS[slot] if slot in GROUP_SLOTS else PROJECTION_OPTIONS[slot]


def part_options(group: dict, slots: tuple[str, ...] | None = None) -> dict[str, Option]:
    """The options of the parts this group chose (defaults where a slot is not set)."""
    out: dict[str, Option] = {}
    for slot in SLOTS if slots is None else slots:
        out.update(SLOTS[slot].options(group.get(slot, _slot_option(slot).default)))
    return out


def _owner(key: str) -> str | None:
    """'residual='fira'' for an option key of some part, else None."""
    for slot, registry in SLOTS.items():
        for name in registry:
            if key in registry.options(name):
                return f"{slot}={name!r}"
    return None


def _alias(group: dict, where: str) -> None:
    for alias, key in ALIASES.items():
        if alias in group:
            value = group.pop(alias)
            if key in group and group[key] != value:
                raise UserError(f"{where}: both {key!r}={group[key]!r} and its alias {alias!r}={value!r} are set; "
                                "give only one of them.")
            group[key] = value


def normalize_group(group: dict, where: str) -> dict:
    """Check every key and value of a group (in place), fill the defaults, return it."""
    _alias(group, where)
    projected = "rank" in group
    slots = tuple(SLOTS) if projected else GROUP_SLOTS
    for slot in slots:  # validate the slots first: they decide which further keys are legal
        _slot_option(slot).validate(slot, group.setdefault(slot, _slot_option(slot).default), where)
    legal = {**ADAMW_OPTIONS, **GROUP_OPTIONS, **(PROJECTION_OPTIONS if projected else {}),
             **part_options(group, slots)}
    for key in group:
        if key in legal or key in BOOKKEEPING:
            continue
        owner = _owner(key)
        if owner is not None and owner.split("=")[0] in GROUP_SLOTS or projected and owner is not None:
            slot = owner.split("=")[0]
            raise UserError(f"{where}: {key!r} is an option of {owner}, but this group has "
                            f"{slot}={group[slot]!r}, which does not read it. Fix: drop {key!r} or set {owner}.")
        if key in PROJECTION_OPTIONS or owner is not None:
            raise UserError(f"{where}: {key!r} is a projection option but the group has no 'rank', so it would "
                            "train as plain AdamW and ignore it. Fix: add rank=... (e.g. 128) or drop the key.")
        known = list(ADAMW_OPTIONS) + list(GROUP_OPTIONS) + list(PROJECTION_OPTIONS) + list(ALIASES) + [
            k for reg in SLOTS.values() for k in reg.all_options()]
        raise UserError(f"{where}: unknown key {key!r}.{did_you_mean(key, known)} "
                        f"Valid keys here: {', '.join(sorted(legal))}.")
    for key, value in group.items():
        if key in legal:
            legal[key].validate(key, value, where)
    for key, opt in legal.items():
        if key not in ADAMW_OPTIONS:
            group.setdefault(key, opt.default)
    if projected:
        _check_moment_policy(group, where)
        if group["rank"] == 0 and group["residual"] != "sign":
            raise UserError(f"{where}: rank=0 must be a positive integer (0 only with residual='sign', i.e. pure "
                            "signSGD). Fix: e.g. rank=128.")
    return group


def _check_moment_policy(group: dict, where: str) -> None:
    """A policy that moves moment rows with their basis index needs a projector that selects indices, and
    moments kept row by row (``state='fp32'``: a quantized block or a factored statistic spans rows)."""
    if not getattr(ON_REFRESH.entry(group["on_refresh"]).factory, "needs_indices", False):
        return
    if not getattr(PROJECTORS.entry(group["projector"]).factory, "selects_indices", False):
        selecting = [n for n in PROJECTORS if getattr(PROJECTORS.entry(n).factory, "selects_indices", False)]
        raise UserError(f"{where}: on_refresh={group['on_refresh']!r} moves each moment row with its basis index, "
                        f"but projector={group['projector']!r} does not select basis indices (its subspace is "
                        f"not a subset of a fixed basis). Fix: use a projector that does "
                        f"({', '.join(repr(n) for n in selecting)}), or on_refresh='keep' or 'reset'.")
    if group["state"] != "fp32":
        raise UserError(f"{where}: on_refresh={group['on_refresh']!r} moves each moment row with its basis index, "
                        f"but state={group['state']!r} keeps moments in blocks or row/column statistics that span "
                        "rows. Fix: state='fp32' for this group (--set optim.state=fp32), or on_refresh='keep' or "
                        "'reset' with the compact format.")


def check_options(options: dict, where: str) -> None:
    """Validate a projected group's keys without parameters (a config checked before a model exists)."""
    normalize_group({"rank": 1, **dict(options), "params": []}, where)


@dataclass(frozen=True)
class Parts:
    """The parts a projected group chose, built from its options."""

    projector: Any
    residual: Any
    refresh: Any
    on_refresh: Any
    state: Any

    @classmethod
    def of(cls, group: dict) -> Parts:
        return cls(*(registry.build(group[slot], group) for slot, registry in SLOTS.items()))


def state_format(group: dict) -> Any:
    """The state format a (normalized) group chose, built from its options."""
    return STATE_FORMATS.build(group["state"], group)
