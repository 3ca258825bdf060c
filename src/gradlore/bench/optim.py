"""Optimizer-step benchmark (issue 2): retained state, steady step time and refresh step time, side by side.

Methods measured: GaLore (arXiv 2403.03507), the SVD-free DCT projection (arXiv 2505.17967), Fira
(arXiv 2410.01623) and FRUGAL (arXiv 2411.07837) as gradlore presets, against `torch.optim.AdamW`
(for-loop and fused) and the peers' own packages `galore_torch.GaLoreAdamW` and `fira.FiraAdamW`.

What one projected step costs, for a gradient G (m×n, m ≤ n after orientation) and rank r:

    refresh (every `update_proj_gap` steps):  P ← top-r left singular vectors of G     (SVD, O(m²n))
                                              or top-r DCT columns by ‖Cᵀ G‖ per column (O(mn log n) / O(m²n))
    every step:                               R = Pᵀ G (r×n);  Adam on R;  W ← W − lr·scale·P·Adam(R)

Setting: GaLore's `llama_60m` shapes (HF `LlamaConfig`: hidden 512, intermediate 1376, 8 heads, 8 layers,
vocab 32000, untied head), rank 128 on every attention and MLP weight. Gradients are seeded random and fixed
(no forward/backward); only `optimizer.step()` is timed.

Retained state is measured, not trusted: every tensor reachable from `optimizer.state` (walking dicts, lists
and Python objects' attributes, since the peers keep projector objects in state) is reduced to its *storage*
and each storage is counted once with its full `nbytes`, so a view that keeps a whole SVD factor alive is
charged for the whole factor.

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
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from gradlore.errors import UserError

MiB = 2**20


# ----------------------------------------------------------------------------------------------------------
# Retained-state accounting
# ----------------------------------------------------------------------------------------------------------
def _walk_tensors(obj: object, seen: set[int], out: list[torch.Tensor], depth: int = 0) -> None:
    """Collect every tensor reachable from `obj` (containers and plain objects' attributes)."""
    if depth > 12 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        out.append(obj)
        return
    if isinstance(obj, (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.device)):
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _walk_tensors(k, seen, out, depth + 1)
            _walk_tensors(v, seen, out, depth + 1)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _walk_tensors(v, seen, out, depth + 1)
        return
    if isinstance(obj, (nn.Module, torch.optim.Optimizer)) or callable(obj):
        return  # a model or optimizer reachable from state is not state; functions hold no tensors we own
    attrs = getattr(obj, "__dict__", None)
    if attrs is not None:
        _walk_tensors(attrs, seen, out, depth + 1)
    for slot in getattr(type(obj), "__slots__", ()):
        if hasattr(obj, slot):
            _walk_tensors(getattr(obj, slot), seen, out, depth + 1)


def _storage_key(t: torch.Tensor) -> tuple[str, int, int]:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr(), s.nbytes())


def retained_bytes(state: object, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the unique storages reachable from `state`, each counted in full (views included).

    `exclude`: tensors whose storages are not state (parameters and their gradients)."""
    excluded = {_storage_key(t) for t in exclude if t is not None}
    tensors: list[torch.Tensor] = []
    _walk_tensors(state, set(), tensors)
    storages: dict[tuple[str, int, int], int] = {}
    for t in tensors:
        if t.device.type == "meta":
            continue
        key = _storage_key(t)
        if key in excluded:
            continue
        storages[key] = key[2]
    return sum(storages.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes really retained by `optimizer.state` (parameters and gradients not counted)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = [p.grad for p in params if p.grad is not None]
    return retained_bytes(dict(optimizer.state), exclude=params + grads)


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
    hidden: int = 512
    intermediate: int = 1376
    heads: int = 8
    layers: int = 8
    vocab: int = 32000
    rank: int = 128
    gap: int = 50  # update_proj_gap: refreshes at steps 0, gap, 2·gap, ... (0-based, before the increment)
    warmup: int = 2  # steps excluded from the steady median (allocation, first refresh)
    tail: int = 3  # steady steps measured after the timed refresh
    lr: float = 1e-3
    scale: float = 0.25
    seed: int = 0
    threads: int = 2
    methods: list[str] | None = None  # None: all
    target_modules: list[str] = field(default_factory=lambda: ["attn", "mlp"])


@dataclass
class Row:
    method: str
    state_bytes: int | None = None
    nominal_bytes: int | None = None
    reported_bytes: int | None = None  # the optimizer's own `state_bytes`, when it has one
    # derived data shared across layers outside `optimizer.state` (gradlore's DCT bases)
    shared_bytes: int = 0
    index_bytes: int = 0  # integer tensors (dim ≥ 1) in the state: projection indices
    first_s: float | None = None
    steady_s: float | None = None
    refresh_s: float | None = None
    state_kinds: str = ""
    error: str | None = None


def build_model(cfg: BenchConfig) -> nn.Module:
    """A randomly initialised HF LLaMA with GaLore's shapes (no data, no hub)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        num_hidden_layers=cfg.layers,
        vocab_size=cfg.vocab,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _peer_groups(model: nn.Module, cfg: BenchConfig, scale_key: str) -> list[dict]:
    """GaLore/Fira README convention: Linear weights whose module name contains "attn" or "mlp" are projected."""
    projected = [
        m.weight
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and any(k in name for k in cfg.target_modules)
    ]
    ids = {id(p) for p in projected}
    regular = [p for p in model.parameters() if id(p) not in ids]
    return [
        {"params": regular},
        {
            "params": projected,
            "rank": cfg.rank,
            "update_proj_gap": cfg.gap,
            scale_key: cfg.scale,
            "proj_type": "std",
        },
    ]


Factory = Callable[[nn.Module, BenchConfig], torch.optim.Optimizer]


def method_table() -> dict[str, Factory]:
    """name -> factory(model, cfg) -> optimizer. Every gradlore preset is included."""

    def adamw_loop(model: nn.Module, cfg: BenchConfig) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, foreach=False)

    def adamw_fused(model: nn.Module, cfg: BenchConfig) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, fused=True)

    def galore_torch(model: nn.Module, cfg: BenchConfig) -> torch.optim.Optimizer:
        from galore_torch import GaLoreAdamW

        return GaLoreAdamW(_peer_groups(model, cfg, "scale"), lr=cfg.lr, no_deprecation_warning=True)

    def fira(model: nn.Module, cfg: BenchConfig) -> torch.optim.Optimizer:
        from fira import FiraAdamW

        return FiraAdamW(_peer_groups(model, cfg, "alpha"), lr=cfg.lr, no_deprecation_warning=True)

    table: dict[str, Factory] = {
        "adamw-forloop": adamw_loop,
        "adamw-fused": adamw_fused,
        "galore-torch": galore_torch,
        "fira": fira,
    }
    try:
        from gradlore.presets import PRESETS
    except ImportError:  # the optimizer is not importable: the peers still run
        PRESETS = {}

    def preset_factory(name: str) -> Factory:
        def make(model: nn.Module, cfg: BenchConfig) -> torch.optim.Optimizer:
            import gradlore

            groups = gradlore.param_groups(
                model, method=name, rank=cfg.rank, target_modules=cfg.target_modules, update_proj_gap=cfg.gap
            )
            return gradlore.LowRankAdamW(groups, lr=cfg.lr)

        return make

    for name in PRESETS:
        table[f"gradlore-{name}"] = preset_factory(name)
    return table


def _state_kinds(optimizer: torch.optim.Optimizer) -> str:
    """What the state of the projected weights is made of: 'float32 B, int64 B', to show indices vs matrices."""
    by_dtype: dict[str, int] = {}
    projected = {id(p) for g in optimizer.param_groups if g.get("rank") for p in g["params"]}
    for p, st in optimizer.state.items():
        if id(p) not in projected:
            continue
        tensors: list[torch.Tensor] = []
        _walk_tensors(st, set(), tensors)
        for t in tensors:
            if t.dim() == 0:
                continue
            kind = str(t.dtype).replace("torch.", "")
            by_dtype[kind] = by_dtype.get(kind, 0) + t.untyped_storage().nbytes()
    return ", ".join(f"{k} {v / MiB:.1f}" for k, v in sorted(by_dtype.items()))


def _dct_cache() -> dict | None:
    """gradlore's module-level cache of shared DCT bases (derived data kept outside `optimizer.state`)."""
    try:
        from gradlore.projectors import dct
    except ImportError:
        return None
    cache = getattr(dct, "_BASES", None)
    return cache if isinstance(cache, dict) else None


def _index_bytes(optimizer: torch.optim.Optimizer) -> int:
    tensors: list[torch.Tensor] = []
    _walk_tensors(dict(optimizer.state), set(), tensors)
    storages = {
        _storage_key(t): t.untyped_storage().nbytes()
        for t in tensors
        if t.dim() >= 1 and not t.is_floating_point() and not t.is_complex()
    }
    return sum(storages.values())


def run_method(
    name: str, factory: Factory, model: nn.Module, init: list[torch.Tensor], cfg: BenchConfig
) -> Row:
    """Fresh weights, fixed seeded gradients, `gap + 1 + tail` timed steps of one optimizer."""
    row = Row(method=name)
    params = list(model.parameters())
    with torch.no_grad():
        for p, p0 in zip(params, init, strict=True):
            p.copy_(p0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-3 for p in params]
    dct_cache = _dct_cache()
    if dct_cache is not None:
        dct_cache.clear()  # so the shared bases counted below are the ones this optimizer built
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
    if dct_cache is not None and name.startswith("gradlore-"):
        row.shared_bytes = sum(t.untyped_storage().nbytes() for t in dct_cache.values())
    row.state_bytes = optimizer_state_bytes(opt) + row.shared_bytes
    row.index_bytes = _index_bytes(opt)
    row.nominal_bytes = nominal_moment_bytes(opt)
    if name.startswith("gradlore-"):
        try:
            from gradlore.optim import state_bytes as reported
        except ImportError:
            reported = None
        if reported is not None:
            row.reported_bytes = int(reported(opt))
    row.state_kinds = _state_kinds(opt)
    row.first_s = times[0]
    steady = times[cfg.warmup : cfg.gap] + times[cfg.gap + 1 :]
    row.steady_s = statistics.median(steady) if steady else None
    is_projected = any(g.get("rank") for g in opt.param_groups)
    row.refresh_s = times[cfg.gap] if is_projected else None
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
    unknown = [n for n in names if n not in table]
    if unknown:
        raise UserError(f"unknown method(s) {unknown}; choose from {sorted(table)}")
    model = build_model(cfg)
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


def build_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="gradlore bench optim", description=__doc__.splitlines()[0])
    d = BenchConfig()
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--intermediate", type=int, default=d.intermediate)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--layers", type=int, default=d.layers)
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
        hidden=args.hidden,
        intermediate=args.intermediate,
        heads=args.heads,
        layers=args.layers,
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
    args = build_arg_parser().parse_args(argv)
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
        f"llama shapes hidden={cfg.hidden} intermediate={cfg.intermediate} heads={cfg.heads} layers={cfg.layers} "
        f"vocab={cfg.vocab}; rank {cfg.rank} on attn+mlp; update_proj_gap={cfg.gap}; torch {torch.__version__}, "
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
