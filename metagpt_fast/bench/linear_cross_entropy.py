"""Linear + cross-entropy benchmark: the package's chunked loss against the unfused one and Liger-Kernel's.

The loss of an LM head, ``F.cross_entropy(F.linear(hidden, weight), targets)`` (mean over the rows, 10% of the rows
ignored), timed forward + backward to ``hidden`` and ``weight``. Providers: the registry's backends (the reference
is the unfused expression, with the softmax in float32), ``torch`` (exactly ``F.cross_entropy(F.linear(...))``, the
expression a model writes), and Liger-Kernel's fused linear cross-entropy on a GPU where it is installed. The
runner reports each provider's peak memory beyond its inputs next to its time: that is what the fused loss saves.
Work: the three products' FLOPs, ``2 * N * V * d`` each (one in the forward, two in the backward).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import metagpt_fast
from metagpt_fast.bench.core import (
    Case,
    Prepared,
    Provider,
    check_backend,
    functional,
    oracle_dtype,
    registry_providers,
    upcast,
)
from metagpt_fast.bench.suite import OpBench, cuda_package_unavailable
from metagpt_fast.ops import reference

IGNORED_SHARE = 0.1
# The float64 oracle at N x V logits holds several (N, V) float64 tensors: above this many logits on CPU (2 GiB each
# at the GPT-2 case's 4096 x 50257) the suite skips parity for the case rather than swap.
CPU_ORACLE_MAX_LOGITS = 2**26


def _rows(case: Case) -> int:
    return case.shape["N"]


def setup_lce(backend: str, case: Case, inputs: dict) -> Prepared:
    check_backend(
        "linear_cross_entropy", backend, hidden=inputs["hidden"], weight=inputs["weight"], targets=inputs["targets"],
        bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, softcap=None, chunk_size=None,
    )  # fmt: skip

    def forward(x):
        return (metagpt_fast.linear_cross_entropy(x["hidden"], x["weight"], x["targets"], backend=backend),)

    return functional(case, inputs, forward, ("hidden", "weight"))


def setup_torch(case: Case, inputs: dict) -> Prepared:
    def forward(x):
        return (F.cross_entropy(F.linear(x["hidden"], x["weight"]), x["targets"]),)

    return functional(case, inputs, forward, ("hidden", "weight"))


def setup_liger(case: Case, inputs: dict) -> Prepared:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def forward(x):
        return (liger_fused_linear_cross_entropy(x["hidden"], x["weight"], x["targets"]),)

    return functional(case, inputs, forward, ("hidden", "weight"))


class LinearCrossEntropyBench(OpBench):
    op = "linear_cross_entropy"
    unit = "flops"

    def cases(self, device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
        if torch.device(device).type == "cuda":
            shapes = [(8192, 50257, 768), (8192, 128256, 4096)]  # GPT-2 small at B x T = 8 x 1024; Llama-3-8B's head
        elif quick:
            shapes = [(256, 5003, 64)]
        else:
            shapes = [(1024, 50257, 768), (4096, 50257, 768)]  # GPT-2 small's head; the second is the CPU target
        return [
            Case(self.op, "fwd+bwd", (("N", n), ("V", v), ("d", d)), dtype, device, n * v <= 2**21)
            for dtype in dtypes
            for n, v, d in shapes
        ]

    def inputs(self, case: Case) -> dict:
        s = case.shape
        g = torch.Generator(case.device).manual_seed(0)
        hidden = torch.randn(s["N"], s["d"], generator=g, device=case.device)
        weight = torch.randn(s["V"], s["d"], generator=g, device=case.device) * s["d"] ** -0.5
        targets = torch.randint(0, s["V"], (s["N"],), generator=g, device=case.device)
        ignored = torch.rand(s["N"], generator=g, device=case.device) < IGNORED_SHARE
        return {
            "hidden": hidden.to(case.dtype),
            "weight": weight.to(case.dtype),
            "targets": targets.masked_fill(ignored, -100),
        }

    def providers(self, device: str) -> list[Provider]:
        return registry_providers(self.op, device, setup_lce) + [
            Provider("torch", "baseline", setup_torch),
            Provider("liger", "baseline", setup_liger, unavailable=cuda_package_unavailable("liger_kernel", device)),
        ]

    def oracle_too_large(self, case: Case) -> str | None:
        s = case.shape
        if torch.device(case.device).type == "cpu" and s["N"] * s["V"] > CPU_ORACLE_MAX_LOGITS:
            return f"the float64 oracle would hold several {s['N']} x {s['V']} tensors"
        return None

    def oracle(self, case: Case, inputs: dict) -> list[torch.Tensor]:
        def forward(x):
            return (reference.linear_cross_entropy(x["hidden"], x["weight"], x["targets"]),)

        x = upcast(inputs, oracle_dtype(case.dtype))
        return functional(case, x, forward, ("hidden", "weight"), grad_round_to=case.dtype).parity()

    def work(self, case: Case) -> float:
        s = case.shape
        return 3 * 2.0 * s["N"] * s["V"] * s["d"]


def compare_with_unfused(
    rows: int, vocab: int, d: int, backend: str, rounds: int, device: str = "cpu", chunk_size: int | None = None
) -> dict:
    """The issue's target measurement: ``backend``'s fused loss against ``F.cross_entropy(F.linear(...))``, forward
    + backward in float32, timed interleaved for ``rounds`` rounds (the runner's time cap would stop a 30-second
    call after one), with the median per-round speedup and its interval, and each one's peak memory beyond its
    inputs."""
    from metagpt_fast.bench.interleave import clock_for, interleave
    from metagpt_fast.bench.memory import peak_memory
    from metagpt_fast.bench.timing import TimingBudget

    case = Case("linear_cross_entropy", "fwd+bwd", (("N", rows), ("V", vocab), ("d", d)), torch.float32, device)
    inputs = LinearCrossEntropyBench().inputs(case)

    def step(loss_fn):
        def run():
            hidden, weight = (inputs[n].detach().requires_grad_() for n in ("hidden", "weight"))
            loss_fn(hidden, weight).backward()
            return hidden.grad, weight.grad

        return run

    calls = {
        "torch": step(lambda h, w: F.cross_entropy(F.linear(h, w), inputs["targets"])),
        backend: step(
            lambda h, w: metagpt_fast.linear_cross_entropy(h, w, inputs["targets"], chunk_size=chunk_size,
                                                           backend=backend)
        ),
    }  # fmt: skip
    budget = TimingBudget(warmup_s=0.0, min_warmup=1, min_rounds=rounds, max_rounds=rounds, case_max_s=float("inf"))
    timed = interleave(calls, [(backend, "torch")], budget, clock_for(device))
    speedup = timed.ratios[(backend, "torch")]
    peaks = {name: peak_memory(call, device) for name, call in calls.items()}
    return {
        "case": case.label,
        "threads": torch.get_num_threads(),
        "rounds": timed.rounds,
        "median_s": {name: float(np.median(ms)) / 1e3 for name, ms in timed.samples.items()},
        "speedup": speedup.median,
        "speedup_ci95": (speedup.ci_low, speedup.ci_high),
        "peak_mib": {name: None if p is None else p / 2**20 for name, p in peaks.items()},
        "peak_ratio": None if None in peaks.values() else peaks[backend] / peaks["torch"],
    }


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=compare_with_unfused.__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--chunk-size", type=int, default=None)
    args = parser.parse_args()
    result = compare_with_unfused(
        args.rows, args.vocab, args.dim, args.backend, args.rounds, args.device, args.chunk_size
    )
    print(json.dumps(result, indent=2))
