"""Profiles MetaGPT training steps with ``torch.profiler`` (``metagpt-fast profile``).

The public ops open a ``metagpt_fast.<op>[<backend>]`` range around each call while a profiler runs, and every step
runs in a ``train_step#i`` range, so the Chrome trace (also readable by TensorBoard's profiler plugin: the file
ends in ``.pt.trace.json``) shows which backend served each op and which kernels it launched.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from metagpt_fast.bench.memory import profiler_peak_bytes, quiet_profiler_logs
from metagpt_fast.bench.train_step import build_train_step
from metagpt_fast.model import MetaGPTConfig

OP_RANGE_PREFIX = "metagpt_fast."
STEP_RANGE = "train_step#"


@dataclasses.dataclass(frozen=True)
class KernelRow:
    name: str
    calls: int
    self_ms: float  # total self time over all calls (device time for GPU kernels, CPU time otherwise)
    share: float  # fraction of all self time in the profile


@dataclasses.dataclass(frozen=True)
class RangeRow:
    name: str
    calls: int
    cpu_ms: float  # wall time inside the range on the host, children included
    device_ms: float  # GPU time of the kernels launched inside it (0 on CPU)


@dataclasses.dataclass
class ProfileResult:
    trace: Path
    step_ms: list[float]  # wall time of each profiled step
    top: list[KernelRow]  # by self time, GPU kernels on CUDA, CPU ops otherwise
    op_ranges: list[RangeRow]  # the fused ops' ranges
    peak_bytes: int | None
    memory_snapshot: Path | None = None


def _attr(evt, *names: str) -> float:
    for name in names:  # device_* names since torch 2.4, cuda_* before
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


def _self_device_us(evt) -> float:
    return _attr(evt, "self_device_time_total", "self_cuda_time_total")


def _device_us(evt) -> float:
    return _attr(evt, "device_time_total", "cuda_time_total")


def top_kernels(prof: profile, on_cuda: bool, limit: int) -> list[KernelRow]:
    averages = [e for e in prof.key_averages() if not e.key.startswith((OP_RANGE_PREFIX, STEP_RANGE))]
    if on_cuda:
        # GPU kernels (and memcpy/memset) are the events that carry self device time.
        timed = [(e, _self_device_us(e)) for e in averages if _self_device_us(e) > 0]
    else:
        timed = [(e, float(e.self_cpu_time_total)) for e in averages if e.self_cpu_time_total > 0]
    total = sum(us for _, us in timed) or 1.0
    timed.sort(key=lambda pair: -pair[1])
    return [KernelRow(e.key, int(e.count), us / 1e3, us / total) for e, us in timed[:limit]]


def op_ranges(prof: profile) -> list[RangeRow]:
    rows = [
        RangeRow(e.key, int(e.count), e.cpu_time_total / 1e3, _device_us(e) / 1e3)
        for e in prof.key_averages()
        if e.key.startswith(OP_RANGE_PREFIX)
    ]
    return sorted(rows, key=lambda r: -max(r.cpu_ms, r.device_ms))


def profile_training(
    cfg: MetaGPTConfig,
    batch: int,
    steps: int,
    device: str,
    dtype: torch.dtype,
    out: Path,
    *,
    warmup: int = 1,
    memory_snapshot: bool = False,
    top: int = 15,
) -> ProfileResult:
    """Runs ``warmup`` untraced steps (compilation, autotuning) and ``steps`` profiled ones; writes the trace (and
    the CUDA memory snapshot) into ``out``."""
    if steps < 1 or warmup < 0 or batch < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0 and batch >= 1, got {steps}, {warmup}, {batch}")
    on_cuda = torch.device(device).type == "cuda"
    if memory_snapshot and not on_cuda:
        raise ValueError("a memory snapshot needs a CUDA device (torch.cuda.memory._record_memory_history)")
    out.mkdir(parents=True, exist_ok=True)
    quiet_profiler_logs()
    train = build_train_step(cfg, batch, device, dtype)
    for _ in range(warmup):
        train.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        if memory_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
    step_ms = []
    with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        for i in range(steps):
            began = time.perf_counter()
            with record_function(f"{STEP_RANGE}{i}"):
                train.step()
            if on_cuda:
                torch.cuda.synchronize()
            step_ms.append((time.perf_counter() - began) * 1e3)
    snapshot = None
    if memory_snapshot:
        snapshot = out / "memory_snapshot.pickle"
        torch.cuda.memory._dump_snapshot(str(snapshot))
        torch.cuda.memory._record_memory_history(enabled=None)
    tag = f"{cfg.embed_size}d{cfg.num_layers}l_{cfg.backend}_{str(dtype).removeprefix('torch.')}"
    trace = out / f"metagpt_{tag}.pt.trace.json"
    prof.export_chrome_trace(str(trace))
    peak = torch.cuda.max_memory_allocated() if on_cuda else profiler_peak_bytes(prof)
    return ProfileResult(trace, step_ms, top_kernels(prof, on_cuda, top), op_ranges(prof), peak, snapshot)
