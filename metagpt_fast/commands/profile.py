"""``metagpt-fast profile``: N MetaGPT training steps under ``torch.profiler``.

Writes a Chrome / TensorBoard trace (``OUT/metagpt_*.pt.trace.json``: open it in https://ui.perfetto.dev or
chrome://tracing), prints the top kernels by self time, the time inside each fused op's range
(``metagpt_fast.<op>[<backend>]``) and the peak memory; ``--memory-snapshot`` also dumps a CUDA allocator snapshot
(drag it into https://pytorch.org/memory_viz).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from metagpt_fast._extras import import_optional

HELP = "profile MetaGPT training steps: Chrome trace, top kernels by self time, peak memory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from metagpt_fast.commands.train import add_model_arguments

    add_model_arguments(parser)  # --embed-size --layers --heads --seq-len --dropout --positional --backend
    run = parser.add_argument_group("profile")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--steps", type=int, default=5, help="profiled training steps")
    run.add_argument("--warmup", type=int, default=1, help="untraced steps first (compilation, autotuning)")
    run.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    run.add_argument(
        "--dtype", default=None, help="float32, float16 or bfloat16 (autocast); default float32 on CPU, bfloat16 on GPU"
    )
    run.add_argument("--out", type=Path, default=Path("runs/profile"), help="folder for the trace")
    run.add_argument("--top", type=int, default=15, help="rows of the top-kernels table")
    run.add_argument("--memory-snapshot", action="store_true", help="also dump a CUDA memory snapshot (CUDA only)")


def run(args: argparse.Namespace) -> int:
    import_optional("rich", "the profile tables")
    from rich.markup import escape
    from rich.table import Table

    from metagpt_fast.bench.profiling import profile_training
    from metagpt_fast.commands.bench import interpret_triton_without_gpu, make_console, resolve_device, resolve_dtypes
    from metagpt_fast.commands.train import model_config

    if args.backend == "triton":
        interpret_triton_without_gpu()
    device = resolve_device(args.device)
    (dtype,) = resolve_dtypes([args.dtype] if args.dtype else None, device)
    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    cfg = model_config(args)
    console = make_console()
    console.print(
        f"profiling {args.steps} step(s) of MetaGPT (d={cfg.embed_size}, layers={cfg.num_layers}, "
        f"heads={cfg.num_heads}, T={cfg.max_seq_length}, batch={args.batch_size}) on {device}, {dtype}, "
        f"backend {cfg.backend}"
    )
    result = profile_training(
        cfg,
        args.batch_size,
        args.steps,
        device,
        dtype,
        args.out,
        warmup=args.warmup,
        memory_snapshot=args.memory_snapshot,
        top=args.top,
    )

    on_cuda = torch.device(device).type == "cuda"
    top = Table(title=f"top {len(result.top)} {'GPU kernels' if on_cuda else 'CPU ops'} by self time")
    top.add_column("name", overflow="fold")
    top.add_column("calls", justify="right")
    top.add_column("self ms", justify="right")
    top.add_column("share", justify="right")
    for row in result.top:
        top.add_row(escape(row.name), str(row.calls), f"{row.self_ms:.3f}", f"{100 * row.share:.1f}%")
    console.print(top)

    ranges = Table(title="fused op ranges (children included)")
    ranges.add_column("range")
    ranges.add_column("calls", justify="right")
    ranges.add_column("host ms", justify="right")
    if on_cuda:
        ranges.add_column("GPU ms", justify="right")
    for row in result.op_ranges:
        ranges.add_row(
            escape(row.name), str(row.calls), f"{row.cpu_ms:.3f}", *([f"{row.device_ms:.3f}"] if on_cuda else [])
        )
    console.print(ranges)

    tokens = args.batch_size * cfg.max_seq_length
    median_ms = statistics.median(result.step_ms)
    console.print(
        f"step time (profiled, median of {len(result.step_ms)}): {median_ms:.1f} ms, "
        f"{tokens / (median_ms * 1e-3):,.0f} tokens/s"
    )
    where = "GPU allocator high-water mark" if on_cuda else "host allocations during the profiled steps"
    peak = "not measurable with this torch" if result.peak_bytes is None else f"{result.peak_bytes / 2**20:,.1f} MiB"
    console.print(f"peak memory ({where}): {peak}")
    console.print(f"trace: {result.trace}")
    if result.memory_snapshot is not None:
        console.print(f"memory snapshot: {result.memory_snapshot}")
    return 0
