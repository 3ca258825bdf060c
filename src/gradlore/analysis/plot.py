"""Plots and a summary of gradient-rank records, grouped by layer type (q, k, v, o, gate, up, down).

Paper: arXiv 2407.11239 (WeLore): layer types differ in how low-rank their gradients become. For each
type t and recorded step s the curves show the mean over blocks ℓ of a statistic x_{t,ℓ,s}:

    x̄_{t,s} = (1/L) Σ_ℓ x_{t,ℓ,s},   x ∈ {stable rank of G, subspace cosine vs the previous record,
                                          stable rank of W, normalised spectrum σᵢ/σ₁ at the last record}
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

TYPE_ORDER = ["q", "k", "v", "o", "gate", "up", "down"]


def _type_key(t: str) -> tuple[int, str]:
    return (TYPE_ORDER.index(t) if t in TYPE_ORDER else len(TYPE_ORDER), t)


def by_type(records: list[dict[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """type -> (steps, mean of `key` over the layers of that type at each step); None values skipped."""
    acc: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        v = r.get(key)
        if v is not None:
            acc[r["type"]][int(r["step"])].append(float(v))
    out = {}
    for t in sorted(acc, key=_type_key):
        steps = sorted(acc[t])
        out[t] = (steps, [sum(acc[t][s]) / len(acc[t][s]) for s in steps])
    return out


def _ends(series: tuple[list[int], list[float]] | None, k: int) -> tuple[float | None, float | None]:
    """Mean of the first k and of the last k recorded values (less noisy than single records)."""
    if not series or not series[1]:
        return None, None
    vals = series[1]
    k = max(1, min(k, len(vals) // 2 or 1))
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


def summarize(records: list[dict[str, Any]], k: int = 3) -> list[dict[str, Any]]:
    """One row per layer type: start vs end (means of the first / last k records, and over blocks) of the
    gradient stable rank, its 90%-energy rank, the subspace cosine; the weight stable rank at the first / last
    record."""
    rows = []
    series = {key: by_type(records, key) for key in ("stable_rank", "energy_rank_90", "subspace_cos",
                                                      "weight_stable_rank")}  # fmt: skip
    shapes = {r["type"]: r.get("shape") for r in records}
    for t, (steps, _) in series["stable_rank"].items():
        row: dict[str, Any] = {"type": t, "shape": shapes.get(t), "first_step": steps[0], "last_step": steps[-1],
                               "k": k}  # fmt: skip
        for key, short in (("stable_rank", "sr"), ("energy_rank_90", "er90"), ("subspace_cos", "cos"),
                           ("weight_stable_rank", "wsr")):  # fmt: skip
            # weights change smoothly: their first record is the initialisation itself
            kk = 1 if key == "weight_stable_rank" else k
            row[f"{short}_first"], row[f"{short}_last"] = _ends(series[key].get(t), kk)
        rows.append(row)
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `summarize` (means over blocks)."""

    def f(x: float | None, nd: int = 2) -> str:
        return "—" if x is None else f"{x:.{nd}f}"

    head = (
        "| layer type | shape | grad stable rank start → end | grad 90%-energy rank start → end "
        "| subspace cos start → end | weight stable rank start → end |"
    )
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        shape = "×".join(str(d) for d in r["shape"]) if r["shape"] else "—"
        lines.append(
            f"| {r['type']} | {shape} | {f(r['sr_first'])} → {f(r['sr_last'])} "
            f"| {f(r['er90_first'], 1)} → {f(r['er90_last'], 1)} "
            f"| {f(r['cos_first'], 3)} → {f(r['cos_last'], 3)} | {f(r['wsr_first'])} → {f(r['wsr_last'])} |"
        )
    if rows:
        lines.append(
            f"\nrecords at steps {rows[0]['first_step']} … {rows[0]['last_step']}; start / end = mean of the first / "
            f"last {rows[0]['k']} records (fewer for short runs) (weights: the first / last record) and over blocks; subspace cos = mean principal-angle cosine between the "
            "top-r gradient subspaces of consecutive records."
        )
    return "\n".join(lines)


def _rank(records: list[dict[str, Any]]) -> str:
    ranks = {r.get("subspace_rank") for r in records} - {None}
    return str(max(ranks)) if ranks else "r"


def plot_records(records: list[dict[str, Any]], out_png: str | Path, title: str = "") -> Path:
    """A 2×2 figure: gradient stable rank, subspace cosine, weight stable rank over steps; last spectrum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [
        (axes[0, 0], "stable_rank", "gradient stable rank ‖G‖_F²/‖G‖₂²", True),
        (axes[0, 1], "subspace_cos", f"top-{_rank(records)} subspace cosine vs the previous record", False),
        (axes[1, 0], "weight_stable_rank", "weight stable rank ‖W‖_F²/‖W‖₂²", False),
    ]
    colors = {}
    cmap = plt.get_cmap("tab10")
    for ax, key, label, log in panels:
        for i, (t, (steps, vals)) in enumerate(by_type(records, key).items()):
            colors.setdefault(t, cmap(i % 10))
            ax.plot(steps, vals, label=t, color=colors[t], marker="." if len(steps) < 30 else None)
        ax.set_title(label)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(title="layer type", fontsize=8)

    # last recorded spectrum per type, normalised by σ₁, mean over blocks
    ax = axes[1, 1]
    last = max(int(r["step"]) for r in records)
    spectra: dict[str, list[list[float]]] = defaultdict(list)
    for r in records:
        if int(r["step"]) == last and r.get("top_sv") and r["top_sv"][0] > 0:
            spectra[r["type"]].append([s / r["top_sv"][0] for s in r["top_sv"]])
    for t in sorted(spectra, key=_type_key):
        k = min(len(s) for s in spectra[t])
        mean = [sum(s[i] for s in spectra[t]) / len(spectra[t]) for i in range(k)]
        ax.plot(range(1, k + 1), mean, label=t, color=colors.get(t), marker="o", ms=3)
    ax.set_title(f"gradient spectrum σᵢ/σ₁ at step {last}")
    ax.set_xlabel("i")
    ax.grid(alpha=0.3)
    fig.suptitle(title or "gradient rank by layer type")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
