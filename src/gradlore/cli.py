"""`gradlore` command line: one entry point, one sub-command per job.

Each sub-command's parser lives next to the code it drives; this table wires them in, one line each.
Exit status: 0 on success, 2 on bad input (argparse's convention), 1 on an unexpected failure.
"""

from __future__ import annotations

import argparse
import sys

from gradlore.bench.cli import add_bench
from gradlore.compress.cli import add_compress, add_eval
from gradlore.errors import UserError
from gradlore.train.cli import add_analyze, add_finetune, add_train

COMMANDS = [add_train, add_finetune, add_analyze, add_compress, add_eval, add_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradlore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"gradlore {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
