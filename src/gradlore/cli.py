"""`gradlore` command line: one entry point, one sub-command per job.

Each sub-command lives next to the code it drives and exposes ``add_parser(subparsers)`` that
registers its arguments and sets ``func``; this module only wires them together.
Exit status: 0 on success, 2 on bad input (argparse's convention), 1 on an unexpected failure.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gradlore.errors import UserError

# name -> module that defines add_parser(subparsers). Registration is explicit, one line each.
COMMANDS = {
    "train": "gradlore.train.cli",
    "compress": "gradlore.compress.cli",
    "finetune": "gradlore.compress.cli",
    "eval": "gradlore.compress.cli",
    "analyze": "gradlore.analysis.cli",
    "bench": "gradlore.bench.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradlore", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    seen = set()
    for module_name in COMMANDS.values():
        if module_name in seen:
            continue
        seen.add(module_name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a half-built checkout must still show the other commands
            if exc.name and exc.name.startswith("gradlore"):
                continue
            raise
        module.add_parser(sub)
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
