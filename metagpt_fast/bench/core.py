"""What a benchmark is made of: cases, providers, prepared callables and measurements.

A *case* is one op at one shape, dtype, device and mode (``fwd``, ``bwd``, ``fwd+bwd``, or ``train`` for the
training step). A *provider* is something that can run the op: a backend of the registry (``reference``,
``triton``, ``cuda``, ``cpu``) or an external baseline (``torch-sdpa``, FlexAttention, flash-attn, Liger-Kernel).
``provider.setup(case, inputs)`` returns a :class:`Prepared`: the callable to time, and a parity callable that
returns the outputs (and gradients) for the same inputs, compared against the reference run in higher precision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from metagpt_fast import backends
from metagpt_fast.bench.timing import Timing
from metagpt_fast.testing import (
    ATOL,
    RTOL,
    max_error,
    oracle_dtype,  # noqa: F401 (the benches take the oracle's precision from here)
    parity_atol,
)

BASELINE_SDPA = "torch-sdpa"


class Unsupported(Exception):
    """A provider cannot run this case (its message says why); not an error."""


class Skipped(Unsupported):
    """A provider could run this case but is not run at this size (its message says why: memory, time)."""


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    mode: str
    dims: tuple[tuple[str, Any], ...]  # ordered (name, value) pairs: sizes and flags, e.g. (("B", 2), ("causal", True))
    dtype: torch.dtype
    device: str
    # Small enough to run interpreted Triton for its parity check (on CPU it is never timed).
    interpret_ok: bool = False

    @property
    def shape(self) -> dict[str, Any]:
        return dict(self.dims)

    @property
    def label(self) -> str:
        parts = []
        for name, value in self.dims:
            if isinstance(value, bool):
                if value:
                    parts.append(name)
            else:
                parts.append(f"{name}={value}")
        return " ".join(parts)

    @property
    def seq_len(self) -> int | None:
        shape = self.shape
        return shape.get("N", shape.get("T"))

    def group_key(self) -> tuple:
        """The case without its sequence length (and batch, which may shrink as N grows): one line of a plot."""
        rest = tuple((k, v) for k, v in self.dims if k not in ("N", "T", "B"))
        return (self.op, self.mode, str(self.dtype), rest)


@dataclasses.dataclass
class Prepared:
    run: Callable[[], object]  # the work to time
    parity: Callable[[], list[torch.Tensor]]  # outputs (+ gradients) on the case's inputs, in a fixed order
    grad_to_none: Sequence[torch.Tensor] = ()  # leaves whose .grad is reset between timed calls


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    kind: str  # "backend" (the package's registry) or "baseline" (external)
    setup: Callable[[Case, dict], Prepared] | None
    # Interpreted Triton: correct but slow, so only its parity is measured ("parity only").
    slow: bool = False
    # Why the provider cannot run on this machine at all (None: it can).
    unavailable: str | None = None


@dataclasses.dataclass
class Measurement:
    case: Case
    provider: str
    kind: str
    status: str  # "ok", "parity only", "unsupported", "failed", "skipped"
    note: str = ""
    timing: Timing | None = None
    work: float | None = None  # FLOPs, bytes or tokens per call, in the op's throughput unit
    max_err: float | None = None  # max over errors
    errors: list[float] | None = None  # max |output - oracle| per output / gradient, in the parity order
    atols: list[float] | None = None  # the parity rule's floor per tensor (metagpt_fast.testing.parity_atol)
    # float32/float64: every element within the fixed atol + rtol that the rule falls back on without a reference
    within_tolerance: bool | None = None
    parity_violation: bool = False  # set by the runner's parity rule; parity_note says which bound was passed
    parity_note: str = ""
    slack: float = 0.0  # the op's extra absolute tolerance in the parity rule
    peak_bytes: int | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # e.g. {"mfu": 0.41, "tflops": 120.0}
    # Interleaved timing: speedup metric ("speedup_vs_reference", ...) -> per-round ratio estimate with its interval
    ratios: dict = dataclasses.field(default_factory=dict)
    noisy: list[str] = dataclasses.field(default_factory=list)  # the ratio metrics whose interval stayed > ±tolerance
    rounds: int | None = None  # interleaved rounds the timing took
    samples_ms: list[float] = dataclasses.field(default_factory=list)  # the per-round times behind ``timing``


def compare(
    outputs: Sequence[torch.Tensor],
    oracle: Sequence[torch.Tensor],
    dtype: torch.dtype,
    m: Measurement,
    slack: float = 0.0,
):
    """Fills ``m``'s parity fields from a provider's outputs and the oracle's (same order, same shapes); ``slack`` is
    the op's documented extra absolute tolerance (``OpBench.parity_slack``)."""
    if len(outputs) != len(oracle):
        raise AssertionError(f"returned {len(outputs)} tensors, the reference {len(oracle)}")
    for out, ref in zip(outputs, oracle, strict=True):
        if out.shape != ref.shape:
            raise AssertionError(f"output shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    m.errors = [max_error(out, ref) for out, ref in zip(outputs, oracle, strict=True)]
    m.atols = [parity_atol(ref, dtype) for ref in oracle]
    m.slack = slack
    m.max_err = max(m.errors, default=0.0)
    if dtype in (torch.float32, torch.float64):  # the fixed tolerance, for a run without a reference measurement
        m.within_tolerance = all(
            bool(
                torch.isclose(
                    out.double(), ref.double(), rtol=RTOL[dtype], atol=ATOL[dtype] + slack, equal_nan=True
                ).all()
            )
            for out, ref in zip(outputs, oracle, strict=True)
        )


def grad_outputs(outputs: Sequence[torch.Tensor], round_to: torch.dtype | None = None) -> list[torch.Tensor]:
    """Fixed pseudo-random output gradients, the same for every provider of a case (seeded per output index).

    ``round_to``: round through this dtype first, so an upcast oracle sees exactly the case's low-precision values.
    """
    grads = []
    for i, out in enumerate(outputs):
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1234 + i), dtype=torch.float32)
        grads.append(g.to(round_to or out.dtype).to(out.device, out.dtype))
    return grads


def functional(
    case: Case,
    inputs: dict,
    forward: Callable[[dict], Sequence[torch.Tensor]],
    diff: Sequence[str],
    grad_round_to: torch.dtype | None = None,
) -> Prepared:
    """:class:`Prepared` for a functional op: ``forward(inputs) -> outputs``; ``diff`` names the inputs that get
    gradients in the ``bwd`` and ``fwd+bwd`` modes; ``grad_round_to``: see :func:`grad_outputs`."""
    if case.mode == "fwd":
        return Prepared(run=lambda: forward(inputs), parity=lambda: [o.detach() for o in forward(inputs)])
    x = dict(inputs)
    leaves = [x[name].detach().requires_grad_() for name in diff]
    x.update(zip(diff, leaves, strict=True))

    def parity() -> list[torch.Tensor]:
        outs = list(forward(x))
        grads = torch.autograd.grad(outs, leaves, grad_outputs(outs, grad_round_to), allow_unused=True)
        return [o.detach() for o in outs] + [
            torch.zeros_like(v) if g is None else g for v, g in zip(leaves, grads, strict=True)
        ]

    state: dict[str, Any] = {}  # output gradients made once, outside the timed work

    if case.mode == "fwd+bwd":

        def run() -> None:
            outs = list(forward(x))
            if "grads" not in state:
                state["grads"] = grad_outputs(outs)
            torch.autograd.backward(outs, state["grads"])

        return Prepared(run=run, parity=parity, grad_to_none=leaves)
    if case.mode == "bwd":

        def run_backward() -> None:
            if "outs" not in state:  # one forward; the timed calls replay its backward
                state["outs"] = list(forward(x))
                state["grads"] = grad_outputs(state["outs"])
            torch.autograd.backward(state["outs"], state["grads"], retain_graph=True)

        return Prepared(run=run_backward, parity=parity, grad_to_none=leaves)
    raise ValueError(f"mode {case.mode!r} is not a functional mode")


def registry_providers(op: str, device: str, setup: Callable[[str, Case, dict], Prepared]) -> list[Provider]:
    """One provider per backend of the registry: runnable ones, and the others with the reason they cannot run."""
    available = backends.available_backends()
    impls = {impl.backend: impl for impl in backends.implementations(op)}
    providers = []
    for name in backends.BACKENDS:
        if available[name] is not None:
            providers.append(Provider(name, "backend", None, unavailable=available[name]))
        elif name not in impls:
            providers.append(Provider(name, "backend", None, unavailable=f"no implementation of {op}"))
        else:
            # Interpreted Triton (the only Triton a CPU-only machine has): checked for parity, never timed as if fast.
            providers.append(Provider(name, "backend", _bind(setup, name), slow=impls[name].slow))
    return providers


def _bind(setup, name):
    return lambda case, inputs: setup(name, case, inputs)


def upcast(inputs: dict, dtype: torch.dtype) -> dict:
    """The inputs with every floating tensor converted to ``dtype`` (the oracle's copy)."""
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def check_backend(op: str, backend: str, **inputs) -> None:
    """Raises :class:`Unsupported` with the registry's reasons when ``backend`` cannot serve ``inputs``."""
    try:
        backends.select(op, backend, **inputs)
    except ValueError as exc:
        raise Unsupported(str(exc)) from None
