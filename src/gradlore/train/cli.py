"""``gradlore train``: pretrain or fine-tune a LLaMA-style model with any gradlore optimizer.

With no arguments it trains the ``default`` preset (4-layer, 256-wide LLaMA, byte-level BPE-4k trained
on the Shakespeare corpus, DCT projection rank 64) for a few CPU minutes and prints where the plot,
metrics and checkpoint are. Flags map onto config fields; ``--set SECTION.FIELD=VALUE`` reaches any of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gradlore.errors import UserError

EPILOG = """examples:
  gradlore train                                   # default preset: small LLaMA, Shakespeare, DCT
  gradlore train --data notes.txt --model tiny --optimizer adamw --steps 200
  gradlore train --preset galore_60m --optimizer fira --set data.tokenizer=path/to/t5-base
  gradlore train --out runs/x --resume              # continue a killed run exactly where it stopped
  gradlore train --init runs/x/final --data more.jsonl --set optim.lr=1e-4   # fine-tune
"""


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from gradlore.train.config import PRESETS

    p = sub.add_parser("train", help="pretrain or fine-tune a LLaMA-style model", description=__doc__,
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="default", help=f"config preset: {', '.join(PRESETS)} (default: default)")
    p.add_argument("--data", help="text file, folder, JSONL, corpus name (shakespeare) or hf:DATASET[:CONFIG]")
    p.add_argument("--model", help="model size: tiny, small, llama_60m, llama_130m, llama_350m, llama_1b")
    p.add_argument("--init", help="pretrained Hugging Face model folder to fine-tune")
    p.add_argument("--optimizer", help="adamw, a gradlore preset (galore, dct, fira, frugal, ...) or galore-torch")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--rank", type=int, help="projection rank")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--seed", type=int, help="random seed (model init and data order)")
    p.add_argument("--out", help="run directory (default: runs/<preset>-<optimizer>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field, e.g. --set optim.rank=64 (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=main)
    return p


def _assignments(args: argparse.Namespace) -> list[str]:
    """Flags first, then --set (so --set wins)."""
    flags = {"data": "data.path", "model": "model.size", "init": "model.init", "optimizer": "optim.name",
             "lr": "optim.lr", "rank": "optim.rank", "steps": "train.steps", "seed": "train.seed"}
    out = [f"{key}={getattr(args, name)}" for name, key in flags.items() if getattr(args, name) is not None]
    return out + list(args.overrides)


def resolve_args(args: argparse.Namespace):
    """(config, run directory) from parsed arguments; --resume reuses the run's saved config."""
    from gradlore.train.config import RunConfig, apply_override, resolve

    if args.resume:
        if not args.out:
            raise UserError("--resume needs --out RUN_DIR (the run to continue).")
        saved = Path(args.out) / "config.json"
        if not saved.exists():
            raise UserError(f"--resume: {args.out} has no config.json, so it is not a gradlore run. "
                            "Fix: pass the --out of an earlier run.")
        cfg = RunConfig.from_dict(json.loads(saved.read_text()))
        for assignment in _assignments(args):  # e.g. more --steps
            apply_override(cfg, assignment)
        cfg.validate()
    else:
        cfg = resolve(args.preset, _assignments(args))
    out = Path(args.out) if args.out else Path("runs") / (
        f"{cfg.preset}-{cfg.optim.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return cfg, out


def main(args: argparse.Namespace) -> int:
    cfg, out = resolve_args(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from gradlore.train.loop import run

    summary = run(cfg, out, resume=args.resume, overwrite=args.overwrite)
    paths = summary["paths"]
    print(f"run:        {paths['run']}  ({summary['status']}, {summary['steps']} steps, "
          f"{summary['tokens']:,} tokens, {summary['tokens_per_s']:.0f} tokens/s)")
    print(f"val loss:   {summary['final_val_loss']:.4f}  (perplexity {summary['final_val_ppl']:.2f})")
    print(f"plot:       {paths['plot']}")
    print(f"metrics:    {paths['metrics']}")
    print(f"checkpoint: {paths['checkpoint']}")
    if paths["model"]:
        print(f"model:      {paths['model']}  (use with --init)")
    print(f"summary:    {Path(paths['run']) / 'summary.json'}")
    sys.stdout.flush()
    return {"completed": 0, "interrupted": 130, "diverged": 1}[summary["status"]]
