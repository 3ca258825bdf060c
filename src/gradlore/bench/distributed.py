"""``gradlore bench distributed``: what a projection refresh costs on several processes, side by side.

1. Bytes per refresh on the wire (all ranks together; ring/tree algorithms, ``gradlore.optim.distributed.
   wire_bytes``) for every projected weight of GaLore's ``llama_60m`` (rank 128) and ``llama_1b`` (rank 512)
   shapes, from ``refresh_bytes``: the same arithmetic as the optimizer's ``Comm.bytes`` counter (the tests
   check the two agree on a real 2-process run; part 2 prints the counter next to the formula). Methods:
     DCT on shards     each rank scores its columns, all-reduce of s float32 scores (``Context.comm``)
     SVD, all-gather   the gradient gathered to every rank on refresh steps, each computes P
     SVD, owner        the gradient gathered to one owner rank, which broadcasts P (s·r)
   (under DDP a DCT refresh moves nothing, an SVD refresh with owners broadcasts P)
     randomized range finder (documented, not implemented): with G split along l, Y = Σ_k G_k Ω_k and each of
       q power iterations need an (s, k) all-reduce, k = r + 10, plus B Bᵀ (k, k): (q+1)·s·k + k² floats.
   Weights FSDP2 cannot split along l (dim 1 not divisible by N: LLaMA-1B's down_proj, 2048×5461) train in
   the ``rows`` layout and gather their gradient every step, whatever the projector: shown apart.
2. Optimizer step time on a refresh step and on a steady step, ``llama_60m`` shapes (seeded gradients, no
   forward/backward), with 1 process (1 and 2 threads) and 2 processes of 1 thread: DDP (every rank
   refreshes every weight, or, for SVD, one owner per weight and a broadcast) and FSDP2 (DCT on shards; SVD
   gathered to all or to an owner). A step's time is the slowest rank's; its time in collectives is rank 0's.
3. ``--train``: the ``tiny`` preset (refreshes at steps 0, 10, 20) trained by 1 process, DDP and FSDP2 on
   2 processes: per-step losses against the single process, and the median step time.

Results are kept in ``--out``/results.json and reused (run it in pieces; ``--no-reuse`` to redo).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gradlore.models import SIZES
from gradlore.optim.distributed import Comm, attach, long_side_placement, wire_bytes
from gradlore.optim.lowrank_adamw import LowRankAdamW
from gradlore.train import trainer
from gradlore.train.presets import resolve
from gradlore.train.rundir import read_losses

SIZES_RANK = {"llama_60m": 128, "llama_1b": 512}  # GaLore's ranks for these sizes


# ------------------------------------------------------------------------------------------ bytes
def refresh_bytes(shape: tuple[int, int], rank: int, projector: str, world: int, mode: str, owner: bool,
                  itemsize: int = 4) -> dict[str, int]:
    """Wire bytes one weight of ``shape`` costs: ``refresh.*`` per refresh, ``step.*`` per step (the rows
    fallback's gather), under ``mode`` fsdp2 (sharded along l where FSDP2 allows) or ddp."""
    m, n = shape
    s, l = min(m, n), max(m, n)
    layout = "whole" if mode == "ddp" else "cols" if (m >= n or n % world == 0) else "rows"
    out: dict[str, int] = {}

    def add(key: str, kind: str, nbytes: int) -> None:
        out[key] = out.get(key, 0) + wire_bytes(kind, nbytes, world)

    if layout == "rows":
        add("step.all_gather", "all_gather", m * n * itemsize)
    if projector in ("dct", "columns"):  # scored where the columns are: all-reduce of float32 scores
        if layout == "cols":
            add("refresh.all_reduce", "all_reduce", s * 4)
    elif projector == "svd":  # needs the whole gradient
        if owner:
            if layout == "cols":
                add("refresh.gather", "gather", s * l * itemsize)
            add("refresh.broadcast", "broadcast", s * rank * itemsize)
        elif layout == "cols":
            add("refresh.all_gather", "all_gather", s * l * itemsize)
    return out


def model_shapes(size: str) -> list[tuple[str, tuple[int, int]]]:
    """The projected weights of one of GaLore's LLaMA sizes: per layer q, k, v, o, gate, up, down."""
    c = SIZES[size]
    h, i = c.hidden, c.intermediate
    per_layer = [("q", (h, h)), ("k", (h, h)), ("v", (h, h)), ("o", (h, h)), ("gate", (i, h)), ("up", (i, h)),
                 ("down", (h, i))]
    return [(f"{k}{layer}", shape) for layer in range(c.layers) for k, shape in per_layer]


def rrf_bytes(s: int, rank: int, world: int, q: int = 2, oversample: int = 10) -> int:
    k = rank + oversample
    return (q + 1) * wire_bytes("all_reduce", s * k * 4, world) + wire_bytes("all_reduce", k * k * 4, world)


def bytes_table(size: str, world: int) -> tuple[list[dict], dict]:
    rank = SIZES_RANK[size]
    shapes = model_shapes(size)
    methods = {"DCT on shards": ("dct", True), "SVD, all-gather": ("svd", False), "SVD, owner": ("svd", True)}
    rows, totals = [], {}
    for label, (projector, owner) in methods.items():
        refresh = step = 0
        for _, shape in shapes:
            b = refresh_bytes(shape, rank, projector, world, "fsdp2", owner)
            refresh += sum(v for k, v in b.items() if k.startswith("refresh"))
            step += sum(v for k, v in b.items() if k.startswith("step"))
        totals[label] = refresh
        rows.append({"method": label, "refresh_bytes": refresh, "step_bytes": step})
    rows_layout = [name for name, (m, n) in shapes if m < n and n % world]
    # the randomized range finder would replace the gather of the weights split along l (the rows fallback gathers
    # its gradient every step anyway)
    rrf = sum(rrf_bytes(min(sh), rank, world) for name, sh in shapes if name not in rows_layout)
    rows.append({"method": "randomized range finder (not implemented)", "refresh_bytes": rrf, "step_bytes": step})
    c = SIZES[size]
    params = c.layers * (4 * c.hidden**2 + 3 * c.hidden * c.intermediate)
    info = {"size": size, "rank": rank, "world": world, "weights": len(shapes), "rows_fallback": len(rows_layout),
            "projected_params": params,
            "fsdp_step_bytes": 3 * wire_bytes("all_gather", params * 4, world),  # 2 param all-gathers + 1 reduce-scatter
            "ratio_dct_svd": totals["DCT on shards"] / totals["SVD, all-gather"]}
    return rows, info


# ------------------------------------------------------------------------------------------ processes
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world: int, port: int, threads: int, fn: Any, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS=str(threads))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo")
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn: Any, *args: Any, world: int = 2, threads: int = 1) -> None:
    """``fn(rank, world, *args)`` in ``world`` local processes joined by a gloo group (torchrun's environment)."""
    import torch.multiprocessing as mp

    mp.start_processes(_entry, args=(world, _free_port(), threads, fn, args), nprocs=world, join=True,
                       start_method="spawn")


def _time_worker(rank: int, world: int, mode: str, projector: str, owner: bool, repeats: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor

    gen = torch.Generator().manual_seed(0)
    shapes = model_shapes("llama_60m")
    weights = {name: torch.randn(shape, generator=gen) * 0.02 for name, shape in shapes}
    grads = {name: torch.randn(shape, generator=gen) for name, shape in shapes}
    comm = None
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        place = long_side_placement(list(weights.items()), world)
        params = {k: torch.nn.Parameter(distribute_tensor(v, mesh, [place(v) or Shard(0)])) for k, v in weights.items()}
        grads = {k: distribute_tensor(g, mesh, params[k].placements) for k, g in grads.items()}
        comm = Comm(mesh.get_group(), owner)
    else:
        params = {k: torch.nn.Parameter(v) for k, v in weights.items()}
        comm = Comm(None, owner) if world > 1 else None
    group = {"params": list(params.values()), "param_names": list(params), "rank": SIZES_RANK["llama_60m"],
             "projector": projector, "update_proj_gap": 2}
    opt = LowRankAdamW([group], lr=1e-3)
    attach(opt, comm)
    times: dict[str, list[float]] = {"refresh": [], "steady": [], "comm": []}
    for step in range(2 * repeats + 2):
        for k, p in params.items():
            p.grad = grads[k]
        dist.barrier()
        in_comm = sum(comm.seconds.values()) if comm else 0.0
        t0 = time.perf_counter()
        opt.step()
        # the step ends when the slowest rank is done; its time in collectives: rank 0's
        elapsed = torch.tensor([time.perf_counter() - t0, (sum(comm.seconds.values()) if comm else 0.0) - in_comm])
        dist.all_reduce(elapsed[:1], op=dist.ReduceOp.MAX)
        if step >= 1:
            times["refresh" if step % 2 == 0 else "steady"].append(float(elapsed[0]))
            if step % 2 == 0:
                times["comm"].append(float(elapsed[1]))
    if rank == 0:
        refreshes = repeats + 1
        measured = {k: v // refreshes for k, v in (comm.bytes if comm else {}).items() if k.startswith("refresh")}
        Path(out).write_text(json.dumps({"refresh_s": statistics.median(times["refresh"]),
                                         "steady_s": statistics.median(times["steady"]),
                                         "comm_s": statistics.median(times["comm"]), "bytes": measured}))


def _train_worker(rank: int, world: int, mode: str, folder: str) -> None:
    threads = 2 if mode == "none" else 1  # the whole machine (2 cores) either way
    cfg = resolve("tiny", [f"train.parallel={mode}", "train.save_final_model=false", "train.eval_every=100",
                           f"train.threads={threads}"])
    trainer.run(cfg, Path(folder) / mode, overwrite=True)


# ------------------------------------------------------------------------------------------ report
def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return ""


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--parts", default="bytes,time,train", help="comma-separated: bytes, time, train")
    p.add_argument("--projectors", default="dct,svd", help="for the timing part")
    p.add_argument("--repeats", type=int, default=3, help="refresh steps timed per setting (median)")
    p.add_argument("--world", type=int, default=2, help="processes of the multi-process settings")
    p.add_argument("--out", default="runs/bench-distributed")
    p.add_argument("--no-reuse", dest="reuse", action="store_false", help="redo finished settings")
    return p


def _cached(results: dict, key: str, path: Path, reuse: bool, compute: Any) -> Any:
    if not (reuse and key in results):
        print(f"  running {key} ...", flush=True)
        results[key] = compute()
        path.write_text(json.dumps(results, indent=1) + "\n")
    return results[key]


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    parts = {p.strip() for p in args.parts.split(",")}
    report = [f"Command: `gradlore bench distributed {' '.join(sys.argv[sys.argv.index('distributed') + 1:]) if 'distributed' in sys.argv else ''}`\n"]
    if "bytes" in parts:
        for size in SIZES_RANK:
            for world in (args.world, 8):
                rows, info = bytes_table(size, world)
                report.append(f"\n{size} (rank {info['rank']}, {info['weights']} projected weights, "
                              f"{info['projected_params'] / 1e6:.0f} M parameters), {world} ranks, float32 gradients: "
                              f"bytes on the wire per refresh, all ranks together ({info['rows_fallback']} weights in "
                              "the rows fallback, whose gradient is gathered every step)\n")
                report.append("| method | per refresh | per step (rows fallback) |\n|---|---:|---:|")
                for r in rows:
                    report.append(f"| {r['method']} | {_fmt_bytes(r['refresh_bytes'])} | {_fmt_bytes(r['step_bytes'])} |")
                report.append(f"\nDCT on shards / SVD all-gather = 1/{1 / info['ratio_dct_svd']:.0f}; for scale, FSDP2 "
                              f"itself moves {_fmt_bytes(info['fsdp_step_bytes'])} per step for these weights.")
    if "time" in parts:
        settings = [("1 process, 1 thread", "single", 1, 1, True), ("1 process, 2 threads", "single", 1, 2, True),
                    ("DDP, every rank refreshes", "ddp", args.world, 1, False),
                    ("DDP, owner refresh", "ddp", args.world, 1, True),
                    ("FSDP2, gather to all", "fsdp2", args.world, 1, False),
                    ("FSDP2, owner refresh", "fsdp2", args.world, 1, True)]
        report.append(f"\nOptimizer step on llama_60m shapes (56 weights, rank 128), median of {args.repeats}; "
                      f"{args.world}-process settings use 1 thread each\n")
        report.append("| projector | setting | refresh step (s) | of which in collectives (s) | steady step (s) | "
                      "refresh bytes (measured) |\n|---|---|---:|---:|---:|---:|")
        for projector in [p.strip() for p in args.projectors.split(",")]:
            for label, mode, world, threads, owner in settings:
                if projector == "dct" and mode != "single" and owner:
                    continue  # no owner for DCT: on shards (FSDP2) or computed by every rank (DDP)
                key = f"time/{projector}/{label}/{args.repeats}"

                def compute(mode=mode, world=world, threads=threads, owner=owner, projector=projector) -> dict:
                    with tempfile.TemporaryDirectory() as tmp:
                        spawn(_time_worker, "ddp" if mode == "single" else mode, projector, owner, args.repeats,
                              f"{tmp}/r.json", world=world, threads=threads)
                        return json.loads(Path(f"{tmp}/r.json").read_text())

                r = _cached(results, key, path, args.reuse, compute)
                shown = "FSDP2, DCT on shards" if projector == "dct" and mode == "fsdp2" else label
                report.append(f"| {projector} | {shown} | {r['refresh_s']:.3f} | {r.get('comm_s', 0):.3f} | "
                              f"{r['steady_s']:.3f} | {_fmt_bytes(sum(r['bytes'].values()))} |")
    if "train" in parts:
        def compute_train() -> dict:
            folder = out / "train"
            res = {}
            spawn(_train_worker, "none", str(folder), world=1, threads=2)
            for mode in ("ddp", "fsdp2"):
                spawn(_train_worker, mode, str(folder), world=args.world, threads=1)
            for mode in ("none", "ddp", "fsdp2"):
                summary = json.loads((folder / mode / "summary.json").read_text())
                res[mode] = {"losses": [v for _, v in read_losses(folder / mode / "metrics.jsonl")[0]],
                             "median_s": summary["tokens_per_s_median"]}
            return res

        r = _cached(results, f"train/{args.world}", path, args.reuse, compute_train)
        base = r["none"]["losses"]
        report.append("\n`tiny` preset, 30 steps, DCT rank 16, refreshes at steps 0, 10, 20, global batch 4×64\n")
        report.append("| run | max relative loss difference to 1 process | median tokens/s |\n|---|---:|---:|")
        for mode, label in (("none", "1 process, 2 threads"), ("ddp", f"DDP, {args.world}×1 thread"),
                            ("fsdp2", f"FSDP2, {args.world}×1 thread")):
            diff = max(abs(a - b) / abs(b) for a, b in zip(r[mode]["losses"], base))
            report.append(f"| {label} | {diff:.1e} | {r[mode]['median_s']:.0f} |")
    text = "\n".join(report) + "\n"
    (out / "results.md").write_text(text)
    print(text)
    return 0
