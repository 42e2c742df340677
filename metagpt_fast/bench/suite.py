"""The interface every op's benchmark implements (one module per op: attention, positional, rotary, train_step)."""

from __future__ import annotations

import abc

import torch

from metagpt_fast.bench.core import Case, Provider
from metagpt_fast.bench.timing import Timing


def cuda_package_unavailable(module: str, device: str) -> str | None:
    """Why the CUDA-only baseline package ``module`` cannot run on ``device`` (None when it can)."""
    if torch.device(device).type != "cuda":
        return f"{module} needs a CUDA GPU"
    try:
        __import__(module)
    except Exception as exc:  # noqa: BLE001  (a broken install may raise anything)
        return f"{module} is not installed ({type(exc).__name__})"
    return None


# Throughput units: (results-file metric, divisor from work per second, column header).
UNITS = {
    "flops": ("tflops", 1e12, "TFLOP/s"),
    "bytes": ("gb_per_s", 1e9, "GB/s"),
    "tokens": ("tokens_per_s", 1.0, "tokens/s"),
}


class OpBench(abc.ABC):
    """One op's benchmark: its cases per device, inputs, providers, parity oracle and work formula."""

    op: str
    unit: str  # a key of UNITS: what ``work`` counts
    # Provider whose time is the "vs SDPA" denominator, if the op has such a baseline.
    sdpa_baseline: str | None = None

    @abc.abstractmethod
    def cases(self, device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
        """The suite for ``device`` (``quick``: the CI-sized one), in table order."""

    @abc.abstractmethod
    def inputs(self, case: Case) -> dict:
        """The case's input tensors, seeded: every provider of a case runs on the same values."""

    @abc.abstractmethod
    def providers(self, device: str) -> list[Provider]:
        """The registry's backends and the external baselines, runnable or with the reason they are not."""

    @abc.abstractmethod
    def oracle(self, case: Case, inputs: dict) -> list[torch.Tensor]:
        """Outputs (+ gradients) of the reference in higher precision, in the providers' parity order."""

    @abc.abstractmethod
    def work(self, case: Case) -> float:
        """FLOPs, bytes or tokens of one call, in the unit ``self.unit``."""

    def oracle_too_large(self, case: Case) -> str | None:
        """Why the higher-precision reference cannot run at this size (memory), or None."""
        return None

    def parity_slack(self, case: Case, inputs: dict) -> float:
        """Extra absolute tolerance the test suite grants this op on top of ``ATOL`` (with its reason), or 0."""
        return 0.0

    def extra_metrics(self, case: Case, timing: Timing) -> dict[str, float]:
        """Additional results (e.g. MFU) from a timing."""
        return {}


def throughput(bench: OpBench, case: Case, ms: float) -> float:
    """Work per second of one call that took ``ms`` milliseconds, in the op's unit (TFLOP/s, GB/s, tokens/s)."""
    return bench.work(case) / (ms * 1e-3) / UNITS[bench.unit][1]
