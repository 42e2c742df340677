"""``metagpt-fast`` command line: one sub-command per module of ``metagpt_fast.commands``.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. Their optional
dependencies (rich, matplotlib: the ``bench`` extra) are imported only when a command runs, so ``metagpt-fast info``
works whatever else is missing.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from metagpt_fast._extras import MissingExtraError

COMMANDS = {
    "info": "versions, device and which backends run here (and why not)",
    "train": "train MetaGPT (default corpus: the Python standard library's sources, byte-level)",
    "generate": "sample text from a checkpoint",
    "bench": "benchmark every backend against the reference and torch SDPA: tables, results file, plots",
    "profile": "profile MetaGPT training steps: Chrome trace, top kernels by self time, peak memory",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metagpt-fast", description="Fused GPT kernels: train, benchmark, profile.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(_module=f"metagpt_fast.commands.{name}")
        importlib.import_module(f"metagpt_fast.commands.{name}").add_arguments(command)
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
