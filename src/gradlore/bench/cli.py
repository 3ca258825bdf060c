"""``gradlore bench``: side-by-side benchmarks against torch AdamW and the peer packages.

Sub-commands: ``pretrain`` (the training-driver benchmark, :mod:`gradlore.bench.pretrain`), ``optim``
(optimizer-level step time / memory, :mod:`gradlore.bench.optim`) and ``welore`` (compression of a real
model, :mod:`gradlore.bench.welore`).
"""

from __future__ import annotations

import argparse
import importlib


def _delegate(module: str):
    """A ``func`` that hands the remaining command line to ``module.main(argv)``."""

    def func(args: argparse.Namespace) -> int:
        return int(importlib.import_module(module).main(list(args.argv)) or 0)

    return func


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmarks (pretrain, optim, welore)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_sub = p.add_subparsers(dest="bench_command", metavar="BENCH", required=True)

    from gradlore.bench import pretrain

    pre = bench_sub.add_parser("pretrain", help="pretrain a small LLaMA with every optimizer, LR-swept",
                               description=pretrain.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pretrain.build_parser(pre)
    pre.set_defaults(func=pretrain.run)

    # prefix_chars="+": every "-x"/"--x" after `optim` is passed on untouched to gradlore.bench.optim.
    opt = bench_sub.add_parser("optim", help="optimizer step time and state memory against the peers",
                               add_help=False, prefix_chars="+")
    opt.add_argument("argv", nargs=argparse.REMAINDER)
    opt.set_defaults(func=_delegate("gradlore.bench.optim"))

    wel = bench_sub.add_parser("welore", help="WeLore vs uniform compression of SmolLM2, fine-tuning, speed",
                               add_help=False, prefix_chars="+")
    wel.add_argument("argv", nargs=argparse.REMAINDER)
    wel.set_defaults(func=_delegate("gradlore.bench.welore"))
    return p
