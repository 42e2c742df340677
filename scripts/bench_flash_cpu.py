"""CPU flash_attention (the C++ kernel of the ``cpu`` backend) against its baselines, interleaved rounds
(metagpt_fast.bench.interleave), forward + backward, ratios as medians over rounds with 95% intervals.

- ``window``: a causal sliding window of 256 at N=4096 (B=1, H=4, D=64, float32) through the kernel, against the same
  attention through a dense boolean mask (``metagpt_fast.scaled_dot_product_attention`` on the ``cpu`` backend, and
  torch's SDPA);
- ``varlen``: a packed batch of documents of unequal lengths (causal) against the sum of one call per document and
  against the padded batch (B documents padded to the longest; causal, so the padding needs no mask).

    python scripts/bench_flash_cpu.py [window|varlen] [--threads N] [--rounds N]
"""

from __future__ import annotations

import argparse

import torch

import metagpt_fast
from metagpt_fast.bench.interleave import interleave
from metagpt_fast.bench.timing import TimingBudget


def _step(fn, *tensors):
    def run():
        for t in tensors:
            t.grad = None
        fn().sum().backward()

    return run


def window_case(n: int = 4096, heads: int = 4, d: int = 64, w: int = 256):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, heads, d, generator=g).requires_grad_() for _ in range(3))
    qt, kt, vt = (torch.randn(1, heads, n, d, generator=g).requires_grad_() for _ in range(3))
    i = torch.arange(n)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - w)
    calls = {
        "flash cpu": _step(
            lambda: metagpt_fast.flash_attn_func(q, k, v, causal=True, window_size=(w, 0), backend="cpu"), q, k, v
        ),  # fmt: skip
        "dense mask cpu": _step(
            lambda: metagpt_fast.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, backend="cpu"), qt, kt, vt
        ),  # fmt: skip
        "torch sdpa mask": _step(
            lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask), qt, kt, vt
        ),
    }
    return calls, [("flash cpu", "dense mask cpu"), ("flash cpu", "torch sdpa mask")]


def varlen_case(lengths=(1500, 900, 700, 500, 300, 196), heads: int = 4, d: int = 64):
    g = torch.Generator().manual_seed(0)
    total, longest = sum(lengths), max(lengths)
    q, k, v = (torch.randn(total, heads, d, generator=g).requires_grad_() for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    docs = [tuple(torch.randn(1, n, heads, d, generator=g).requires_grad_() for _ in range(3)) for n in lengths]
    pq, pk, pv = (torch.randn(len(lengths), longest, heads, d, generator=g).requires_grad_() for _ in range(3))

    def per_document():
        for dq, dk, dv in docs:
            for t in (dq, dk, dv):
                t.grad = None
            metagpt_fast.flash_attn_func(dq, dk, dv, causal=True, backend="cpu").sum().backward()

    calls = {
        "packed": _step(
            lambda: metagpt_fast.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True, backend="cpu"),
            q,
            k,
            v,
        ),  # fmt: skip
        "per document": per_document,
        "padded": _step(lambda: metagpt_fast.flash_attn_func(pq, pk, pv, causal=True, backend="cpu"), pq, pk, pv),
    }
    return calls, [("packed", "per document"), ("packed", "padded")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=("window", "varlen"))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=10, help="minimum interleaved rounds")
    parser.add_argument("--max-s", type=float, default=120.0, help="time cap of the timed rounds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    calls, pairs = window_case() if args.case == "window" else varlen_case()
    policy = TimingBudget(warmup_s=0.0, min_warmup=1, min_rounds=args.rounds, max_rounds=200, case_max_s=args.max_s)
    result = interleave(calls, pairs, policy)
    print(f"{args.case}: {result.rounds} rounds ({result.stopped}), {args.threads} threads")
    for name, samples in result.samples.items():
        print(f"  {name:>16}: median {sorted(samples)[len(samples) // 2]:9.1f} ms")
    for (provider, baseline), est in result.ratios.items():
        print(
            f"  {baseline} / {provider}: {est.median:.2f}x  (95% CI {est.ci_low:.2f}-{est.ci_high:.2f}, "
            f"p20-p80 {est.p20:.2f}-{est.p80:.2f})"
        )
    for name, exc in result.failures.items():
        print(f"  {name} failed: {exc!r}")


if __name__ == "__main__":
    main()
