"""``gradlore bench memory``: peak memory of real training processes, each alone, side by side.

Every configuration is one ``gradlore train`` process; its peak RSS is the kernel's (``ru_maxrss`` from
``wait4`` on that child), cross-checked with the process's own figure and its breakdown in ``summary.json``
(runtime, parameters, gradients alive at the peak, optimizer state, activations and the rest;
``gradlore.train.memory``). Sections:

- ``60m``: GaLore's LLaMA-60M shapes (vocab 32000), micro-batch 32×256, bf16 autocast: AdamW, AdamW with the
  same activation features (chunked loss, checkpointing, allocator), galore-torch, APOLLO, and gradlore's DCT
  with the memory parts added one by one up to ``--memory low``; Q-GaLore's preset with ``--memory low``.
  Targets: ``--memory low`` ≤ 0.30× AdamW's peak and ≤ 0.70× the peak of AdamW with the same activation features.
- ``1b``: GaLore's LLaMA-1B shapes, micro-batch 1×256, a few steps: ``--memory low`` must train with peak RSS
  ≤ 8 GiB; fp32 AdamW runs under the same limit (an RSS watchdog that kills the process at the limit, and an
  address-space limit as a backstop) and does not fit. Model-state bytes per parameter (parameters +
  gradients alive at the peak + optimizer state): ≤ 3.0 for gradlore.
- ``quality``: the pretraining benchmark's setting (BENCHMARKS.md, issue 3: small LLaMA, tiny-shakespeare,
  300 steps of 4×256, DCT rank 64 at LR 3e-3): ``--memory low`` within 2% of the fp32-weight, 32-bit-state
  validation perplexity of the same optimizer.

A finished run (the same command) is reused, so the benchmark can be run in pieces (``--sections``,
``--only``); every figure printed comes from the runs' own files.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gradlore.errors import UserError

MiB, GiB = 2**20, 2**30

COMMON_60M = ["--preset", "galore_60m", "--set", "data.streaming=false", "--set", "data.val_split=",
              "--set", "train.batch_size=32", "--set", "train.grad_accum=1", "--set", "train.eval_batches=1",
              "--set", "train.save_final_model=false"]
ACT = ["--set", "memory.chunked_loss=1024", "--set", "memory.checkpointing=true", "--set", "memory.release_freed=true"]
LAYERWISE = ["--set", "optim.layerwise=true", "--set", "optim.grad_clip=0"]
# The DCT rows run dct-galore (gap 200, moments kept on refresh): the optimizer of the default run and of the
# issue's first table, whose projected moments can be 8-bit too. (The published ``dct`` moves its moment rows on
# every refresh, which needs fp32 rows: under --memory low its projected moments stay fp32, r×l, small.)
STATES8 = ["--set", "optim.state=8bit", "--set", "optim.plain_state=8bit"]

# (name, train arguments); the DCT rows add one part each
CONFIGS_60M: list[tuple[str, list[str]]] = [
    ("adamw", ["--optimizer", "adamw"]),
    ("adamw + activation features", ["--optimizer", "adamw", *ACT]),
    ("galore-torch", ["--optimizer", "galore-torch"]),
    ("apollo", ["--optimizer", "apollo"]),
    ("dct-galore", ["--optimizer", "dct-galore"]),
    ("dct-galore + allocator", ["--optimizer", "dct-galore", "--set", "memory.release_freed=true"]),
    ("dct-galore + chunked loss", ["--optimizer", "dct-galore", "--set", "memory.release_freed=true",
                            "--set", "memory.chunked_loss=1024"]),
    ("dct-galore + checkpointing", ["--optimizer", "dct-galore", *ACT]),
    ("dct-galore + layer-wise", ["--optimizer", "dct-galore", *ACT, *LAYERWISE]),
    ("dct-galore + 8-bit states", ["--optimizer", "dct-galore", *ACT, *LAYERWISE, *STATES8]),
    ("dct-galore --memory low (+ bf16 weights)", ["--optimizer", "dct-galore", "--memory", "low"]),
    ("dct-galore --memory low, factored embeddings/head", ["--optimizer", "dct-galore", "--memory", "low",
                                                    "--set", "optim.plain_state=factored"]),
    ("q_galore --memory low", ["--optimizer", "q_galore", "--memory", "low"]),
]
COMMON_1B = ["--preset", "galore_1b", "--set", "data.streaming=false", "--set", "data.val_split=",
             "--set", "train.batch_size=1", "--set", "train.grad_accum=1", "--set", "train.eval_batches=1",
             "--set", "train.save_final_model=false", "--set", "train.ckpt_every=1000000"]
CONFIGS_1B: list[tuple[str, list[str]]] = [
    ("dct-galore --memory low", ["--optimizer", "dct-galore", "--memory", "low"]),
    ("adamw (fp32)", ["--optimizer", "adamw"]),
]
COMMON_QUALITY = ["--preset", "default", "--model", "small", "--optimizer", "dct-galore", "--lr", "3e-3", "--rank", "64",
                  "--steps", "300", "--seed", "0", "--set", "data.vocab_size=4096", "--set", "data.block_size=256",
                  "--set", "train.batch_size=4", "--set", "train.eval_every=100", "--set", "train.eval_batches=0",
                  "--set", "train.ckpt_every=300", "--set", "train.save_final_model=false",
                  "--set", "optim.update_proj_gap=50", "--set", "schedule.warmup_steps=-1"]
CONFIGS_QUALITY: list[tuple[str, list[str]]] = [
    ("dct-galore fp32 (clip 1.0; the pretraining benchmark's run)", ["--set", "optim.grad_clip=1.0"]),
    ("dct-galore fp32, layer-wise (no clipping)", LAYERWISE),
    ("dct-galore --memory low (layer-wise, no clipping)", ["--memory", "low"]),
    ("dct-galore --memory low, not layer-wise (clip 1.0)", ["--memory", "low", "--set", "optim.layerwise=false",
                                                     "--set", "optim.grad_clip=1.0"]),
]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


class Watchdog(threading.Thread):
    """Polls a process's resident set; kills it when it exceeds ``limit`` bytes (0: never)."""

    def __init__(self, pid: int, limit: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.limit, self.killed_at, self.vm_peak = pid, limit, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
            except OSError:
                return
            fields = {line.split(":")[0]: line.split(":")[1] for line in status.splitlines() if ":" in line}
            rss = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
            self.vm_peak = max(self.vm_peak, int(fields.get("VmPeak", "0 kB").split()[0]) * 1024)
            if self.limit and rss > self.limit and not self.killed_at:
                self.killed_at = rss
                os.kill(self.pid, 9)


def run_one(args: argparse.Namespace, section: str, name: str, train_args: list[str],
            limit: int = 0, as_limit: int = 0) -> dict[str, Any]:
    out = Path(args.out) / section / _slug(name)
    cmd = ["train", *train_args, "--data", args.data if section != "quality" else args.quality_data,
           "--set", f"train.threads={args.threads}", "--set", "train.progress=false", "--out", str(out), "--overwrite"]
    key = json.dumps({"cmd": cmd, "limit": limit, "as_limit": as_limit})
    record_path = out.parent / f"{out.name}.json"
    if args.reuse and record_path.exists() and json.loads(record_path.read_text()).get("key") == key:
        record = json.loads(record_path.read_text())
        print(f"  reused  {name}", flush=True)
        return record
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}

    def limits() -> None:
        if as_limit:
            resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))

    t0 = time.time()
    log = open(out.parent / f"{out.name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gradlore.cli", *cmd], stdout=log, stderr=subprocess.STDOUT,
                            env=env, preexec_fn=limits)
    dog = Watchdog(proc.pid, limit)
    dog.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    dog.stop.set()
    log.close()
    record: dict[str, Any] = {
        "key": key, "name": name, "section": section, "command": "gradlore " + " ".join(cmd),
        "exit": proc.returncode, "wall_seconds": time.time() - t0, "peak_rss_bytes": usage.ru_maxrss * 1024,
        "vm_peak_bytes": dog.vm_peak, "killed_at_rss_bytes": dog.killed_at, "rss_limit_bytes": limit,
        "as_limit_bytes": as_limit,
    }
    summary_path = out / "summary.json"
    if summary_path.exists() and proc.returncode == 0:
        record["summary"] = json.loads(summary_path.read_text())
    else:
        record["log_tail"] = (out.parent / f"{out.name}.log").read_text()[-1500:]
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"  ran     {name}: exit {proc.returncode}, peak RSS {record['peak_rss_bytes'] / MiB:,.0f} MiB, "
          f"{record['wall_seconds']:.0f} s", flush=True)
    return record


def _mib(x: float) -> str:
    return f"{x / MiB:,.0f}"


def _row(r: dict[str, Any], base: dict[str, float]) -> str:
    s = r.get("summary")
    ratios = "".join(f" {r['peak_rss_bytes'] / b:.2f}× |" if b else " – |" for b in base.values())
    if s is None:
        why = (f"killed at RSS {_mib(r['killed_at_rss_bytes'])} MiB (limit {_mib(r['rss_limit_bytes'])})"
               if r["killed_at_rss_bytes"] else f"failed (exit {r['exit']})")
        return f"| {r['name']} | {_mib(r['peak_rss_bytes'])} |{ratios} {why} | | | | | | |"
    m = s["memory"]
    b = m["breakdown_bytes"]
    steps = max(s["steps"], 1)
    return (f"| {r['name']} | {_mib(r['peak_rss_bytes'])} |{ratios} {_mib(b['runtime'])} | {_mib(b['parameters'])} | "
            f"{_mib(b['gradients'])} | {_mib(b['optimizer_state'])} | {_mib(b['activations_and_other'])} | "
            f"{m['model_state_bytes_per_param']:.2f} | {s['train_seconds'] / steps:.1f} |")


def table(records: list[dict[str, Any]], base: dict[str, float]) -> str:
    head = ("| config | peak RSS MiB | " + "".join(f"vs {k} | " for k in base) + "runtime | parameters | "
            "gradients at peak | optimizer state | activations + other | model state B/param | s/step |")
    sep = "|---" * (2 + len(base) + 7) + "|"
    return "\n".join([head, sep, *(_row(r, base) for r in records)])


def section_60m(args: argparse.Namespace) -> str:
    common = [*COMMON_60M, "--steps", str(args.steps_60m)]
    chosen = [c for c in CONFIGS_60M if not args.only or any(o in c[0] for o in args.only)]
    records = [run_one(args, "60m", name, [*common, *a]) for name, a in chosen]
    by = {r["name"]: r for r in records}
    base = {k: by[k]["peak_rss_bytes"] for k in ("adamw", "adamw + activation features") if k in by}
    lines = [f"### LLaMA-60M shapes, micro-batch 32×256, {args.steps_60m} steps, bf16 autocast, {args.threads} "
             "threads\n", table(records, base), ""]
    low = by.get("dct-galore --memory low (+ bf16 weights)")
    if low and len(base) == 2:
        a, act = base["adamw"], base["adamw + activation features"]
        for target, ref, label in ((0.30, a, "AdamW's default peak"), (0.70, act, "AdamW with the same activation "
                                                                                  "features")):
            ratio = low["peak_rss_bytes"] / ref
            lines.append(f"- {'MET' if ratio <= target else 'MISSED'}: --memory low peak "
                         f"{_mib(low['peak_rss_bytes'])} MiB = {ratio:.3f}× {label} ({_mib(ref)} MiB); "
                         f"target ≤ {target:.2f}×")
    return "\n".join(lines)


def section_1b(args: argparse.Namespace) -> str:
    common = [*COMMON_1B, "--steps", str(args.steps_1b)]
    limit, as_limit = int(args.limit_gib * GiB), int(args.as_limit_gib * GiB)
    chosen = [c for c in CONFIGS_1B if not args.only or any(o in c[0] for o in args.only)]
    records = [run_one(args, "1b", name, [*common, *a], limit=limit, as_limit=as_limit) for name, a in chosen]
    lines = [f"### LLaMA-1B shapes, micro-batch 1×256, {args.steps_1b} steps, {args.threads} threads; RSS limit "
             f"{args.limit_gib:g} GiB (watchdog), address-space limit {args.as_limit_gib:g} GiB (RLIMIT_AS)\n",
             table(records, {}), ""]
    for r in records:
        s = r.get("summary")
        if s:
            fate = (f"trained {s['steps']} steps ({s['status']}), peak RSS {r['peak_rss_bytes'] / GiB:.2f} GiB, model "
                    f"state {s['memory']['model_state_bytes_per_param']:.2f} B/param, VmPeak "
                    f"{r['vm_peak_bytes'] / GiB:.2f} GiB, wall {r['wall_seconds']:.0f} s")
        else:
            how = (f"killed by the watchdog at RSS {r['killed_at_rss_bytes'] / GiB:.2f} GiB"
                   if r["killed_at_rss_bytes"] else f"exit {r['exit']}")
            fate = f"did not fit: {how}, peak RSS {r['peak_rss_bytes'] / GiB:.2f} GiB, wall {r['wall_seconds']:.0f} s"
        lines.append(f"- {r['name']}: {fate}")
    return "\n".join(lines)


def section_quality(args: argparse.Namespace) -> str:
    records = [run_one(args, "quality", name, [*COMMON_QUALITY, *a]) for name, a in CONFIGS_QUALITY]
    lines = ["### Quality: small LLaMA, 300 steps of 4×256 tokens, DCT rank 64, LR 3e-3 (BENCHMARKS.md, issue 3)\n",
             "| config | val loss | val ppl | vs fp32 (same clipping) | peak RSS MiB | optimizer state MiB | s/step |",
             "|---|---|---|---|---|---|---|"]
    ref = {True: records[0], False: records[1]}  # clipped fp32, unclipped (layer-wise) fp32
    for i, r in enumerate(records):
        s = r["summary"]
        base = ref[i in (0, 3)]["summary"]["final_val_ppl"]
        lines.append(f"| {r['name']} | {s['final_val_loss']:.4f} | {s['final_val_ppl']:.2f} | "
                     f"{s['final_val_ppl'] / base - 1:+.2%} | {_mib(r['peak_rss_bytes'])} | "
                     f"{s['opt_state_bytes'] / MiB:.2f} | {s['train_seconds'] / s['steps']:.2f} |")
    return "\n".join(lines)


def build_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--sections", default="60m,1b,quality", help="comma-separated: 60m, 1b, quality")
    p.add_argument("--data", default="shakespeare",
                   help="corpus of the 60m/1b runs (its BPE must reach GaLore's 32000 tokens: a few MB of text; "
                        "tiny-shakespeare stops near 10.8k)")
    p.add_argument("--quality-data", default="tiny-shakespeare", help="corpus of the quality runs")
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help="run only the configs whose name contains one of these (comma-separated)")
    p.add_argument("--steps-60m", type=int, default=6)
    p.add_argument("--steps-1b", type=int, default=3)
    p.add_argument("--limit-gib", type=float, default=8.0, help="RSS limit of the 1b runs (GiB)")
    p.add_argument("--as-limit-gib", type=float, default=16.0, help="address-space limit of the 1b runs (GiB)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench-memory")
    p.add_argument("--no-reuse", dest="reuse", action="store_false", help="rerun finished runs")
    return p


SECTIONS = {"60m": section_60m, "1b": section_1b, "quality": section_quality}


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
        if name not in SECTIONS:
            raise UserError(f"--sections: unknown section {name!r}. Fix: one or more of {', '.join(SECTIONS)}.")
        print(f"bench memory: section {name}", flush=True)
        reports.append(SECTIONS[name](args))
    text = "\n\n".join(reports) + "\n"
    (out / "results.md").write_text(text)
    print("\n" + text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(argparse.ArgumentParser(prog="gradlore bench memory", description=__doc__)).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
