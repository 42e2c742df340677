"""Compiled attention: ``metagpt_fast::attention_fwd`` / ``attention_bwd`` on CPU (csrc/cpu/attention_cpu.cpp, tiled
flash attention over OpenMP threads) and CUDA (csrc/attention/, mma.sync kernels).

The CUDA kernels serve compute capability >= 8.0, float16 / bfloat16, head dims 64 and 128 (query, key and value
alike), any strides, causal or not, GQA, dropout (the shared Philox stream), and boolean masks of any broadcastable
shape (read through broadcast strides, so a ``(B, 1, 1, Nk)`` key-padding mask is never materialised).
"""

from __future__ import annotations

import torch

from metagpt_fast._spec import MAX_GRID_YZ
from metagpt_fast.backends import autograd, compiled, measured


def lse_shape(q: torch.Tensor, attn_mask: torch.Tensor | None) -> tuple[int, ...]:
    """Shape of the saved row statistics: the log-sum-exp ``(B, Hq, Nq)``, or with an additive mask
    ``(2, B, Hq, Nq)``: the row maximum and the log of the row sum apart, so rows of scores near float32's extremes
    (a mask at ``finfo.min``) keep their sum (the CPU kernel; the CUDA kernels take boolean masks only)."""
    b, h, n, _ = q.shape
    return (2, b, h, n) if attn_mask is not None and attn_mask.dtype != torch.bool else (b, h, n)


@torch.library.register_fake("metagpt_fast::attention_fwd")
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, seed):
    b, h, n, _ = q.shape
    return q.new_empty((b, h, n, v.shape[-1])), q.new_empty(lse_shape(q, attn_mask), dtype=torch.float32)


@torch.library.register_fake("metagpt_fast::attention_bwd")
def _(grad_out, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, seed):
    # Gradients come back contiguous (the kernels write them densely).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


autograd.attention("metagpt_fast::attention_fwd", torch.ops.metagpt_fast.attention_bwd)


def attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed):
    return torch.ops.metagpt_fast.attention_fwd(query, key, value, attn_mask, dropout_p, is_causal, scale, seed)[0]


# Decided once at import (outside any torch.compile trace): the dispatcher lookup is not traceable.
_CUDA_KERNELS = compiled.has_cuda_kernel("attention_fwd")


def extra_reasons(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> list[str]:
    if query.device.type != "cuda":
        return []
    reasons = [] if _CUDA_KERNELS else ["the compiled extension was built without its CUDA attention kernels"]
    b, hq = query.shape[0], query.shape[1]
    if b > MAX_GRID_YZ or hq > MAX_GRID_YZ:
        reasons.append(f"batch and heads up to {MAX_GRID_YZ} (CUDA grid limit), got batch {b}, heads {hq}")
    return reasons


def cuda_priority(inputs) -> int:
    """The measured priority where ``measured_speed.json`` has the input's size class (backends/measured.py), else
    30 (above Triton's 20) on sm_80-class GPUs, 15 (below it) on sm_90 and newer.

    On Hopper, Triton's kernels use wgmma and TMA, while these use mma.sync (ldmatrix, two cp.async stages, 2 CTAs per
    SM, 0.3 to 0.8 shared-memory loads per mma: docs/cuda-attention.md), which cannot reach Hopper's tensor-core
    rate; on sm_80-class parts mma.sync is the tensor-core instruction for both. Static figures only: no GPU
    measurement exists yet for either order.
    """
    static = 15 if torch.cuda.get_device_capability(inputs["query"].device) >= (9, 0) else 30
    return measured.attention_priority("cuda", static, inputs)


def cpu_priority(inputs) -> int:
    """The measured priority where ``measured_speed.json`` has the input's size class (its speedups over the
    reference are written there, per class), else 10. The table ranks the reference first only for bfloat16 at
    D=128 without causal at small N (0.85-0.89x: the reference's bf16 matmuls run oneDNN's bf16 kernels, these tiles
    compute in float32); everywhere else measured this kernel wins, 1.1x to 19x (float32 forward 1.7x at N=128, 3.5x
    at 512, 6.1x at 2048, D=64, 1 thread)."""
    return measured.attention_priority("cpu", 10, inputs)


CPU = dict(features=frozenset({"dropout", "bool_mask", "additive_mask", "gqa"}))
CUDA = dict(
    min_compute_capability=(8, 0),
    head_dims=(64, 128),
    dtypes=(torch.float16, torch.bfloat16),
    features=frozenset({"dropout", "bool_mask", "gqa"}),
)
compiled.register("attention", attention, extra_reasons, cpu=(cpu_priority, CPU), cuda=(cuda_priority, CUDA))
