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

"loss" (our option, data-aware whitening; `loss_allocation`) allocates on what truncation costs the model
instead of WeLore's shape-free normalised spectrum. With whitening (SVD-LLM arXiv 2403.07378) σ_ij are the
singular values of W_i L_i, L_i L_iᵀ = X_iᵀX_i/N + ridge, and dropping components j > r changes the layer's
output by exactly E‖δy_i‖² = Σ_{j>r} σ_ij² (+ the ridge's share). Each layer's output error is weighted by its
sensitivity w_i (sensitivity.py: the mean squared loss gradient per output unit, a diagonal Fisher /
Gauss-Newton estimate, so w_i E‖δy_i‖² ≈ the loss increase):

    minimise  Σ_i ℓ_i(r_i),  ℓ_i(r) = w_i Σ_{j>r} σ_ij²      subject to  Σ_i cost_i ≤ (1 − budget) Σ_i m_i n_i

with cost_i = r_i (m_i + n_i) for an LRC and m_i n_i for a dense layer (a layer stays dense where factoring
would not save parameters, r ≥ m n / (m + n), or does not pay for its loss). The Lagrangian relaxation
min ℓ_i(r) + λ cost_i is solved per layer in closed form: ℓ_i is convex in r (σ² descending), so the best LRC
rank keeps the components whose loss per parameter s_ij = w_i σ_ij² / (m_i + n_i) exceeds λ, and the layer
stays dense when λ (m_i n_i − r (m_i + n_i)) ≤ ℓ_i(r). The removed share is non-decreasing in λ, so bisection
over the finitely many λ where a decision changes (every s_ij and every dense/LRC switch point
ℓ_i(r) / (m_i n_i − r (m_i + n_i))) finds the smallest λ meeting the budget; that solution is optimal among
all allocations of at most its cost. The slack left below the budget is then filled greedily with the next
components of highest s_ij that fit. With an ERR budget the cost is the effective rank instead (r or k_i).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import torch

from gradlore.errors import UserError

METHODS = ("welore", "uniform", "loss")


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
    weights: dict[str, float] | None = None,
) -> Allocation:
    """Ranks meeting the budget: ``remove`` (fraction of targeted parameters) or ``rank_reduction`` (ERR).

    ``weights``: per-layer sensitivities, required by (and only used by) method "loss"."""
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

    if method == "loss":
        if spectra is None or weights is None:
            raise UserError("loss allocation needs whitened singular values and per-layer sensitivities. "
                            "Fix: compress with data_aware='whiten' and calibration text.")
        return loss_allocation(spectra, shapes, budget=float(budget), weights=weights, label=label,
                               min_ratio=min_ratio)
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


# --------------------------------------------------------------------------------- loss allocation
def _loss_terms(sigma: torch.Tensor, shape: tuple[int, int], err: bool, min_ratio: float, weight: float) -> dict:
    """Per layer: scores s_j (loss per unit of cost of component j), tail losses ℓ(r), r_max, unit, dense cost."""
    m, n = shape
    k = min(m, n)
    rel = sigma.double().clamp_min(0) ** 2 * float(weight)  # loss of dropping each component
    tail = torch.cat([rel.flip(0).cumsum(0).flip(0), rel.new_zeros(1)])  # tail[r] = Σ_{j≥r} rel_j, r = 0..k
    unit = 1 if err else m + n
    dense = k if err else m * n
    r_max = 0  # largest LRC rank: factoring must save (min_ratio of) the parameters
    while r_max + 1 < k and (r_max + 1) * (m + n) < (1.0 - min_ratio) * m * n:
        r_max += 1
    return {"asc": (rel / unit).flip(0).contiguous(), "rel": rel, "tail": tail, "unit": unit, "dense": dense,
            "r_max": r_max, "k": k, "mn": m * n, "mpn": m + n}


def _loss_choice(t: dict, lam: float) -> int:
    """The layer's Lagrangian choice at λ: the LRC rank r ≥ 1, or 0 for dense."""
    if t["r_max"] < 1:
        return 0
    keep = len(t["asc"]) - int(torch.searchsorted(t["asc"], torch.tensor(lam, dtype=torch.float64), right=True))
    r = min(max(keep, 1), t["r_max"])
    dense_better = lam * (t["dense"] - r * t["unit"]) <= float(t["tail"][r])
    return 0 if dense_better else r


def loss_allocation(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], *, budget: float,
                    weights: dict[str, float], label: str = "remove", min_ratio: float = 0.0, fill: bool = True
                    ) -> Allocation:
    """Global allocation minimising Σ_i w_i Σ_{j>r_i} σ_ij² under the budget (module docstring).

    ``fill=False`` returns the Lagrangian solution alone (optimal among allocations of at most its cost)."""
    err = label == "rank_reduction"
    missing = sorted(set(shapes) - set(weights))
    if missing:
        raise UserError(f"loss allocation needs a sensitivity weight for every layer; missing {missing[:3]}. "
                        "Fix: recompute the calibration statistics with sensitivities (method='loss').")
    bad = [n for n in shapes if not (math.isfinite(weights[n]) and weights[n] >= 0)]
    if bad:
        raise UserError(f"sensitivity weights must be >= 0 and finite; {bad[:3]} are not. Fix: recompute them.")
    terms = {name: _loss_terms(spectra[name], shapes[name], err, min_ratio, weights[name]) for name in shapes}
    total = sum(t["mn"] for t in terms.values())
    total_rank = sum(t["k"] for t in terms.values())
    denom = total_rank if err else total
    allowed = (1.0 - budget) * denom  # cost may not exceed this

    def cost_of(choice: dict[str, int]) -> int:
        return sum(terms[n]["dense"] if r == 0 else r * terms[n]["unit"] for n, r in choice.items())

    def plan(lam: float) -> dict[str, int]:
        return {name: _loss_choice(t, lam) for name, t in terms.items()}

    cands = [torch.zeros(1, dtype=torch.float64)]
    for t in terms.values():
        cands.append(t["asc"])
        r = torch.arange(1, t["r_max"] + 1, dtype=torch.float64)
        if len(r):
            cands.append(t["tail"][1 : t["r_max"] + 1] / (t["dense"] - r * t["unit"]))  # dense/LRC switch points
    cands = torch.unique(torch.cat(cands))  # ascending
    lo, hi = 0, len(cands) - 1
    if cost_of(plan(float(cands[hi]))) > allowed:
        most = 1.0 - cost_of(plan(float(cands[hi]))) / denom
        raise UserError(f"budget {label}={budget} is unreachable with min_ratio={min_ratio}: at most {most:.3f} can be "
                        "removed from these layers. Lower the budget or min_ratio.")
    while lo < hi:  # smallest λ whose plan meets the budget (its cost is non-increasing in λ)
        mid = (lo + hi) // 2
        if cost_of(plan(float(cands[mid]))) <= allowed:
            hi = mid
        else:
            lo = mid + 1
    lam = float(cands[lo])
    choice = plan(lam)
    # Fill the slack: the next component of highest loss per unit among LRCs that can still grow, if it fits.
    slack = allowed - cost_of(choice) if fill else 0
    order = {name: i for i, name in enumerate(terms)}
    heap = [(-float(terms[n]["rel"][r]) / terms[n]["unit"], order[n], n) for n, r in choice.items()
            if 0 < r < terms[n]["r_max"]]
    heapq.heapify(heap)
    while heap:
        _, _, name = heapq.heappop(heap)
        t = terms[name]
        if t["unit"] > slack:
            continue
        choice[name] += 1
        slack -= t["unit"]
        if choice[name] < t["r_max"]:
            heapq.heappush(heap, (-float(t["rel"][choice[name]]) / t["unit"], order[name], name))
    ranks = {n: (r if r else terms[n]["k"]) for n, r in choice.items()}
    lrc = {n: r > 0 for n, r in choice.items()}
    params = sum(t["mn"] if choice[n] == 0 else choice[n] * t["mpn"] for n, t in terms.items())
    eff = sum(ranks.values())
    return Allocation(
        method="loss", threshold=lam, ranks=ranks, lrc=lrc, shapes=dict(shapes), params_before=total,
        params_after=params, removed_fraction=1.0 - params / total, rank_reduction=1.0 - eff / total_rank,
        target={label: float(budget)},
    )
