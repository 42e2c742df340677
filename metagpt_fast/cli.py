"""``metagpt-fast`` command line: one sub-command per module of ``metagpt_fast.commands``.

Each command module defines ``HELP`` (one line, the sub-command's help), ``add_arguments(parser)`` and
``run(args) -> int``. Their optional dependencies (rich, matplotlib: the ``bench`` extra) are imported only when a
command runs, so ``metagpt-fast info`` works whatever else is missing.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from metagpt_fast._extras import MissingExtraError

COMMANDS = ("info", "train", "generate", "bench", "profile")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metagpt-fast", description="Fused GPT kernels: train, benchmark, profile.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"metagpt_fast.commands.{name}")
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        command.set_defaults(_module=module.__name__)
        module.add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args._module).run(args) or 0
    except (ValueError, TypeError, FileNotFoundError, MissingExtraError) as exc:
        print(f"metagpt-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
