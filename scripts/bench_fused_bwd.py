"""Triton attention backward on a GPU: the split kernels against the fused kernel (deterministic and atomic dQ).

For each shape, one forward, then the backward custom op timed under each ``METAGPT_FAST_ATTENTION_BACKWARD`` mode in
interleaved rounds (split, fused, fused_atomic, split, ...; CUDA events around each call after warm-up), and the
median time of each mode with its ratio to the split kernels' median in the same run. One JSON line per (shape,
mode). Modes whose fused kernel has no tile for the shape (kernels/triton/attention_fused_bwd.py, ``plan``) run the
split kernels and are marked ``"fused": false``.

    python scripts/bench_fused_bwd.py [--rounds 20] > fused_bwd.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the source tree's package, installed or not

MODES = ("split", "fused", "fused_atomic")
# (batch, query heads, kv heads, length, head dim, causal)
SHAPES = [
    (4, 16, 16, 2048, 64, True),
    (4, 16, 16, 2048, 128, True),
    (1, 32, 8, 8192, 64, True),
    (1, 32, 8, 8192, 128, True),
    (4, 16, 16, 2048, 128, False),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("needs a CUDA GPU and TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    from metagpt_fast.backends.triton import attention as backend
    from metagpt_fast.kernels.triton import attention_fused_bwd as fused

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    backward = torch.ops.metagpt_fast.triton_attention_backward.default
    for b, hq, hk, n, d, causal in SHAPES:
        q = torch.randn(b, hq, n, d, device="cuda", dtype=dtype)
        k, v = (torch.randn(b, hk, n, d, device="cuda", dtype=dtype) for _ in range(2))
        scale = d**-0.5
        out, lse = backend.attention_forward(q, k, v, None, 0.0, causal, scale, None)
        grad_out = torch.randn_like(out)
        call = (grad_out, q, k, v, out, lse, None, 0.0, causal, scale, None)
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for round_ in range(args.warmup + args.rounds):
            for mode in MODES:
                os.environ[fused.ENV_VAR] = mode
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                backward(*call)
                end.record()
                end.synchronize()
                if round_ >= args.warmup:
                    times[mode].append(start.elapsed_time(end))
        base = statistics.median(times["split"])
        for mode in MODES:
            median = statistics.median(times[mode])
            row = {
                "b": b, "hq": hq, "hk": hk, "n": n, "d": d, "causal": causal, "dtype": args.dtype, "mode": mode,
                "fused": fused.select(q, k, v, None, 0.0, mode) is not None, "median_ms": round(median, 4),
                "ratio_to_split": round(median / base, 4), "rounds": args.rounds,
            }  # fmt: skip
            print(json.dumps(row), flush=True)
    os.environ.pop(fused.ENV_VAR, None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
