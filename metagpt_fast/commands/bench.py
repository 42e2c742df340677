"""``metagpt-fast bench``: every backend and external baseline on the device's suite, with parity and speedups.

Prints one table per op (time, throughput, speedup vs the reference and vs torch SDPA, max parity error against
the reference on the same inputs, peak memory), appends every number to ``OUT/results.jsonl`` and draws
``OUT/throughput.png`` (throughput against sequence length per backend).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from metagpt_fast._extras import import_optional

HELP = "benchmark every backend against the reference and torch SDPA (tables, results file, plots)"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from metagpt_fast.bench.runner import BENCHES

    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    parser.add_argument(
        "--backends",
        type=_csv,
        help="comma-separated providers to run (default: all): reference, triton, cuda, cpu, torch-sdpa, "
        "torch-sdpa-{math,flash,efficient,cudnn}, flex, flash-attn, liger",
    )
    parser.add_argument("--ops", type=_csv, default=list(BENCHES), help=f"comma-separated, from {', '.join(BENCHES)}")
    parser.add_argument(
        "--dtype",
        type=_csv,
        help="comma-separated: float32, float16, bfloat16 (default: float32 on CPU, bfloat16 on GPU)",
    )
    parser.add_argument("--quick", action="store_true", help="the small suite (CI; under a minute on a CPU)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for results.jsonl and plots")
    parser.add_argument(
        "--max-seconds", type=float, help="stop starting new cases after this many seconds (tables keep what ran)"
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw throughput.png")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's choice; 1 when the load average is at least the core count)",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="OLD.jsonl",
        help="after the run, print each case's time change against this earlier results file, with its significance",
    )
    parser.add_argument(
        "--fail-on-regression",
        type=float,
        metavar="PCT",
        help="with --compare: exit 1 when a backend of the package is significantly slower by more than PCT percent",
    )
    parser.add_argument(
        "--strict-parity", action="store_true", help="exit 1 when a backend of the package is outside the parity rule"
    )


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible to torch")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {name!r}")
    return str(device)


def resolve_dtypes(names: list[str] | None, device: str) -> list[torch.dtype]:
    if not names:
        return [torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32]
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise ValueError(f"unknown dtype(s) {unknown}; choose from float32, float16, bfloat16")
    return list(dict.fromkeys(DTYPES[n] for n in names))


def interpret_triton_without_gpu() -> None:
    """Without a GPU, Triton kernels can only run interpreted (for their parity check), and triton reads
    ``TRITON_INTERPRET`` when it is imported, which ``import torch`` already did. So when this command runs as the
    ``metagpt-fast`` program with the variable unset, it restarts itself once with ``TRITON_INTERPRET=1``. Called
    inside another process (a test, a notebook) it changes nothing: the triton backend then reports how to enable it.
    """
    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ:
        return
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if Path(sys.argv[0]).name != "metagpt-fast" and (spec is None or spec.name != "metagpt_fast.cli"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    env = dict(os.environ, TRITON_INTERPRET="1")
    os.execve(sys.executable, [sys.executable, "-m", "metagpt_fast.cli", *sys.argv[1:]], env)


def make_console():
    """Rich console; written to a file or pipe (CI logs, the GPU suite), tables get 160 columns instead of 80.
    rich comes with the ``bench`` extra: without it this raises an error that says how to install it."""
    console = import_optional("rich.console", "the bench and profile tables")
    out = console.Console()
    return out if out.is_terminal else console.Console(width=160)


def run(args: argparse.Namespace) -> int:
    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:  # the thread count chosen for the bench does not outlive it (a notebook, the test process)
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    # Checked before anything runs, so a missing extra does not surface after minutes of benchmarking.
    import_optional("rich", "the bench tables")
    if not args.no_plot:
        import_optional("matplotlib", "the bench plots (or pass --no-plot)")
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from metagpt_fast.bench.compare import compare_rows, compare_table, regressions
    from metagpt_fast.bench.memory import quiet_profiler_logs
    from metagpt_fast.bench.plots import write_plot
    from metagpt_fast.bench.report import op_table
    from metagpt_fast.bench.results import RESULTS_FILE, ResultsFile, read_results
    from metagpt_fast.bench.runner import make_plan, run_plans
    from metagpt_fast.bench.timing import TimingBudget

    interpret_triton_without_gpu()
    quiet_profiler_logs()
    device = resolve_device(args.device)
    dtypes = resolve_dtypes(args.dtype, device)
    if args.max_seconds is not None and args.max_seconds <= 0:
        raise ValueError(f"--max-seconds must be > 0, got {args.max_seconds}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.fail_on_regression is not None and args.compare is None:
        raise ValueError("--fail-on-regression needs --compare OLD.jsonl")
    if args.fail_on_regression is not None and args.fail_on_regression < 0:
        raise ValueError(f"--fail-on-regression must be >= 0, got {args.fail_on_regression}")
    if args.compare is not None and not args.compare.is_file():
        raise ValueError(f"--compare: no results file at {args.compare}")
    old_rows = read_results(args.compare) if args.compare is not None else None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    threads, thread_note = choose_threads(args.threads, device, load, os.cpu_count() or 1, torch.get_num_threads())
    torch.set_num_threads(threads)
    plans = make_plan(args.ops, device, dtypes, args.quick, args.backends)
    budget = TimingBudget.quick() if args.quick else TimingBudget()
    results = ResultsFile(args.out / RESULTS_FILE)

    console = make_console()
    if thread_note:
        console.print(f"[yellow]note:[/] {thread_note}")
    total = sum(len(plan.cases) * len(plan.runnable) for plan in plans)
    began = time.perf_counter()
    with Progress(
        TextColumn("[bold]bench"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("", total=total)
        outcome = run_plans(
            plans,
            budget,
            results,
            on_progress=lambda label: progress.update(task, advance=1, description=label),
            max_seconds=args.max_seconds,
        )
    for result in outcome:
        if result.plan.cases:
            console.print(op_table(result))
            console.print()
    console.print(f"results appended to {results.path}")
    if not args.no_plot:
        plot = write_plot(outcome, args.out)
        console.print(f"plot: {plot}" if plot else "plot: no case has two sequence lengths to draw")
    console.print(f"bench took {time.perf_counter() - began:.0f} s")
    measured = [m for r in outcome for m in r.measurements]
    failed = [m for m in measured if m.status == "failed"]
    if failed:
        console.print(f"[bold red]{len(failed)} measurement(s) failed[/] (see the tables and the results file)")
    above = [m for m in measured if m.parity_violation]
    for m in above:
        console.print(
            f"[bold red]parity:[/] {m.provider} on {m.case.op} {m.case.mode} {m.case.label} "
            f"{str(m.case.dtype).removeprefix('torch.')}: {escape(m.parity_note)}"
        )
    regressed = []
    if old_rows is not None:
        changes = compare_rows(old_rows, results.written)
        console.print(compare_table(changes, args.compare))
        if args.fail_on_regression is not None:
            regressed = regressions(changes, args.fail_on_regression)
            for c in regressed:
                console.print(
                    f"[bold red]regression:[/] {escape(c.label)}: {100 * c.change:+.1f}% "
                    f"(> {args.fail_on_regression:g}%, significant)"
                )
    # Crashes fail the run; parity is reported (the test suite is the gate) unless --strict-parity asks otherwise.
    strict = args.strict_parity and any(m.kind == "backend" for m in above)
    return 1 if failed or strict or regressed else 0


def choose_threads(
    requested: int | None, device: str, load: float | None, cores: int, current: int
) -> tuple[int, str | None]:
    """torch's CPU threads for the run, and the note to print. On a CPU whose load average is at least its core
    count, the default is 1 thread: several threads would wait for busy cores, and their timings measure the other
    processes as much as the kernels. ``--threads`` always wins."""
    if requested is not None:
        return requested, None
    if torch.device(device).type != "cpu" or load is None or load < cores or current <= 1:
        return current, None
    return 1, (
        f"load average {load:.1f} on {cores} cores: other processes share the CPU, so the bench runs on 1 thread "
        f"(--threads N to override)"
    )
