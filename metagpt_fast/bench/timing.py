"""Timing of a zero-argument callable: median and 20th/80th percentiles of per-call times.

The benchmark runner times the providers of a case together, interleaved (``metagpt_fast.bench.interleave``, which
reads the round rules of :class:`TimingBudget`); the functions here time one callable alone.

- CUDA: ``triton.testing.do_bench`` (CUDA events around each call, the L2 cache flushed in between, gradients of
  ``grad_to_none`` reset) when triton can run natively; otherwise CUDA events directly, with the same protocol.
- CPU: wall-clock ``time.perf_counter`` per call after a warm-up, repeated until a time budget or a repeat cap is
  reached (at least ``min_repeats`` unless one call is so slow that they would pass ``max_s``; always one).
  Medians resist the noise of a shared machine better than means.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from metagpt_fast._spec import triton_interpreted


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call times in milliseconds; ``repeats`` is the number of timed calls (0: chosen by ``do_bench``)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int
    # 95% bootstrap interval of the median (interleaved timing; None when timed alone)
    ci_low_ms: float | None = None
    ci_high_ms: float | None = None

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float]) -> Timing:
        if not len(samples_ms):
            raise ValueError("no timing samples")
        p20, median, p80 = np.percentile(np.asarray(samples_ms, dtype=np.float64), [20, 50, 80])
        return cls(float(median), float(p20), float(p80), len(samples_ms))


@dataclasses.dataclass(frozen=True)
class TimingBudget:
    """How long to measure one callable. ``quick`` budgets suit CI; the defaults give stable medians."""

    warmup_s: float = 0.1
    measure_s: float = 0.5
    min_repeats: int = 5
    max_repeats: int = 200
    # Hard cap on the timed calls of one callable (CPU): a 10-second kernel is timed once, not min_repeats times.
    max_s: float = 3.0
    # Warm-up calls at least (CPU); 0 when the caller has just run the work once anyway (a slow kernel's parity run).
    min_warmup: int = 1
    # Interleaved rounds of one case (metagpt_fast.bench.interleave): at least min_rounds, then until every ratio's
    # 95% interval is within ±tolerance of its median, or max_rounds, or case_max_s seconds of timed rounds.
    tolerance: float = 0.05
    min_rounds: int = 10
    max_rounds: int = 400
    case_max_s: float = 15.0

    @classmethod
    def quick(cls) -> TimingBudget:
        return cls(
            warmup_s=0.02,
            measure_s=0.1,
            min_repeats=3,
            max_repeats=50,
            max_s=1.0,
            min_rounds=5,
            max_rounds=200,
            case_max_s=3.0,
        )


def _reset_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def time_cpu(fn: Callable[[], object], budget: TimingBudget, grad_to_none: Sequence[torch.Tensor] = ()) -> Timing:
    start = time.perf_counter()
    calls = 0
    while calls < budget.min_warmup or (calls and time.perf_counter() - start < budget.warmup_s):
        _reset_grads(grad_to_none)
        fn()
        calls += 1
    samples: list[float] = []
    start = time.perf_counter()
    while not samples or (
        (len(samples) < budget.min_repeats or time.perf_counter() - start < budget.measure_s)
        and len(samples) < budget.max_repeats
        and time.perf_counter() - start < budget.max_s
    ):
        _reset_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return Timing.from_samples(samples)


def _triton_runs_natively() -> bool:
    if triton_interpreted():
        return False
    try:
        import triton.testing  # noqa: F401
    except Exception:  # noqa: BLE001  (a broken install may raise anything)
        return False
    return True


def time_cuda(fn: Callable[[], object], budget: TimingBudget, grad_to_none: Sequence[torch.Tensor] = ()) -> Timing:
    if _triton_runs_natively():
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(
            fn,
            warmup=max(1, int(budget.warmup_s * 1e3)),
            rep=max(1, int(budget.measure_s * 1e3)),
            grad_to_none=list(grad_to_none) or None,
            quantiles=[0.5, 0.2, 0.8],
        )
        return Timing(float(p50), float(p20), float(p80), 0)
    return _time_cuda_events(fn, budget, grad_to_none)


def _time_cuda_events(fn, budget: TimingBudget, grad_to_none) -> Timing:
    # 256 MB written between calls evicts the L2 cache, so every call starts cold, as do_bench does.
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize()
    per_call_ms = max(start.elapsed_time(end) / 3, 1e-3)
    warmup = max(1, int(budget.warmup_s * 1e3 / per_call_ms))
    repeats = min(budget.max_repeats, max(budget.min_repeats, int(budget.measure_s * 1e3 / per_call_ms)))
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        _reset_grads(grad_to_none)
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return Timing.from_samples([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])


def time_fn(
    fn: Callable[[], object],
    device: torch.device | str,
    budget: TimingBudget | None = None,
    grad_to_none: Sequence[torch.Tensor] = (),
) -> Timing:
    """Times ``fn`` on ``device`` (its work must run there); gradients of ``grad_to_none`` are reset before calls."""
    budget = budget or TimingBudget()
    if torch.device(device).type == "cuda":
        return time_cuda(fn, budget, grad_to_none)
    return time_cpu(fn, budget, grad_to_none)
