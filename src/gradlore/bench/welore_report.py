"""Tables and the plot of `gradlore bench welore` (arXiv 2407.11239), from its results.json.

Gap closed by fine-tuning a compressed model: (ppl_compressed − ppl_ft) / (ppl_compressed − ppl_dense), on
each evaluation corpus; 1 = back to the dense model, ≥ 0.5 is the issue's target at 20% removed.
"""

from __future__ import annotations

import argparse
from typing import Any

CORPORA = ("wikitext2", "shakespeare")
MIB = 1 << 20


def _f(x: float | None, fmt: str = ",.1f") -> str:
    return "–" if x is None else format(x, fmt)


def _ppl(run: dict[str, Any] | None, corpus: str) -> float | None:
    if run is None:
        return None
    return run.get("ppl", {}).get(corpus, run.get("perplexity") if corpus == "wikitext2" else None)


def _labels(runs: dict[str, Any]) -> list[str]:
    return sorted({r["mode"] for r in runs.values() if r["mode"] != "free"})


def ppl_tables(args: argparse.Namespace, results: dict[str, Any], primary: str) -> list[str]:
    setup, dense, runs = results.get("setup", {}), results.get("dense", {}), results.get("runs", {})
    n = setup.get("eval_tokens")
    n = ", ".join(f"{v:,}" for v in n.values()) if isinstance(n, dict) else n
    lines = [f"Perplexity, first {n} tokens of each corpus (WikiText-2 raw test and the packaged "
             f"tiny-shakespeare), context {setup.get('context')}, stride {setup.get('stride')}, BOS "
             f"{setup.get('bos')}; dense {_f(_ppl(dense, 'wikitext2'), '.2f')} / {_f(_ppl(dense, 'shakespeare'), '.2f')} "
             f"({dense.get('params', 0):,} params). Data-aware = activation-whitened SVD, {primary}.\n"]
    for corpus in CORPORA:
        d = _ppl(dense, corpus)
        lines.append(f"| {corpus}: removed | WeLore data-free | uniform data-free | WeLore data-aware | uniform data-aware "
                     "| loss data-aware | WeLore / loss data-aware ÷ dense | ERR (WeLore free / aware / loss) "
                     "| LRC (free / aware / loss) |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        keys = (("welore", "free"), ("welore", primary), ("loss", primary))
        for b in args.budgets:
            g = {(r["method"], r["mode"]): r for r in runs.values() if r["budget"] == b}
            if not g:
                continue
            wa, lo = _ppl(g.get(("welore", primary)), corpus), _ppl(g.get(("loss", primary)), corpus)
            err = " / ".join(_f(g[k]["rank_reduction"] * 100, ".1f") + "%" if k in g else "–" for k in keys)
            lrc = " / ".join(str(g[k]["n_lrc"]) if k in g else "–" for k in keys)
            ratio = " / ".join(f"{x / d:.2f}×" if x and d else "–" for x in (wa, lo))
            lines.append(f"| {b:.0%} | {_f(_ppl(g.get(('welore', 'free')), corpus))} | "
                         f"{_f(_ppl(g.get(('uniform', 'free')), corpus))} | {_f(wa)} | "
                         f"{_f(_ppl(g.get(('uniform', primary)), corpus))} | {'–' if lo is None else f'**{_f(lo)}**'} | {ratio} | {err} | {lrc} |")
        lines.append("")
    labels = _labels(runs)
    if len(labels) > 1:
        lines.append("Data-aware variants (calibration source, tokens, ridge): WeLore (uniform) [loss] perplexity, "
                     "wikitext2 / shakespeare\n")
        lines.append("| variant | " + " | ".join(f"{b:.0%}" for b in args.budgets) + " |")
        lines.append("|---|" + "---|" * len(args.budgets))
        for label in labels:
            cells = []
            for b in args.budgets:
                w, u, lo = (runs.get(f"{m}|{label}|{b}") for m in ("welore", "uniform", "loss"))
                cells.append(f"{_f(_ppl(w, 'wikitext2'))} ({_f(_ppl(u, 'wikitext2'))}) [{_f(_ppl(lo, 'wikitext2'))}] / "
                             f"{_f(_ppl(w, 'shakespeare'))} [{_f(_ppl(lo, 'shakespeare'))}]" if w or u or lo else "–")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def finetune_table(results: dict[str, Any]) -> list[str]:
    ft, ts, runs, dense = (results.get(k, {}) for k in ("finetune", "train_speed", "runs", "dense"))
    lines = ["| fine-tune (on pydoc text unless @ft-…) | tokens | lr | wikitext2 before → after | gap closed | shakespeare before → "
             "after | gap closed | loss first → last | trainable params | optimizer state | peak RSS | train tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in ft.items():
        base = runs.get(f"welore|{r.get('mode')}|{r.get('budget')}") if r.get("kind") == "lrc" else dense
        cells = []
        for corpus in CORPORA:
            before, after, d = _ppl(base, corpus), r.get("ppl_after", {}).get(corpus), _ppl(dense, corpus)
            gap = (before - after) / (before - d) if r.get("kind") == "lrc" and None not in (before, after, d) else None
            cells += [f"{_f(before)} → **{_f(after)}**", _f(None if gap is None else 100 * gap, ".0f") + ("%" if gap is not None else "")]
        t = ts.get(name, {})
        lines.append(f"| {name} | {r['tokens']:,} | {r['lr']:g} | {' | '.join(cells)} | {r['first_loss']:.2f} → "
                     f"{r['last_loss']:.2f} | {r['trainable_params']:,} | {r['optimizer_state_bytes'] / MIB:.0f} MiB | "
                     f"{max(t.get('peak_memory_bytes', 0), r['peak_memory_bytes']) / MIB:,.0f} MiB | "
                     f"{t.get('tokens_per_s', r['tokens_per_s']):.0f} |")
    return lines


def variant(args: argparse.Namespace, mode: str | None, damping: float | None = None) -> str:
    """Run label of a mode: ``free``, or the data-aware setup (calibration source, size, ridge)."""
    if mode is None:
        return "free"
    return f"{mode}@{args.calib}-{args.calib_tokens // 1024}k-d{args.damping if damping is None else damping:g}"


def phase_report(args: argparse.Namespace, results: dict[str, Any]) -> str:
    primary = variant(args, "whiten")
    lines: list[str] = []
    cal = results.get("calib")
    if cal:
        lines += [f"Calibration statistics, {cal['tokens']:,} tokens of {cal['calib']}, {cal['layers']} layers: shared "
                  f"products {', '.join(f'{s:.0f}' for s in cal['shared_s'])} s, one product per layer "
                  f"{', '.join(f'{s:.0f}' for s in cal['per_layer_s'])} s; Grams equal to the per-layer ones: "
                  f"{cal['equal_to_per_layer']}/{cal['layers']}, equal between two passes: {cal['equal_rerun']}/"
                  f"{cal['layers']}.", ""]
    if results.get("runs"):
        lines += ppl_tables(args, results, primary)
        _plot(args, results, primary)
    if results.get("finetune"):
        lines += finetune_table(results) + [""]
    sp = results.get("speed", {})
    if sp:
        lines += ["| CPU inference (2 threads) | params | prefill tokens/s (1×512) | decode tokens/s (greedy, batch 1) |",
                  "|---|---|---|---|"]
        lines += [f"| {n} | {r['params']:,} | {r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} |"
                  for n, r in sp.items()]
    text = "\n".join(lines)
    (args.out / "table.md").write_text(text + "\n")
    print(text)
    return text


def _plot(args: argparse.Namespace, results: dict[str, Any], primary: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    styles = {("welore", "free"): "o-", ("uniform", "free"): "o--", ("welore", primary): "s-", ("uniform", primary): "s--",
              ("loss", primary): "^-"}
    names = {"welore": "WeLore", "uniform": "uniform", "loss": "loss"}
    for ax, corpus in zip(axes, CORPORA):
        for (method, mode), style in styles.items():
            pts = sorted((r["budget"], _ppl(r, corpus)) for r in results["runs"].values()
                         if r["method"] == method and r["mode"] == mode and _ppl(r, corpus) is not None)
            if pts:
                ax.plot([100 * b for b, _ in pts], [p for _, p in pts], style,
                        label=f"{names[method]} {'data-free' if mode == 'free' else 'data-aware'}")
        ax.axhline(_ppl(results["dense"], corpus), color="k", lw=0.8, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("% of targeted parameters removed")
        ax.set_ylabel(f"{corpus} perplexity (log)")
        ax.set_title(f"SmolLM2-135M-Instruct, {corpus}", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "welore_ppl_vs_budget.png")
    plt.close(fig)
