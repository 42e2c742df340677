"""``metagpt-fast info``: versions, device, and each backend with the reason it is unavailable."""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess

import torch
from rich.console import Console
from rich.table import Table

import metagpt_fast


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
    console = Console()
    versions = Table(title="metagpt-fast", show_header=False)
    for key, value in facts.items():
        if key != "backends":
            versions.add_row(key, str(value))
    console.print(versions)
    table = Table(title="backends")
    table.add_column("backend")
    table.add_column("status")
    for name, reason in facts["backends"].items():
        table.add_row(name, "[green]available[/]" if reason is None else f"[red]unavailable[/]: {reason}")
    console.print(table)
    return 0
