"""``gradlore train | finetune | analyze``: three faces of the one training loop.

- ``train``: pretrain (or, with ``--init``, fine-tune) a LLaMA-style model with any gradlore optimizer. With no
  arguments it trains the ``default`` preset (4-layer, 256-wide LLaMA, byte-level BPE-4k trained on the
  Shakespeare corpus, DCT projection rank 64) for a few CPU minutes and prints where the outputs are.
- ``finetune``: ``train --preset finetune --init MODEL``: only the low-rank components of a WeLore-compressed
  model train (``--full``: every weight, the dense baseline; ``--train-norms``: the norms too).
- ``analyze``: ``train --preset analyze``: a short AdamW run that records per-layer gradient-rank statistics
  (``--from FILE`` re-plots an earlier recording).

Flags map onto config fields; ``--set SECTION.FIELD=VALUE`` reaches any of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gradlore.analysis.plot import format_summary, plot_records, summarize
from gradlore.analysis.recorder import read_records
from gradlore.errors import UserError
from gradlore.models import SIZES
from gradlore.optim.build import optimizer_names
from gradlore.optim.parts import ON_REFRESH
from gradlore.optim.presets import PRESETS as OPTIM_PRESETS
from gradlore.train.config import PARALLEL, RunConfig, apply_override, load_run_config
from gradlore.train.memory import LEVELS
from gradlore.train.presets import PRESETS, preset
from gradlore.train.rundir import CONFIG_FILE
from gradlore.train.trainer import run

EPILOG = """examples:
  gradlore train                                   # default preset: small LLaMA, Shakespeare, DCT
  gradlore train --preset tiny --optimizer adamw --steps 200 --out runs/tiny
  gradlore train --data notes.txt --model small --optimizer fira --set optim.update_proj_gap=200
  gradlore train --out runs/x --resume              # continue a killed run exactly where it stopped
  gradlore train --init smollm2 --optimizer lora --rank 16 --target-modules all-linear   # LoRA (peft) baseline
  gradlore train --preset galore_60m --memory low   # every memory saving at once (README: Memory)
  gradlore finetune --model runs/smol-w20 --data notes.txt --steps 100 --out runs/smol-w20-ft
  gradlore analyze --steps 300 --out runs/analyze   # gradient-rank statistics by layer type
"""

# flag -> config field; each command adds the flags it uses
FLAGS = {"data": "data.path", "model": "model.size", "init": "model.init", "optimizer": "optim.name",
         "lr": "optim.lr", "rank": "optim.rank", "steps": "train.steps", "seed": "train.seed",
         "batch_size": "train.batch_size", "block_size": "data.block_size", "every": "analysis.every",
         "parallel": "train.parallel", "target_modules": "optim.target_modules"}


def _common(p: argparse.ArgumentParser, preset: str) -> None:
    p.add_argument("--preset", default=None, help=f"config preset: {', '.join(PRESETS)} (default: {preset})")
    p.add_argument("--data", help="text file, folder, JSONL, corpus name (shakespeare, tiny-shakespeare) or "
                                  "hf:DATASET[:CONFIG]")
    p.add_argument("--optimizer", help=f"one of {', '.join(optimizer_names())}")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--rank", type=int, help="projection rank of a gradlore optimizer (LoRA: the adapters' rank)")
    p.add_argument("--target-modules", help="layers to project (or to give LoRA adapters): all-linear, name fragments "
                                            "(q_proj,v_proj) or re:REGEX")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int, help="sequences per micro-batch")
    p.add_argument("--block-size", type=int, help="tokens per sequence")
    p.add_argument("--seed", type=int, help="random seed (model init and data order)")
    p.add_argument("--out", help="run directory (default: runs/<preset>-<optimizer>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set optim.rank=64 (repeatable)")
    p.add_argument("--memory", choices=list(LEVELS), help="low: chunked loss, activation checkpointing, bf16 "
                   "weights with stochastic rounding, 8-bit optimizer states, layer-wise updates, allocator "
                   "release (each also a config field: memory.*, optim.state, optim.plain_state, optim.layerwise)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--parallel", choices=PARALLEL,
                   help="data-parallel (ddp) or fully sharded (fsdp2) training over the processes of "
                        "`torchrun --nproc_per_node N -m gradlore.cli train ...`; --batch-size is the global batch")
    p.set_defaults(default_preset=preset)


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="pretrain or fine-tune a LLaMA-style model", description=__doc__,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p, "default")
    p.add_argument("--model", help=f"model size: {', '.join(SIZES)}")
    p.add_argument("--init", help="pretrained model folder (dense or compressed) or alias to fine-tune")
    p.set_defaults(func=main)


def add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a pretrained or compressed model (its low-rank parts, or --full)",
                       description="Fine-tune a model folder; for a WeLore-compressed model only its low-rank "
                                   "components (LRC) train unless --full. Same flags as `gradlore train`.")
    _common(p, "finetune")
    p.add_argument("--model", dest="init", help="model folder (dense or `gradlore compress` output) or alias")
    p.add_argument("--full", action="store_true", help="train every weight (the dense baseline)")
    p.add_argument("--train-norms", action="store_true", help="also train the normalisation layers")
    p.set_defaults(func=main)


def add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="record gradient stable rank / subspace drift per layer type while training",
                       description="A short training run that records gradient-rank statistics every --every steps "
                                   "(stable rank, 90%%-energy rank, subspace cosine between records, weight stable "
                                   "rank) and plots them by layer type (arXiv 2407.11239). Same flags as "
                                   "`gradlore train`; --from re-plots an earlier recording.")
    _common(p, "analyze")
    p.add_argument("--model", help=f"model size: {', '.join(SIZES)}")
    p.add_argument("--every", type=int, help="record every K steps (default 10)")
    p.add_argument("--from", dest="from_path", help="re-plot an existing gradient_stats.jsonl (or its run folder)")
    p.set_defaults(func=main)


def _assignments(args: argparse.Namespace) -> list[str]:
    """--memory first, then the flags, then --set (so --set wins)."""
    out = list(LEVELS[args.memory]) if getattr(args, "memory", None) else []
    out += [f"{key}={getattr(args, name)}" for name, key in FLAGS.items() if getattr(args, name, None) is not None]
    if getattr(args, "full", False):
        out.append("model.trainable=all")
    elif getattr(args, "train_norms", False):
        out.append("model.trainable=lrc+norms")
    return out + list(args.overrides)


def _fit_memory_level(cfg: RunConfig, args: argparse.Namespace) -> None:
    """``--memory low`` with a preset whose moment policy moves rows (``on_refresh='remap'``, e.g. ``dct``): its
    projected moments stay fp32 (they are r×l, small; remap needs rows of their own), every other state 8-bit.
    A ``--set optim.state=...`` of the user's own is left as given (and refused with its fix if illegal)."""
    if getattr(args, "memory", None) != "low" or cfg.optim.name not in OPTIM_PRESETS:
        return
    if any(a.startswith("optim.state=") for a in _assignments(args)[len(LEVELS["low"]):]):
        return
    group = OPTIM_PRESETS[cfg.optim.name](rank=cfg.optim.rank, **{**cfg.optim.group_overrides(), "state": "fp32"})
    policy = ON_REFRESH.entry(group.get("on_refresh", "keep")).factory
    if getattr(policy, "needs_indices", False) and cfg.optim.state not in ("", "fp32"):
        print(f"gradlore: --memory low keeps {cfg.optim.name}'s projected moments in fp32 "
              f"(on_refresh={group['on_refresh']!r} moves their rows); every other state is "
              f"{cfg.optim.plain_state or cfg.optim.state}.", file=sys.stderr)
        cfg.optim.plain_state = cfg.optim.plain_state or cfg.optim.state
        cfg.optim.state = "fp32"


def resolve_args(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """(config, run directory) from parsed arguments; --resume starts from the run's saved config."""
    if args.resume:
        if not args.out:
            raise UserError("--resume needs --out RUN_DIR (the run to continue).")
        saved = Path(args.out) / CONFIG_FILE
        if not saved.exists():
            raise UserError(f"--resume: {args.out} has no {CONFIG_FILE}, so it is not a gradlore run. "
                            "Fix: pass the --out of an earlier run.")
        cfg = load_run_config(saved)
        if args.preset is not None and args.preset != cfg.preset:
            raise UserError(f"--resume continues the same run, so the preset cannot change: {cfg.preset!r} in the "
                            f"run, {args.preset!r} now. Fix: drop --preset.")
        for assignment in _assignments(args):
            apply_override(cfg, assignment)
    else:
        cfg = preset(args.preset or args.default_preset)
        for assignment in _assignments(args):
            apply_override(cfg, assignment)
    _fit_memory_level(cfg, args)
    cfg.validate()
    if args.default_preset == "finetune" and not cfg.model.init:
        raise UserError("gradlore finetune needs --model DIR (a model folder or `gradlore compress` output).")
    out = Path(args.out) if args.out else Path("runs") / (
        f"{cfg.preset}-{cfg.optim.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return cfg, out


def replot(path: str, out: str | None) -> int:
    records = read_records(path)
    src = Path(path)
    folder = Path(out) if out else (src if src.is_dir() else src.parent)
    png = plot_records(records, folder / "gradient_rank.png", title=src.name)
    print(format_summary(summarize(records)))
    print(f"\nplot: {png}")
    return 0


def main(args: argparse.Namespace) -> int:
    if getattr(args, "from_path", None):
        return replot(args.from_path, args.out)
    cfg, out = resolve_args(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    summary = run(cfg, out, resume=args.resume, overwrite=args.overwrite)
    code = {"completed": 0, "interrupted": 130, "diverged": 1}[summary["status"]]
    if summary.get("rank", 0):  # under torchrun, rank 0 reports
        return code
    paths = summary["paths"]
    print(f"run:        {paths['run']}  ({summary['status']}, {summary['steps']} steps, "
          f"{summary['tokens']:,} tokens, {summary['tokens_per_s']:.0f} tokens/s)")
    print(f"val loss:   {summary['final_val_loss']:.4f}  (perplexity {summary['final_val_ppl']:.2f})")
    print(f"trainable:  {summary['trainable_params']:,} of {summary['params']:,} parameters; optimizer state "
          f"{summary['opt_state_bytes'] / 2**20:.1f} MiB; peak RSS {summary['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"plot:       {paths['plot']}")
    print(f"metrics:    {paths['metrics']}")
    print(f"checkpoint: {paths['checkpoint']}")
    if paths["model"]:
        print(f"model:      {paths['model']}  (use with --init)")
    if paths.get("adapter"):
        print(f"adapter:    {paths['adapter']}  (the LoRA adapter alone, for peft)")
    if "gradient_plot" in paths:
        print(f"gradients:  {paths['gradient_stats']}  (plot {paths['gradient_plot']})")
    print(f"summary:    {Path(paths['run']) / 'summary.json'}")
    sys.stdout.flush()
    return code
