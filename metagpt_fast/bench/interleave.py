"""Interleaved timing of the providers of one case, with per-round ratios and their confidence intervals.

On a shared machine the speed of a core drifts (other processes, frequency changes, the scheduler's quanta), so
timing each provider in a block of its own lands the drift on whichever provider was being timed. Here every
*round* calls each provider once, in an order that rotates from round to round, so drift hits all of them alike:

1. warm-up: each provider is called until ``min_warmup`` calls and ``warmup_s`` seconds are spent (interleaved);
2. rounds: one timed call per provider per round (the order rotates); a provider that raises leaves the rotation;
3. after ``min_rounds`` rounds (and then every quarter more), each tracked ratio ``t_baseline / t_provider`` is
   computed *per round* and its median gets a 95% bootstrap confidence interval (:func:`ratio_estimate`); the rounds
   stop when every interval is within ``±tolerance`` of its median, or at ``case_max_s`` seconds or ``max_rounds``;
4. a ratio whose interval is still wider than ``±tolerance`` is *noisy*: reported with its interval, not as a clean
   number.

The clock is the only device-specific part: :class:`CpuClock` (``time.perf_counter`` around the call) and
:class:`CudaEventClock` (CUDA events, the L2 cache flushed before each call, read once per round). Tests drive the
scheduler with a fake clock.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from metagpt_fast.bench.timing import TimingBudget

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 1000


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A median over rounds with its spread and a bootstrap confidence interval (same unit as the samples)."""

    median: float
    p20: float
    p80: float
    ci_low: float
    ci_high: float
    rounds: int

    @property
    def half_width(self) -> float:
        """The interval's largest distance from the median, relative to it (inf without a usable interval)."""
        if self.rounds < 3 or not self.median > 0:
            return float("inf")
        return max(self.median - self.ci_low, self.ci_high - self.median) / self.median

    def noisy(self, tolerance: float) -> bool:
        return not self.half_width <= tolerance


def estimate(samples: Sequence[float], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> Estimate:
    """Median, p20/p80 and the 95% percentile-bootstrap interval of the median of ``samples`` (deterministic: the
    resampling generator is seeded). Fewer than three samples give the range as the interval (and count as noisy)."""
    x = np.asarray(samples, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no samples")
    p20, median, p80 = np.percentile(x, [20, 50, 80])
    if x.size < 3:
        lo, hi = float(x.min()), float(x.max())
    else:
        rng = np.random.default_rng(seed)
        medians = np.median(x[rng.integers(0, x.size, size=(resamples, x.size))], axis=1)
        alpha = (1 - CONFIDENCE) / 2
        lo, hi = np.quantile(medians, [alpha, 1 - alpha])
    return Estimate(float(median), float(p20), float(p80), float(lo), float(hi), int(x.size))


def ratio_estimate(baseline: Sequence[float], provider: Sequence[float], seed: int = 0) -> Estimate:
    """The speedup ``baseline / provider`` of each round (same-round samples, so drift cancels), summarised."""
    b, p = np.asarray(baseline, dtype=np.float64), np.asarray(provider, dtype=np.float64)
    if b.shape != p.shape:
        raise ValueError(f"rounds differ: {b.shape} vs {p.shape}")
    return estimate(b / np.maximum(p, 1e-12), seed)


# ------------------------------------------------------------------------------------------------------- clocks


class CpuClock:
    """Wall-clock time of each call (``time.perf_counter``); a round needs no synchronisation."""

    def now(self) -> float:
        return time.perf_counter()

    def call(self, fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def read(self, handles: Sequence) -> list[float]:
        return [float(h) for h in handles]


class CudaEventClock:
    """CUDA events around each call, the L2 cache evicted before it (every call starts cold, as
    ``triton.testing.do_bench`` does); one synchronisation per round, when the round's times are read."""

    def __init__(self, flush_bytes: int = 256 * 1024 * 1024):
        self._flush = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")

    def now(self) -> float:
        return time.perf_counter()

    def call(self, fn: Callable[[], object]):
        self._flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        return start, end

    def read(self, handles: Sequence) -> list[float]:
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in handles]


def clock_for(device: torch.device | str):
    return CudaEventClock() if torch.device(device).type == "cuda" else CpuClock()


# ---------------------------------------------------------------------------------------------------- schedule


@dataclasses.dataclass
class Interleaved:
    """Per-provider times (ms) of the same rounds, the tracked ratios, and why the rounds stopped."""

    samples: dict[str, list[float]]
    ratios: dict[tuple[str, str], Estimate]  # (provider, baseline) -> speedup t_baseline / t_provider per round
    rounds: int
    stopped: str  # "converged", "time cap", "round cap"
    failures: dict[str, BaseException] = dataclasses.field(default_factory=dict)

    def noisy(self, tolerance: float) -> list[tuple[str, str]]:
        return [pair for pair, est in self.ratios.items() if est.noisy(tolerance)]


def _check_due(rounds: int, policy: TimingBudget, last: int) -> bool:
    return rounds >= policy.min_rounds and (last == 0 or rounds >= last + max(1, last // 4))


def interleave(
    calls: Mapping[str, Callable[[], object]],
    pairs: Sequence[tuple[str, str]],
    policy: TimingBudget,
    clock=None,
    before_call: Mapping[str, Callable[[], None]] | None = None,
    skip_warmup: Sequence[str] = (),
) -> Interleaved:
    """Times ``calls`` round-robin until every ``(provider, baseline)`` speedup in ``pairs`` has a tight interval.

    ``before_call[name]`` runs before each of that provider's calls, untimed (reset gradients);
    ``skip_warmup`` names providers that need none (a slow kernel whose parity run just warmed it up). A call that
    raises removes its provider (and the pairs that name it); the exception is in ``failures``.
    """
    clock = clock or CpuClock()
    before_call = before_call or {}
    live = list(calls)
    failures: dict[str, BaseException] = {}

    def run(name: str):
        prep = before_call.get(name)
        if prep is not None:
            prep()
        return clock.call(calls[name])

    def guarded(name: str) -> tuple[bool, object]:
        try:
            return True, run(name)
        except Exception as exc:  # noqa: BLE001  (reported per provider, never stops the others)
            failures[name] = exc
            return False, None

    # Warm-up, interleaved: every provider gets min_warmup calls, then round-robin until warmup_s is spent.
    started, done = clock.now(), 0
    need = {name: (0 if name in skip_warmup else policy.min_warmup) for name in live}
    while live:
        todo = [n for n in live if need[n] > done] or (
            [n for n in live if n not in skip_warmup] if clock.now() - started < policy.warmup_s else []
        )
        if not todo:
            break
        for name in todo:
            ok, handle = guarded(name)
            if ok:
                clock.read([handle])
            else:
                live.remove(name)
        done += 1

    samples: dict[str, list[float]] = {name: [] for name in live}
    ratios: dict[tuple[str, str], Estimate] = {}
    rounds, last_check, stopped = 0, 0, "round cap"
    started = clock.now()
    while live and rounds < policy.max_rounds:
        order = live[rounds % len(live) :] + live[: rounds % len(live)]  # rotate: no provider always goes first
        handles, ok = {}, True
        for name in order:
            ok_call, handles[name] = guarded(name)
            if not ok_call:
                live.remove(name)
                samples.pop(name)
                ok = False
        times = clock.read([handles[n] for n in order if n in live])
        if ok:  # a round with a failure is dropped, so the remaining samples stay paired
            for name, ms in zip([n for n in order if n in live], times, strict=True):
                samples[name].append(ms)
            rounds += 1
        tracked = [(p, b) for p, b in pairs if p in samples and b in samples and p != b]
        if _check_due(rounds, policy, last_check):
            last_check = rounds
            ratios = {(p, b): ratio_estimate(samples[b], samples[p]) for p, b in tracked}
            # Without a pair to compare (a provider alone), its own median time must be tight instead.
            checks = ratios.values() if tracked else [estimate(samples[n]) for n in live]
            if all(not est.noisy(policy.tolerance) for est in checks):
                stopped = "converged"
                break
        if clock.now() - started >= policy.case_max_s:
            stopped = "time cap"
            break
    tracked = [(p, b) for p, b in pairs if p in samples and b in samples and p != b and samples[p]]
    if rounds and (stopped != "converged" or set(ratios) != set(tracked)):
        ratios = {(p, b): ratio_estimate(samples[b], samples[p]) for p, b in tracked}
    return Interleaved(samples, ratios, rounds, stopped, failures)
