"""``metagpt-fast info``: versions, device, and each backend with the reason it is unavailable."""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess

import torch

import metagpt_fast
from metagpt_fast._extras import has_module

HELP = "versions, device and which backends run here (and why not)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as exc:
        return f"not available ({type(exc).__name__})"


def _compiler() -> str:
    for cxx in ("c++", "g++", "clang++"):
        path = shutil.which(cxx)
        if path:
            out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
            return out.splitlines()[0] if out else path
    return "none found"


def collect() -> dict:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86'})"
    return {
        "metagpt_fast": metagpt_fast.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda (torch build)": str(torch.version.cuda),
        "cuda available": torch.cuda.is_available(),
        "c++ compiler": _compiler(),
        "device": device,
        "backends": metagpt_fast.available_backends(),
    }


def run(args: argparse.Namespace) -> int:
    facts = collect()
    if args.json:
        import json

        print(json.dumps(facts, indent=2))
        return 0
    if has_module("rich"):
        _print_tables(facts)
    else:  # rich is in the bench extra; info must work without it
        _print_plain(facts)
    return 0


def _print_tables(facts: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    versions = Table(title="metagpt-fast", show_header=False)
    for key, value in facts.items():
        if key != "backends":
            versions.add_row(key, escape(str(value)))
    console.print(versions)
    table = Table(title="backends")
    table.add_column("backend")
    table.add_column("status")
    for name, reason in facts["backends"].items():
        table.add_row(name, "[green]available[/]" if reason is None else f"[red]unavailable[/]: {escape(reason)}")
    console.print(table)


def _print_plain(facts: dict) -> None:
    width = max(len(key) for key in facts)
    for key, value in facts.items():
        if key != "backends":
            print(f"{key:<{width}}  {value}")
    print("backends:")
    width = max(len(name) for name in facts["backends"])
    for name, reason in facts["backends"].items():
        print(f"  {name:<{width}}  {'available' if reason is None else f'unavailable: {reason}'}")
