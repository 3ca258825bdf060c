"""Optimizer-step benchmark (issue 2): retained state, steady step time and refresh step time, side by side.

Methods measured: GaLore (arXiv 2403.03507), the SVD-free DCT projection (arXiv 2505.17967), Fira
(arXiv 2410.01623) and FRUGAL (arXiv 2411.07837) as gradlore presets, against `torch.optim.AdamW`
(for-loop and fused) and the peers' own packages `galore_torch.GaLoreAdamW` and `fira.FiraAdamW`.

What one projected step costs, for a gradient G (m×n, m ≤ n after orientation) and rank r:

    refresh (every `update_proj_gap` steps):  P ← top-r left singular vectors of G     (SVD, O(m²n))
                                              or top-r DCT columns by ‖Cᵀ G‖ per column (O(mn log n) / O(m²n))
    every step:                               R = Pᵀ G (r×n);  Adam on R;  W ← W − lr·scale·P·Adam(R)

Setting: GaLore's `llama_60m` shapes (`gradlore.models.SIZES`: hidden 512, intermediate 1376, 8 heads, 8 layers;
vocab 32000, untied head), rank 128 on every attention and MLP weight. Gradients are seeded random and fixed
(no forward/backward); only `optimizer.step()` is timed. Every optimizer is built by `gradlore.optim.build`.

Retained state is measured, not trusted (`gradlore.optim.state`): every tensor reachable from
`optimizer.state` is reduced to its *storage* and each storage is counted once with its full `nbytes`, so a
view that keeps a whole SVD factor alive is charged for the whole factor; gradlore's shared DCT bases
(`gradlore.projectors.DCT_BASES`, cleared before each method) are added.

Run: ``python -m gradlore.bench.optim`` or ``gradlore bench optim`` (``--help`` for the knobs).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from gradlore.errors import UserError, did_you_mean
from gradlore.models import build_llama
from gradlore.optim.build import PEERS, OptimConfig, build_optimizer
from gradlore.optim.presets import PRESETS
from gradlore.optim.state import retained_bytes, state_bytes, walk_tensors
from gradlore.projectors import DCT_BASES

MiB = 2**20


def nominal_moment_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Adam's two float32 moments at their nominal size: r×max(m, n) for a projected 2-D weight, else numel."""
    total = 0
    for g in optimizer.param_groups:
        rank = g.get("rank")
        for p in g["params"]:
            if rank and p.dim() == 2 and 0 < int(rank) < min(p.shape):
                total += 2 * int(rank) * max(p.shape) * 4
            else:
                total += 2 * p.numel() * 4
    return total


# ----------------------------------------------------------------------------------------------------------
# Setting
# ----------------------------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    model: str = "llama_60m"
    vocab: int = 32000
    rank: int = 128
    gap: int = 50  # update_proj_gap: refreshes at steps 0, gap, 2·gap, ... (0-based, before the increment)
    warmup: int = 2  # steps excluded from the steady median (allocation, first refresh)
    tail: int = 3  # steady steps measured after the timed refresh
    lr: float = 1e-3
    seed: int = 0
    threads: int = 2
    methods: list[str] | None = None  # None: all
    target_modules: str = "attn,mlp"  # GaLore's README convention, for every method


@dataclass
class Row:
    method: str
    state_bytes: int | None = None
    nominal_bytes: int | None = None
    reported_bytes: int | None = None  # gradlore's own `state_bytes`, for gradlore's optimizers
    shared_bytes: int = 0  # derived data shared across layers outside `optimizer.state` (gradlore's DCT bases)
    index_bytes: int = 0  # integer tensors (dim ≥ 1) in the state: projection indices
    first_s: float | None = None
    steady_s: float | None = None
    refresh_s: float | None = None
    state_kinds: str = ""
    error: str | None = None


Factory = Callable[[nn.Module, BenchConfig], torch.optim.Optimizer]


def _built(name: str) -> Factory:
    def make(model: nn.Module, cfg: BenchConfig) -> torch.optim.Optimizer:
        return build_optimizer(model, OptimConfig(name=name, lr=cfg.lr, rank=cfg.rank, update_proj_gap=cfg.gap,
                                                  target_modules=cfg.target_modules, grad_clip=0.0))

    return make


def method_table() -> dict[str, Factory]:
    """name -> factory(model, cfg) -> optimizer: torch's AdamW two ways, the peers, every gradlore preset."""
    table: dict[str, Factory] = {
        "adamw-forloop": lambda m, c: torch.optim.AdamW(m.parameters(), lr=c.lr, foreach=False),
        "adamw-fused": lambda m, c: torch.optim.AdamW(m.parameters(), lr=c.lr, fused=True),
    }
    table.update({name: _built(name) for name in PEERS})
    table.update({f"gradlore-{name}": _built(name) for name in PRESETS})
    return table


def _state_kinds(optimizer: torch.optim.Optimizer) -> str:
    """What the state of the projected weights is made of: 'float32 B, int64 B', to show indices vs matrices."""
    by_dtype: dict[str, int] = {}
    projected = {id(p) for g in optimizer.param_groups if g.get("rank") for p in g["params"]}
    for p, st in optimizer.state.items():
        if id(p) in projected:
            for t in walk_tensors(st):
                if t.dim():
                    kind = str(t.dtype).replace("torch.", "")
                    by_dtype[kind] = by_dtype.get(kind, 0) + t.untyped_storage().nbytes()
    return ", ".join(f"{k} {v / MiB:.1f}" for k, v in sorted(by_dtype.items()))


def _index_bytes(optimizer: torch.optim.Optimizer) -> int:
    ints = [t for t in walk_tensors(dict(optimizer.state)) if t.dim() >= 1 and not t.is_floating_point()]
    return retained_bytes(ints)


def run_method(name: str, factory: Factory, model: nn.Module, init: list[torch.Tensor], cfg: BenchConfig) -> Row:
    """Fresh weights, fixed seeded gradients, `gap + 1 + tail` timed steps of one optimizer."""
    row = Row(method=name)
    params = list(model.parameters())
    with torch.no_grad():
        for p, p0 in zip(params, init, strict=True):
            p.copy_(p0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-3 for p in params]
    DCT_BASES.clear()  # so the shared bases counted below are the ones this optimizer built
    try:
        opt = factory(model, cfg)
    except ImportError as exc:
        row.error = f"not installed ({exc.name})"
        return row
    except Exception as exc:  # one broken method must not hide the others
        row.error = f"{type(exc).__name__}: {exc}"
        return row
    times: list[float] = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(cfg.gap + 1 + cfg.tail):
            for p, g in zip(params, grads, strict=True):
                p.grad = g  # same tensor every step; no optimizer here writes into grads
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {exc}"
        return row
    finally:
        gc.enable()
    row.shared_bytes = DCT_BASES.nbytes() if name.startswith("gradlore-") else 0
    row.state_bytes = state_bytes(opt, include_shared=False) + row.shared_bytes
    row.index_bytes = _index_bytes(opt)
    row.nominal_bytes = nominal_moment_bytes(opt)
    row.reported_bytes = state_bytes(opt) if name.startswith("gradlore-") else None
    row.state_kinds = _state_kinds(opt)
    row.first_s = times[0]
    steady = times[cfg.warmup : cfg.gap] + times[cfg.gap + 1 :]
    row.steady_s = statistics.median(steady) if steady else None
    row.refresh_s = times[cfg.gap] if any(g.get("rank") for g in opt.param_groups) else None
    for p in params:
        p.grad = None
    del opt
    gc.collect()
    return row


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> list[Row]:
    torch.set_num_threads(cfg.threads)
    if cfg.gap <= cfg.warmup:
        raise UserError(f"--gap {cfg.gap} must exceed --warmup {cfg.warmup}: pass a larger --gap (e.g. 50)")
    table = method_table()
    names = list(table) if cfg.methods is None else cfg.methods
    for n in names:
        if n not in table:
            raise UserError(f"unknown method {n!r}.{did_you_mean(n, table)} Choose from {', '.join(table)}.")
    torch.manual_seed(cfg.seed)
    model = build_llama(cfg.model, cfg.vocab, 256)
    init = [p.detach().clone() for p in model.parameters()]
    rows = []
    for name in names:
        t0 = time.perf_counter()
        row = run_method(name, table[name], model, init, cfg)
        log(f"# {name}: done in {time.perf_counter() - t0:.1f}s" + (f" ({row.error})" if row.error else ""))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def _fmt(x: float | None, unit: float, nd: int) -> str:
    return "—" if x is None else f"{x / unit:,.{nd}f}"


def _ratio(x: float | None, ref: float | None) -> str:
    return "—" if x is None or not ref else f"{x / ref:.2f}×"


def format_table(rows: list[Row], reference: str = "galore-torch") -> str:
    """Markdown table; ratios are against `reference` (galore-torch)."""
    ref = next((r for r in rows if r.method == reference and r.error is None), None)
    head = (
        "| method | state MiB | vs galore-torch | beyond nominal moments MiB | of which indices / shared bases MiB "
        "| projected-weight state by dtype MiB "
        "| steady step ms | vs galore-torch | refresh step ms | vs galore-torch | first step ms | self-reported MiB |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.error:
            lines.append(f"| {r.method} | error: {r.error} |" + " |" * 10)
            continue
        extra = None if r.state_bytes is None or r.nominal_bytes is None else r.state_bytes - r.nominal_bytes
        lines.append(
            f"| {r.method} | {_fmt(r.state_bytes, MiB, 1)} | {_ratio(r.state_bytes, ref and ref.state_bytes)} "
            f"| {_fmt(extra, MiB, 2)} | {r.index_bytes / MiB:.3f} / {r.shared_bytes / MiB:.2f} | {r.state_kinds or '—'} "
            f"| {_fmt(r.steady_s, 1e-3, 1)} | {_ratio(r.steady_s, ref and ref.steady_s)} "
            f"| {_fmt(r.refresh_s, 1e-3, 0)} | {_ratio(r.refresh_s, ref and ref.refresh_s)} "
            f"| {_fmt(r.first_s, 1e-3, 0)} | {_fmt(r.reported_bytes, MiB, 1)} |"
        )
    return "\n".join(lines)


def check_targets(rows: list[Row]) -> list[str]:
    """Issue 2's targets, each as 'MET'/'MISSED' with the numbers."""
    by = {r.method: r for r in rows if r.error is None}
    ref = by.get("galore-torch")
    out: list[str] = []
    if ref is None:
        return ["galore-torch did not run: no ratios"]
    dct = by.get("gradlore-dct")
    if dct and dct.refresh_s and ref.refresh_s:
        ratio = dct.refresh_s / ref.refresh_s
        out.append(
            f"{'MET' if ratio <= 1 / 20 else 'MISSED'}: DCT refresh {dct.refresh_s * 1e3:.0f} ms = "
            f"1/{1 / ratio:.1f} of galore-torch's {ref.refresh_s * 1e3:.0f} ms (target ≤ 1/20)"
        )
    for name, r in by.items():
        if name.startswith("gradlore-") and r.steady_s and ref.steady_s:
            ratio = r.steady_s / ref.steady_s
            out.append(
                f"{'MET' if ratio <= 0.5 else 'MISSED'}: {name} steady step {r.steady_s * 1e3:.1f} ms = "
                f"{ratio:.2f}× galore-torch's {ref.steady_s * 1e3:.1f} ms (target ≤ 0.5×)"
            )
    if dct and dct.state_bytes is not None and dct.nominal_bytes is not None:
        extra = dct.state_bytes - dct.nominal_bytes
        # beyond the moments: indices, the shared bases, and 0-d step counters (a few bytes per tensor)
        rest = extra - dct.index_bytes - dct.shared_bytes
        ok = dct.index_bytes > 0 and abs(rest) < 64 * 1024
        out.append(
            f"{'MET' if ok else 'MISSED'}: DCT state beyond its nominal moments = {extra / MiB:.3f} MiB = "
            f"{dct.index_bytes / 1024:.1f} KiB integer indices + {dct.shared_bytes / MiB:.2f} MiB shared DCT bases "
            f"(one per distinct size, outside optimizer.state) + {rest} B other (scalars); "
            f"projected-weight state by dtype MiB: {dct.state_kinds}"
        )
        if ref.state_bytes:
            out.append(
                f"INFO: state gradlore-dct {dct.state_bytes / MiB:.1f} MiB vs galore-torch {ref.state_bytes / MiB:.1f} MiB "
                f"({dct.state_bytes / ref.state_bytes:.2f}×)"
            )
    return out


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="gradlore bench optim", description=__doc__.splitlines()[0])
    d = BenchConfig()
    p.add_argument("--model", default=d.model, help="model size (gradlore.models.SIZES), default llama_60m")
    p.add_argument("--vocab", type=int, default=d.vocab)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument(
        "--gap", type=int, default=d.gap, help="update_proj_gap; the step at index GAP is the timed refresh"
    )
    p.add_argument("--warmup", type=int, default=d.warmup, help="first steps left out of the steady median")
    p.add_argument("--tail", type=int, default=d.tail, help="steady steps after the refresh")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset, e.g. adamw-fused,galore-torch,gradlore-dct (default: all)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        model=args.model,
        vocab=args.vocab,
        rank=args.rank,
        gap=args.gap,
        warmup=args.warmup,
        tail=args.tail,
        threads=args.threads,
        seed=args.seed,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None,
    )


def main(argv: list[str] | None = None) -> int:
    """`gradlore bench optim [flags]`: run every method, print the table and the target checks."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        t0 = time.perf_counter()
        load0 = os.getloadavg()[0]
        rows = run_bench(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
        load1 = os.getloadavg()[0]
    except UserError as exc:
        print(f"gradlore bench optim: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{cfg.model} shapes, vocab={cfg.vocab}; rank {cfg.rank} on attn+mlp; update_proj_gap={cfg.gap}; torch {torch.__version__}, "
        f"{cfg.threads} threads; steady = median of steps {cfg.warmup}..{cfg.gap - 1} and "
        f"{cfg.gap + 1}..{cfg.gap + cfg.tail}; refresh = step {cfg.gap}; wall {time.perf_counter() - t0:.0f}s; "
        f"1-min load average {load0:.2f} before, {load1:.2f} after ({os.cpu_count()} CPUs)"
    )
    print()
    print(format_table(rows))
    print()
    for line in check_targets(rows):
        print(f"- {line}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n", encoding="utf-8")
    return 0 if all(r.error is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
