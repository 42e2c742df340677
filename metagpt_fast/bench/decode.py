"""Decode benchmark: one query token per sequence against a KV cache of N tokens (``flash_attn_with_kvcache``),
against torch's SDPA on the same cache.

The cache is preallocated in flash-attn's layout ``(B, N, Hk, D)`` and full (``cache_seqlens = N``); the baseline
runs ``torch.nn.functional.scaled_dot_product_attention`` on the sliced cache viewed as ``(B, Hk, N, D)`` (no
copy), with ``enable_gqa`` when ``Hq != Hk``. Throughput is the K/V bytes read per second (decode is bound by them);
``tokens_per_s`` (sequences served per second: one token each) comes with it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import metagpt_fast
from metagpt_fast.bench.core import (
    BASELINE_SDPA,
    Case,
    Prepared,
    Provider,
    check_backend,
    functional,
    oracle_dtype,
    registry_providers,
    upcast,
)
from metagpt_fast.bench.suite import OpBench
from metagpt_fast.bench.timing import Timing
from metagpt_fast.ops.reference import kvcache as reference

REGISTRY_OP = "decode_attention"


def _registry_inputs(inputs: dict) -> dict:
    q, k_cache = inputs["q"], inputs["k_cache"]
    return dict(q=q, k_cache=k_cache, v_cache=inputs["v_cache"], seqlens=inputs["seqlens"], batch_idx=None,
                block_table=None, scale=q.shape[-1] ** -0.5, window_left=-1, window_right=-1, softcap=0.0,
                alibi_slopes=None, num_splits=0)  # fmt: skip


def setup_decode(backend: str, case: Case, inputs: dict) -> Prepared:
    check_backend(REGISTRY_OP, backend, **_registry_inputs(inputs))

    def forward(x):
        out = metagpt_fast.flash_attn_with_kvcache(
            x["q"], x["k_cache"], x["v_cache"], cache_seqlens=x["seqlens"], backend=backend
        )
        return (out,)

    return functional(case, inputs, forward, ())


def setup_sdpa(case: Case, inputs: dict) -> Prepared:
    n, gqa = case.shape["N"], case.shape["Hq"] != case.shape["Hk"]

    def forward(x):
        k, v = x["k_cache"][:, :n].transpose(1, 2), x["v_cache"][:, :n].transpose(1, 2)
        out = F.scaled_dot_product_attention(x["q"].transpose(1, 2), k, v, enable_gqa=gqa)
        return (out.transpose(1, 2),)

    return functional(case, inputs, forward, ())


class DecodeBench(OpBench):
    op = "decode"  # the bench's name (``--ops decode``); the registry's op is REGISTRY_OP
    unit = "bytes"
    sdpa_baseline = BASELINE_SDPA

    def cases(self, device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
        if torch.device(device).type == "cuda":
            shapes, contexts = ((1, 32, 8, 128), (8, 32, 8, 128)), (512, 2048, 8192, 32768)
        elif quick:
            shapes, contexts = ((1, 8, 8, 64),), (256, 1024)
        else:  # Nq = 1 against 8k keys is the CPU target (>= 1.5x SDPA); smaller contexts show the trend
            shapes, contexts = ((1, 8, 8, 64), (1, 32, 8, 128), (4, 32, 8, 64)), (512, 2048, 8192)
        return [
            Case(self.op, "fwd", (("B", b), ("Hq", hq), ("Hk", hk), ("N", n), ("D", d)), dtype, device, n <= 512)
            for dtype in dtypes
            for b, hq, hk, d in shapes
            for n in contexts
        ]

    def inputs(self, case: Case) -> dict:
        s = case.shape
        g = torch.Generator(case.device).manual_seed(0)

        def randn(*shape):
            return torch.randn(shape, generator=g, device=case.device).to(case.dtype)

        return dict(
            q=randn(s["B"], 1, s["Hq"], s["D"]),
            k_cache=randn(s["B"], s["N"], s["Hk"], s["D"]),
            v_cache=randn(s["B"], s["N"], s["Hk"], s["D"]),
            seqlens=torch.full((s["B"],), s["N"], dtype=torch.int32, device=case.device),
        )

    def providers(self, device: str) -> list[Provider]:
        return registry_providers(REGISTRY_OP, device, setup_decode) + [Provider(BASELINE_SDPA, "baseline", setup_sdpa)]

    def oracle(self, case: Case, inputs: dict) -> list[torch.Tensor]:
        x = upcast(inputs, oracle_dtype(case.dtype))
        out, _ = reference.decode_attention(
            x["q"], x["k_cache"], x["v_cache"], x["seqlens"], scale=case.shape["D"] ** -0.5
        )
        return [out]

    def work(self, case: Case) -> float:
        s = case.shape
        itemsize = torch.empty(0, dtype=case.dtype).element_size()
        return 2 * s["B"] * s["N"] * s["Hk"] * s["D"] * itemsize  # K and V, read once

    def extra_metrics(self, case: Case, timing: Timing) -> dict[str, float]:
        return {"tokens_per_s": case.shape["B"] / (timing.median_ms * 1e-3)}
