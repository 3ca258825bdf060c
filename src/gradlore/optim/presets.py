"""Presets: each method of the literature as a small composition of parts, with its paper's defaults.

A preset is a function returning the keys of a projected param group; ``param_groups`` puts them on
the targeted weights. Override any key by passing it: ``presets.galore(rank=64, scale=1.0)``. A preset
states only what its paper chose; every other key takes the default declared with its part
(``gradlore.optim.parts``). When an override swaps a part, the preset's options of the part it replaced
are dropped (``frugal(residual="discard")`` has no ``residual_lr_ratio``); the caller's own keys are kept
and validated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gradlore.optim.parts import GROUP_OPTIONS, PROJECTION_OPTIONS, part_options

Group = dict[str, Any]


def _compose(base: Group, overrides: dict[str, Any]) -> Group:
    """The preset's keys updated by the caller's; Fira's ``alpha`` is read as ``scale``."""
    if "alpha" in overrides:
        overrides = {**overrides, "scale": overrides["alpha"]}
        del overrides["alpha"]
    group = {**base, **overrides}
    legal = set(PROJECTION_OPTIONS) | set(GROUP_OPTIONS) | set(part_options(group))
    return {k: v for k, v in group.items() if k in legal or k in overrides}


def galore(rank: int = 128, **overrides: Any) -> Group:
    """GaLore (arXiv 2403.03507): SVD of the gradient every 200 steps, scale 0.25, residual dropped."""
    base = {"rank": rank, "projector": "svd", "update_proj_gap": 200, "scale": 0.25, "residual": "discard"}
    return _compose(base, overrides)


def dct(rank: int = 128, **overrides: Any) -> Group:
    """The SVD-free method as its authors run it (arXiv 2505.17967; ``DCTAdamW`` in ``ista-daslab-optimizers``).

    Where each default comes from:
    - ``projector="dct"``, ``dct_norm="l1"``: the top-r columns of the orthonormal DCT-II by the ℓ1 norm of
      their alignment ‖Gᵀq_k‖₁ (the paper's column ranking; DCTAdamW's ``sim_type="makhoul"`` basis);
    - ``update_proj_gap=1``: the columns are re-selected every step (DCTAdamW's default ``update_proj_gap=1``);
    - ``on_refresh="remap"``: each moment row follows its column and new columns start at zero, which is the
      authors' rotation of the moments by R = Q_prevᵀQ_crt (exact for an orthonormal basis, without its
      rounding); every row is bias-corrected with the tensor's step count, as DCTAdamW does
      (``remap_bias="global"``; it runs in the fused kernel). ``remap_bias="row"`` corrects each row by its
      own age instead: issue 9's benchmark found it 3–4 % worse (α 0.25, 3 seeds, 300 and 900 steps) and
      no better at α 1, so the published rule is the default;
    - ``scale=1.0``: DCTAdamW has no scale on the update (GaLore's 0.25 is not part of this method);
    - ``residual="discard"``: DCTAdamW drops the complement (its error feedback, ``use_ef``, is off by default;
      ``residual="ef"`` is that feedback, equal to DCTAdamW's ``use_ef=True``, at one float32 copy of each
      projected weight, or about a quarter / an eighth of that with ``ef_bits=8`` / ``4``).
    Its LR is not GaLore's: with α = 1 the projected update is 4× GaLore-style's at the same LR, while the
    unprojected weights (embeddings, head, norms) keep the LR, so tune it afresh (issue 9's benchmark, small
    LLaMA on Shakespeare: best 1e-3 of {1, 2, 4}e-3, where ``dct-galore``'s was 5e-3 of {2, 3, 5}e-3). At that
    scale α = 1 costs more than the per-step selection gains: ``--set optim.scale=0.25`` is the better run there.
    On a corpus that does not run out (9.5 MB, 6× the tokens, BENCHMARKS.md) this preset is 12.8 % behind GaLore;
    with the authors' error feedback at α 0.25 (``residual="ef", scale=0.25``) 2.8 %.
    """
    base = {"rank": rank, "projector": "dct", "dct_norm": "l1", "update_proj_gap": 1, "scale": 1.0,
            "residual": "discard", "on_refresh": "remap", "remap_bias": "global"}
    return _compose(base, overrides)


def dct_galore(rank: int = 128, **overrides: Any) -> Group:
    """DCT columns (arXiv 2505.17967) inside GaLore's recipe (arXiv 2403.03507): refresh every 200 steps,
    scale 0.25, moments kept by position (``on_refresh="keep"``). This was the ``dct`` preset before issue 9;
    it stays so that its results can be reproduced and compared."""
    return galore(rank, **_compose({"projector": "dct", "dct_norm": "l1"}, overrides))


def fira(rank: int = 128, **overrides: Any) -> Group:
    """Fira (arXiv 2410.01623): GaLore plus norm-scaled residual with the norm-growth limiter (γ=1.01)."""
    return galore(rank, **_compose({"residual": "fira", "fira_gamma": 1.01}, overrides))


def frugal(rank: int = 128, **overrides: Any) -> Group:
    """FRUGAL (arXiv 2411.07837): Adam in an SVD subspace, state-free signSGD on the rest; moments reset."""
    base = {"scale": 1.0, "residual": "sign", "residual_lr_ratio": 1.0, "on_refresh": "reset"}
    return galore(rank, **_compose(base, overrides))


def dct_fira(rank: int = 128, **overrides: Any) -> Group:
    """Fira's residual on the SVD-free DCT subspace, in Fira's (GaLore's) recipe: the parts compose."""
    return fira(rank, **_compose({"projector": "dct", "dct_norm": "l1"}, overrides))


def q_galore(rank: int = 128, **overrides: Any) -> Group:
    """Q-GaLore (arXiv 2407.08296): GaLore's SVD basis stored as int4 (groups of 256), refreshed lazily (the gap
    doubles once 5 refreshes in a row overlap by >= 0.4), Adam moments in 8 bits. Its INT8 weights with
    stochastic rounding are, here, bf16 weights with stochastic rounding (``--memory low``)."""
    base = {"projector": "svd-int4", "basis_group": 256, "refresh": "lazy", "lazy_threshold": 0.4, "lazy_window": 5,
            "lazy_growth": 2.0, "state": "8bit"}
    return galore(rank, **_compose(base, overrides))


PRESETS: dict[str, Callable[..., Group]] = {
    "galore": galore,
    "dct": dct,
    "dct-galore": dct_galore,
    "fira": fira,
    "frugal": frugal,
    "dct-fira": dct_fira,
    "q_galore": q_galore,
}


def names() -> list[str]:
    return list(PRESETS)
