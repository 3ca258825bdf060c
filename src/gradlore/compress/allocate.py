"""Rank allocation for WeLore (arXiv 2407.11239): one global threshold, found by bisection to meet a budget.

Each targeted matrix i (m_i × n_i, k_i = min(m_i, n_i)) has scores s_i1 ≥ … ≥ s_ik. WeLore's scores are the
min-max normalised singular values  ŝ_ij = (σ_ij − σ_i,min) / (σ_i,max − σ_i,min) ∈ [0, 1].
For a global threshold τ, matrix i keeps rank  r_i(τ) = max(1, #{j : s_ij > τ}).

A matrix is a low-rank component (LRC) when factoring saves enough parameters:

    r_i (m_i + n_i) < (1 − min_ratio) · m_i n_i          → cost r_i (m_i + n_i), effective rank r_i
    otherwise (N-LRC)                                    → stays dense: cost m_i n_i, effective rank k_i

Both budget measures are non-decreasing in τ, so bisection over the sorted distinct scores finds the
smallest τ that meets the budget (overshoot: one rank step of one matrix, plus a dense→factored jump):

    removed fraction        = 1 − Σ cost_i / Σ m_i n_i
    effective rank reduction = 1 − Σ eff_rank_i / Σ k_i          (WeLore's "ERR")

The uniform baseline uses the same machinery with synthetic scores s_ij = 1 − (j−1)/b_i, b_i = m_i n_i/(m_i+n_i)
(the break-even rank), so every matrix keeps the same fraction (1 − τ) of its break-even rank and thus
removes the same share of its own parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from gradlore.errors import UserError

METHODS = ("welore", "uniform")


@dataclass
class Allocation:
    """Per-matrix decision. ``ranks`` holds the kept rank of LRCs and the full rank of N-LRCs."""

    method: str
    threshold: float
    ranks: dict[str, int]
    lrc: dict[str, bool]
    shapes: dict[str, tuple[int, int]]
    params_before: int  # targeted parameters, dense
    params_after: int  # targeted parameters after factoring LRCs
    removed_fraction: float
    rank_reduction: float
    target: dict[str, float] = field(default_factory=dict)

    @property
    def n_lrc(self) -> int:
        return sum(self.lrc.values())


def normalized_scores(sigma: torch.Tensor) -> torch.Tensor:
    """Min-max normalised singular values in [0, 1] (descending), float64."""
    s = sigma.double()
    lo, hi = s.min(), s.max()
    if hi - lo <= 0:
        return torch.ones_like(s)  # flat spectrum (e.g. zero matrix): every direction equally important
    return (s - lo) / (hi - lo)


def uniform_scores(shape: tuple[int, int]) -> torch.Tensor:
    m, n = shape
    b = m * n / (m + n)  # break-even rank
    j = torch.arange(min(m, n), dtype=torch.float64)
    return 1.0 - j / b


def _plan(
    asc_scores: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], tau: float, min_ratio: float
) -> tuple[dict[str, int], dict[str, bool], int, int]:
    """Ranks, LRC flags, total cost and total effective rank at threshold tau."""
    ranks, lrc, cost, eff = {}, {}, 0, 0
    for name, asc in asc_scores.items():
        m, n = shapes[name]
        k = min(m, n)
        r = max(1, k - int(torch.searchsorted(asc, torch.tensor(tau, dtype=asc.dtype), right=True)))
        is_lrc = r < k and r * (m + n) < (1.0 - min_ratio) * m * n
        ranks[name], lrc[name] = (r, True) if is_lrc else (k, False)
        cost += r * (m + n) if is_lrc else m * n
        eff += r if is_lrc else k
    return ranks, lrc, cost, eff


def allocate(
    spectra: dict[str, torch.Tensor] | None,
    shapes: dict[str, tuple[int, int]],
    *,
    remove: float | None = None,
    rank_reduction: float | None = None,
    method: str = "welore",
    min_ratio: float = 0.0,
) -> Allocation:
    """Ranks meeting the budget: ``remove`` (fraction of targeted parameters) or ``rank_reduction`` (ERR)."""
    if (remove is None) == (rank_reduction is None):
        raise UserError("give exactly one budget: remove=FRACTION (of targeted parameters) or rank_reduction=FRACTION.")
    budget = remove if remove is not None else rank_reduction
    label = "remove" if remove is not None else "rank_reduction"
    if not isinstance(budget, (int, float)) or not 0.0 < float(budget) < 1.0:
        raise UserError(f"budget {label}={budget!r} must lie strictly between 0 and 1 (e.g. 0.2 for 20%).")
    if not 0.0 <= min_ratio < 1.0:
        raise UserError(f"min_ratio={min_ratio} must lie in [0, 1): the share of a matrix's parameters factoring must save.")
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if not shapes:
        raise UserError("nothing to allocate: no targeted layers.")

    if method == "welore":
        if spectra is None:
            raise UserError("WeLore allocation needs singular values.")
        scores = {n: normalized_scores(spectra[n]) for n in shapes}
    else:
        scores = {n: uniform_scores(shapes[n]) for n in shapes}
    asc = {n: s.sort().values for n, s in scores.items()}  # ascending, for searchsorted
    total = sum(m * n for m, n in shapes.values())
    total_rank = sum(min(s) for s in shapes.values())

    def metric(tau: float) -> float:
        _, _, cost, eff = _plan(asc, shapes, tau, min_ratio)
        return 1.0 - cost / total if remove is not None else 1.0 - eff / total_rank

    # Candidate thresholds: every distinct score (r changes only there), plus -inf (= keep everything).
    cands = torch.unique(torch.cat([torch.tensor([float("-inf")], dtype=torch.float64)] + list(asc.values())))
    lo, hi = 0, len(cands) - 1
    if metric(float(cands[hi])) < budget:
        raise UserError(
            f"budget {label}={budget} is unreachable with min_ratio={min_ratio}: at most "
            f"{metric(float(cands[hi])):.3f} can be removed from these layers. Lower the budget or min_ratio."
        )
    while lo < hi:  # smallest index whose metric meets the budget (metric is monotone in tau)
        mid = (lo + hi) // 2
        if metric(float(cands[mid])) >= budget:
            hi = mid
        else:
            lo = mid + 1
    tau = float(cands[lo])
    ranks, lrc, cost, eff = _plan(asc, shapes, tau, min_ratio)
    return Allocation(
        method=method,
        threshold=tau,
        ranks=ranks,
        lrc=lrc,
        shapes=dict(shapes),
        params_before=total,
        params_after=cost,
        removed_fraction=1.0 - cost / total,
        rank_reduction=1.0 - eff / total_rank,
        target={label: float(budget)},
    )
