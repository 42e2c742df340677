"""Attention benchmark: the package's backends against torch SDPA (each of its kernels), FlexAttention and
flash-attn, forward / backward / forward+backward, causal and not.

GPU shapes follow flash-attention's benchmark: 16k tokens per batch (B = 16384 / N) and model width 2048
(H = 2048 / D), so every N does comparable work per token.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import torch
import torch.nn.functional as F

import metagpt_fast
from metagpt_fast.bench import formulas
from metagpt_fast.bench.core import (
    BASELINE_SDPA,
    Case,
    Prepared,
    Provider,
    Skipped,
    Unsupported,
    check_backend,
    functional,
    oracle_dtype,
    registry_providers,
    upcast,
)
from metagpt_fast.bench.suite import OpBench, cuda_package_unavailable
from metagpt_fast.ops.reference.attention import attention as reference_attention

# torch SDPA kernels benchmarked one by one (names of torch.nn.attention.SDPBackend).
SDPA_KERNELS = {
    "math": "MATH",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
}
# Bytes per score element the explicit reference keeps alive (float32 scores, exp, probabilities, their gradients,
# plus the low-precision probabilities): 12 for a forward, 20 with the backward.
DENSE_BYTES_PER_SCORE = {"fwd": 12, "bwd": 20, "fwd+bwd": 20}


def _dense_limit_bytes(device: str) -> int:
    if torch.device(device).type == "cuda":
        return int(0.4 * torch.cuda.get_device_properties(device).total_memory)
    return 4 * 2**30  # the CPU machines are shared: keep the explicit N x N paths small


def dense_scores_bytes(case: Case) -> int:
    s = case.shape
    return s["B"] * s["H"] * s["N"] * s["N"] * DENSE_BYTES_PER_SCORE[case.mode]


def setup_attention(backend: str, case: Case, inputs: dict) -> Prepared:
    """One of the package's backends, called through the public op with an explicit ``backend=``."""
    s = case.shape
    if backend == "reference":
        _check_dense(case)
    check_backend(
        "attention",
        backend,
        query=inputs["q"],
        key=inputs["k"],
        value=inputs["v"],
        attn_mask=None,
        dropout_p=0.0,
        is_causal=s["causal"],
        scale=1.0 / math.sqrt(s["D"]),
        enable_gqa=False,
    )

    def forward(x):
        return (
            metagpt_fast.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=s["causal"], backend=backend),
        )

    return functional(case, inputs, forward, ("q", "k", "v"))


def _check_dense(case: Case) -> None:
    need, limit = dense_scores_bytes(case), _dense_limit_bytes(case.device)
    if need > limit:
        raise Skipped(f"materialises the N x N scores: ~{need / 2**30:.0f} GiB > {limit / 2**30:.0f} GiB limit")


def setup_sdpa(kernel: str | None, case: Case, inputs: dict) -> Prepared:
    """torch's SDPA, left to its own dispatch (``kernel`` None) or pinned to one kernel with ``sdpa_kernel``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    causal = case.shape["causal"]
    if kernel == "math":
        _check_dense(case)

    def context():
        return sdpa_kernel([getattr(SDPBackend, SDPA_KERNELS[kernel])]) if kernel else contextlib.nullcontext()

    def forward(x):
        with context():
            return (F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=causal),)

    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        try:  # torch explains a refused kernel in warnings, then raises "No available kernel"
            probe = {k: v[:1, :1] for k, v in inputs.items()}
            forward(probe)
        except RuntimeError as exc:
            reasons = [str(w.message).splitlines()[0] for w in caught] or [str(exc).splitlines()[0]]
            raise Unsupported("; ".join(reasons)) from None
    return functional(case, inputs, forward, ("q", "k", "v"))


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # One compilation per shape and mask (dynamic=False, as FlexAttention is benchmarked); the suite needs more of
    # them than dynamo's default limit of 8, past which it would silently fall back to eager.
    for limit in ("recompile_limit", "cache_size_limit"):  # the name changed in torch 2.6; set whichever exists
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 128))
    return torch.compile(flex_attention, dynamic=False)


def setup_flex(case: Case, inputs: dict) -> Prepared:
    from torch.nn.attention.flex_attention import create_block_mask

    s = case.shape
    block_mask = None
    if s["causal"]:
        block_mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, s["N"], s["N"], device=case.device)
    flex = _compiled_flex()

    def forward(x):
        return (flex(x["q"], x["k"], x["v"], block_mask=block_mask),)

    return functional(case, inputs, forward, ("q", "k", "v"))


def setup_flash_attn(case: Case, inputs: dict) -> Prepared:
    from flash_attn import flash_attn_func

    if case.dtype not in (torch.float16, torch.bfloat16):
        raise Unsupported(f"flash-attn runs float16 / bfloat16 only, not {case.dtype}")
    causal = case.shape["causal"]

    def forward(x):  # flash-attn's layout is (B, N, H, D): transposed views, no copies
        q, k, v = (x[n].transpose(1, 2) for n in ("q", "k", "v"))
        return (flash_attn_func(q, k, v, causal=causal).transpose(1, 2),)

    return functional(case, inputs, forward, ("q", "k", "v"))


def _flex_unavailable(device: str) -> str | None:
    try:
        import torch.nn.attention.flex_attention
    except ImportError as exc:
        return f"FlexAttention is not in this torch ({exc})"
    if torch.device(device).type != "cuda":
        return "FlexAttention is benchmarked compiled on GPUs only (on CPU its compile time would dominate the suite)"
    return None


class AttentionBench(OpBench):
    op = "attention"
    unit = "flops"
    sdpa_baseline = BASELINE_SDPA

    def cases(self, device: str, dtypes: list[torch.dtype], quick: bool) -> list[Case]:
        if torch.device(device).type == "cuda":
            modes = ("fwd", "fwd+bwd") if quick else ("fwd", "bwd", "fwd+bwd")
            seqs = (1024, 2048, 4096, 8192, 16384) if quick else (512, 1024, 2048, 4096, 8192, 16384)
            shapes = [(16384 // n, 2048 // d, n, d) for d in (64, 128) for n in seqs]
            causals = (False, True)
        elif quick:
            modes, causals = ("fwd", "fwd+bwd"), (True,)
            shapes = [(1, 2, n, 32) for n in (64, 128)]
        else:  # causal only: MetaGPT's case, and half the minutes on a 2-core machine
            modes, causals = ("fwd", "bwd", "fwd+bwd"), (True,)
            shapes = [(1, 4, n, 64) for n in (128, 256, 512, 1024)]
        smallest = min(n for _, _, n, _ in shapes)
        return [
            Case(
                self.op,
                mode,
                (("B", b), ("H", h), ("N", n), ("D", d), ("causal", causal)),
                dtype,
                device,
                interpret_ok=n == smallest,
            )
            # Shortest sequences first across every mode and flag: a run cut by --max-seconds still covers them all
            # (the tables sort by mode and flags again).
            for dtype in dtypes
            for b, h, n, d in sorted(shapes, key=lambda shape: shape[2])
            for mode in modes
            for causal in causals
        ]

    def inputs(self, case: Case) -> dict:
        s = case.shape
        g = torch.Generator(case.device).manual_seed(0)
        shape = (s["B"], s["H"], s["N"], s["D"])
        return {n: torch.randn(shape, generator=g, device=case.device).to(case.dtype) for n in ("q", "k", "v")}

    def providers(self, device: str) -> list[Provider]:
        from torch.nn.attention import SDPBackend

        providers = registry_providers(self.op, device, setup_attention)
        providers.append(Provider(BASELINE_SDPA, "baseline", functools.partial(setup_sdpa, None)))
        for kernel, enum_name in SDPA_KERNELS.items():
            name = f"{BASELINE_SDPA}-{kernel}"
            if not hasattr(SDPBackend, enum_name):
                providers.append(
                    Provider(name, "baseline", None, unavailable=f"this torch has no SDPBackend.{enum_name}")
                )
            elif torch.device(device).type != "cuda" and kernel in ("efficient", "cudnn"):
                providers.append(Provider(name, "baseline", None, unavailable=f"torch's {kernel} kernel is CUDA only"))
            else:
                providers.append(Provider(name, "baseline", functools.partial(setup_sdpa, kernel)))
        providers.append(Provider("flex", "baseline", setup_flex, unavailable=_flex_unavailable(device)))
        providers.append(
            Provider(
                "flash-attn", "baseline", setup_flash_attn, unavailable=cuda_package_unavailable("flash_attn", device)
            )
        )
        return providers

    def oracle(self, case: Case, inputs: dict) -> list[torch.Tensor]:
        causal = case.shape["causal"]

        def forward(x):
            return (reference_attention(x["q"], x["k"], x["v"], is_causal=causal),)

        x = upcast(inputs, oracle_dtype(case.dtype))
        return functional(case, x, forward, ("q", "k", "v"), grad_round_to=case.dtype).parity()

    def oracle_too_large(self, case: Case) -> str | None:
        need, limit = dense_scores_bytes(case), _dense_limit_bytes(case.device)
        if need > limit:
            return f"the reference would materialise ~{need / 2**30:.0f} GiB of scores (limit {limit / 2**30:.0f} GiB)"
        return None

    def work(self, case: Case) -> float:
        s = case.shape
        return formulas.attention_flops(s["B"], s["H"], s["N"], s["N"], s["D"], causal=s["causal"], mode=case.mode)
