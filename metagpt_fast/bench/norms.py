"""LayerNorm benchmark: the package's fused LayerNorm (forward, and forward + backward with the weight and bias
gradients) against torch's own ``F.layer_norm`` kernel.

Throughput is the bytes the op must move: forward reads ``x`` and writes ``y``; the backward reads ``x`` and ``dy``
and writes ``dx`` (the parameters are negligible). ``python -m metagpt_fast.bench.norms`` times one shape, fwd+bwd,
interleaved against torch (``metagpt_fast.bench.interleave``) and prints the speedup per round's median and its 95%
interval.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import metagpt_fast
from metagpt_fast.bench.core import Case, Prepared, Provider, check_backend, functional, registry_providers, upcast
from metagpt_fast.bench.interleave import clock_for, interleave
from metagpt_fast.bench.suite import OpBench
from metagpt_fast.bench.timing import TimingBudget
from metagpt_fast.ops.reference import norms as reference_norms

TORCH = "torch"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def layer_norm_bytes(rows: int, width: int, itemsize: int, mode: str) -> float:
    """x in and y out (forward); x, dy in and dx out (backward)."""
    one = float(rows * width * itemsize)
    return {"fwd": 2 * one, "fwd+bwd": 5 * one}[mode]


def setup_layer_norm(backend: str, case: Case, inputs: dict) -> Prepared:
    n = case.shape["N"]
    check_backend("layer_norm", backend, input=inputs["x"], normalized_shape=(n,), weight=inputs["weight"],
                  bias=inputs["bias"], eps=1e-5, residual=None)  # fmt: skip

    def forward(x):
        return (metagpt_fast.layer_norm(x["x"], n, x["weight"], x["bias"], backend=backend),)

    return functional(case, inputs, forward, ("x", "weight", "bias"))


def setup_torch(case: Case, inputs: dict) -> Prepared:
    n = case.shape["N"]

    def forward(x):
        return (F.layer_norm(x["x"], (n,), x["weight"], x["bias"]),)

    return functional(case, inputs, forward, ("x", "weight", "bias"))


class LayerNormBench(OpBench):
    op = "layer_norm"
    unit = "bytes"

    def cases(self, device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
        if torch.device(device).type == "cuda":
            shapes = [(16384, 768), (8192, 4096)] if quick else [(16384, 768), (8192, 4096), (4096, 8192)]
        elif quick:
            shapes = [(256, 61), (1024, 768)]
        else:
            shapes = [(8192, 768), (2048, 4096)]
        return [
            Case(self.op, mode, (("M", m), ("N", n)), dtype, device, interpret_ok=(m, n) == shapes[0])
            for dtype in dtypes
            for mode in ("fwd", "fwd+bwd")
            for m, n in shapes
        ]

    def inputs(self, case: Case) -> dict:
        m, n = case.shape["M"], case.shape["N"]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(m, n, generator=g)
        weight, bias = 1 + 0.1 * torch.randn(n, generator=g), 0.1 * torch.randn(n, generator=g)
        return {k: v.to(case.device, case.dtype) for k, v in dict(x=x, weight=weight, bias=bias).items()}

    def providers(self, device: str) -> list[Provider]:
        return registry_providers(self.op, device, setup_layer_norm) + [Provider(TORCH, "baseline", setup_torch)]

    def oracle(self, case: Case, inputs: dict) -> list[torch.Tensor]:
        n = case.shape["N"]

        def forward(x):
            return (reference_norms.layer_norm(x["x"], (n,), x["weight"], x["bias"]),)

        up = torch.float64 if case.dtype == torch.float32 else torch.float32
        return functional(case, upcast(inputs, up), forward, ("x", "weight", "bias"), grad_round_to=case.dtype).parity()

    def work(self, case: Case) -> float:
        itemsize = torch.empty(0, dtype=case.dtype).element_size()
        return layer_norm_bytes(case.shape["M"], case.shape["N"], itemsize, case.mode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="LayerNorm fwd+bwd: the package's kernel against torch's")
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="default: what auto picks for the input")
    parser.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd+bwd")
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    case = Case("layer_norm", args.mode, (("M", args.rows), ("N", args.width)), DTYPES[args.dtype], args.device)
    bench = LayerNormBench()
    inputs = bench.inputs(case)
    backend = args.backend or metagpt_fast.backends.select(
        "layer_norm", None, input=inputs["x"], normalized_shape=(args.width,), weight=inputs["weight"],
        bias=inputs["bias"], eps=1e-5, residual=None,
    ).backend  # fmt: skip
    prepared = {backend: setup_layer_norm(backend, case, inputs), TORCH: setup_torch(case, inputs)}
    resets = {}
    for name, p in prepared.items():
        resets[name] = lambda leaves=p.grad_to_none: [setattr(t, "grad", None) for t in leaves]
    budget = TimingBudget(min_warmup=3, warmup_s=1.0, min_rounds=20, max_rounds=400, case_max_s=args.max_seconds)
    result = interleave(
        {n: p.run for n, p in prepared.items()}, [(backend, TORCH)], budget, clock_for(args.device), resets
    )
    ratio = result.ratios[(backend, TORCH)]
    medians = {n: sorted(s)[len(s) // 2] for n, s in result.samples.items()}
    print(
        f"layer_norm {args.mode} ({args.rows}, {args.width}) {args.dtype} on {args.device}: {backend} "
        f"{medians[backend]:.3f} ms, torch {medians[TORCH]:.3f} ms; speedup vs torch {ratio.median:.2f}x "
        f"(95% CI {ratio.ci_low:.2f}-{ratio.ci_high:.2f}, {result.rounds} interleaved rounds, {result.stopped})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
