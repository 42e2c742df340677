"""The cpu backend's attention against torch's SDPA on CPU (its flash kernel), interleaved rounds
(metagpt_fast.bench.interleave): one JSON line per case with the median per-round speedup ``t_sdpa / t_cpu``, its 95%
interval, the rounds and both median times.

    python scripts/bench_attention_cpu.py [--mode fwd|fwd+bwd] [--threads N] [--dtypes float32,bfloat16]
        [--n 512,1024,2048] [--d 64,128] [--causal 0,1] [--b 1] [--h 8] [--case-s 4]

``METAGPT_FAST_CPU_TILES=0`` in the environment runs the kernel's portable (BLAS) path instead of the AVX-512 tiles,
so the two paths' ratios come from the same command (docs/benchmarks.md, "CPU attention against torch SDPA").
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

import metagpt_fast
from metagpt_fast.bench.interleave import interleave
from metagpt_fast.bench.timing import TimingBudget


def calls(q, k, v, causal: bool, mode: str):
    if mode == "fwd":

        def ours():
            with torch.no_grad():
                return metagpt_fast.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="cpu")

        def sdpa():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        return ours, sdpa
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    go = torch.randn_like(q)

    def ours():
        out = metagpt_fast.scaled_dot_product_attention(*leaves, is_causal=causal, backend="cpu")
        torch.autograd.grad(out, leaves, go)

    def sdpa():
        out = F.scaled_dot_product_attention(*leaves, is_causal=causal)
        torch.autograd.grad(out, leaves, go)

    return ours, sdpa


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtypes", default="float32")
    p.add_argument("--n", type=ints, default=[512, 1024, 2048])
    p.add_argument("--d", type=ints, default=[64, 128])
    p.add_argument("--causal", type=ints, default=[0, 1])
    p.add_argument("--b", type=int, default=1)
    p.add_argument("--h", type=int, default=8)
    p.add_argument("--case-s", type=float, default=4.0, help="time cap of one case's rounds (seconds)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    budget = TimingBudget(warmup_s=0.2, min_rounds=10, max_rounds=200, case_max_s=a.case_s, tolerance=0.03)
    tiles_allowed = os.environ.get("METAGPT_FAST_CPU_TILES", "1") != "0"  # used where the CPU has AVX-512
    for dtype, n, d, causal in itertools.product(a.dtypes.split(","), a.n, a.d, a.causal):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(a.b, a.h, n, d, generator=g).to(getattr(torch, dtype)) for _ in range(3))
        ours, sdpa = calls(q, k, v, bool(causal), a.mode)
        res = interleave({"sdpa": sdpa, "cpu": ours}, [("cpu", "sdpa")], budget)
        est = res.ratios[("cpu", "sdpa")]
        ms = {name: float(np.median(s)) for name, s in res.samples.items()}
        row = dict(
            tiles_allowed=tiles_allowed, mode=a.mode, threads=a.threads, dtype=dtype, B=a.b, H=a.h, N=n, D=d,
            causal=bool(causal),
            ratio=round(est.median, 3), lo=round(est.ci_low, 3), hi=round(est.ci_high, 3), rounds=est.rounds,
            sdpa_ms=round(ms["sdpa"], 3), cpu_ms=round(ms["cpu"], 3),
        )  # fmt: skip
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
