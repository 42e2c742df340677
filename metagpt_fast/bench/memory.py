"""Peak memory of one call, in bytes above what was allocated before it.

- CUDA: the caching allocator's high-water mark (``torch.cuda.max_memory_allocated``) after resetting it.
- CPU: torch keeps no CPU allocator statistics, so the call runs once under ``torch.profiler`` with
  ``profile_memory=True`` and the peak is the maximum running sum of its allocation (+) and free (-) events.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch


def quiet_profiler_logs() -> None:
    """Silences kineto's per-session INFO/USDT lines on stderr (level 6 is above all of them) unless the user chose
    a level; it must run before the profiler's first use in the process."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Bytes ``fn`` held at its peak beyond the memory live before the call; None if it cannot be measured.

    Tensors ``fn`` returns are held until the call's result is dropped, so they count too."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del result
        return max(int(peak), 0)
    return _cpu_peak(fn)


def _cpu_peak(fn: Callable[[], object]) -> int | None:
    from torch.profiler import ProfilerActivity, profile

    quiet_profiler_logs()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    return profiler_peak_bytes(prof)


def profiler_peak_bytes(prof) -> int | None:
    """Peak host memory during a ``torch.profiler`` session run with ``profile_memory=True``: the maximum running
    sum of its allocation (+) and free (-) events, in time order; None if this torch does not expose them."""
    try:  # kineto's raw events carry each allocation's size and time; the aggregated views lose the order
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.device_type() == torch.autograd.DeviceType.CPU)
    except AttributeError:
        return None
    return running_peak(nbytes for _, nbytes in deltas)


def running_peak(deltas) -> int:
    """Maximum of the running sum of allocation deltas (0 if it never rises above the start)."""
    total = peak = 0
    for delta in deltas:
        total += delta
        peak = max(peak, total)
    return peak
