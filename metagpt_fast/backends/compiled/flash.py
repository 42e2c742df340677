"""Compiled flash attention over packed variable-length sequences: ``metagpt_fast::flash_attention_fwd`` /
``flash_attention_bwd`` on CPU (csrc/cpu/flash_cpu.cpp, tiled over OpenMP threads).

The CPU kernel serves float32 / bfloat16 / float16 (computing in float32), any head dims, sliding windows and causal
masks aligned to the bottom right, softcap, ALiBi and GQA / MQA. Key blocks entirely outside a query block's window
are never visited, forward and backward, so a window of ``w`` costs O(N w). Its backward accumulates dK / dV per
(sequence, kv head) task in the task's own buffers: the result does not depend on the thread count or scheduling
(``deterministic``). No dropout: the reference serves it.

On CUDA the mma.sync attention kernels (csrc/attention/, ``flash_attention_cuda.cpp``) serve dense-mapped calls
(every sequence of the batch the same length, what ``flash_attn_func`` and its packed forms produce) in float16 /
bfloat16 at head dims 64 and 128 (q, k and v alike): causal masks and windows aligned to the bottom right, softcap,
GQA / MQA, and a backward without atomics (``deterministic``). True variable lengths, ALiBi and dropout are refused
with their reasons, so ``auto`` takes Triton and ``backend="cuda"`` raises saying why.
"""

from __future__ import annotations

import torch

from metagpt_fast._spec import MAX_GRID_YZ
from metagpt_fast.backends import autograd, compiled


@torch.library.register_fake("metagpt_fast::flash_attention_fwd")
def _(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right,
    softcap, alibi_slopes, dropout_p, seed,
):  # fmt: skip
    total, heads, _ = q.shape
    return q.new_empty((total, heads, v.shape[-1])), q.new_empty((heads, total), dtype=torch.float32)


@torch.library.register_fake("metagpt_fast::flash_attention_bwd")
def _(
    grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
    window_left, window_right, softcap, alibi_slopes, dropout_p, seed,
):  # fmt: skip
    # Gradients come back contiguous (the kernel writes them densely).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


autograd.flash_attention("metagpt_fast::flash_attention_fwd", torch.ops.metagpt_fast.flash_attention_bwd)


def flash_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right,
    softcap, alibi_slopes, dropout_p, seed,
):  # fmt: skip
    return torch.ops.metagpt_fast.flash_attention_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
        window_right, softcap, alibi_slopes, dropout_p, seed,
    )  # fmt: skip


# CPU priority 10 (above the reference's 0, which materialises every score). Forward + backward, interleaved rounds,
# medians of per-round ratios (`python scripts/bench_flash_cpu.py window|varlen [--threads N]`), AVX-512 tile path,
# 2-core machine under load, float32: a causal window of 256 at N=4096 (B=1, H=4, D=64) runs 8.9x (1 thread: 13x)
# faster than the same attention through a dense bool mask on the cpu backend's attention kernel, 13x (19x) faster
# than torch's SDPA with that mask; a packed batch of 6 documents (4096 tokens, causal) costs 0.37x (1 thread: 0.91x)
# the sum of its per-document calls and runs 2.7x (3.4x) faster than the same documents padded to the longest.
CPU = dict(features=frozenset({"window", "softcap", "alibi", "gqa", "deterministic"}))

# Decided once at import (outside any torch.compile trace): the dispatcher lookup is not traceable.
_CUDA_KERNELS = compiled.has_cuda_kernel("flash_attention_fwd")
NO_CUDA_KERNELS = (
    "the compiled extension has no CUDA kernel for flash_attention (built without CUDA, or without "
    "csrc/attention/flash_attention_cuda.cpp)"
)


def cuda_reasons(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, *, kernels: bool = True) -> list[str]:
    """What the CUDA kernels cannot serve beyond the capabilities (``kernels``: whether the extension has them).

    They take one (B, H, N, D) problem: every sequence of the batch has ``max_seqlen_q`` queries and
    ``max_seqlen_k`` keys. For a validated call that is exactly ``total == B * max_seqlen`` on both sides (no
    sequence exceeds ``max_seqlen``, so the lengths sum to ``B * max_seqlen`` only when all are equal to it), decided
    from shapes alone, without reading ``cu_seqlens`` back from the GPU."""
    reasons = [] if kernels else [NO_CUDA_KERNELS]
    batch, hq = cu_seqlens_q.shape[0] - 1, q.shape[1]
    if q.shape[0] != batch * max_seqlen_q or k.shape[0] != batch * max_seqlen_k:
        reasons.append(
            f"variable-length sequences (the CUDA kernels take {batch} sequences of equal length: {q.shape[0]} "
            f"queries for max_seqlen_q {max_seqlen_q}, {k.shape[0]} keys for max_seqlen_k {max_seqlen_k})"
        )
    if batch > MAX_GRID_YZ or hq > MAX_GRID_YZ:
        reasons.append(f"batch and heads up to {MAX_GRID_YZ} (CUDA grid limit), got batch {batch}, heads {hq}")
    if max(max_seqlen_q, max_seqlen_k) >= 2**31 - 1:
        reasons.append(f"sequence lengths below 2**31 (32-bit positions), got {max(max_seqlen_q, max_seqlen_k)}")
    return reasons


def extra_reasons(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right,
    softcap, alibi_slopes, dropout_p,
) -> list[str]:  # fmt: skip
    if q.device.type != "cuda":  # the CPU kernel serves every valid input
        return []
    return cuda_reasons(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, kernels=_CUDA_KERNELS)


def cuda_priority(inputs) -> int:
    """30 (above Triton's 20) on sm_80-class GPUs, 15 (below it) on sm_90 and newer, where Triton's flash kernels
    run wgmma with TMA loads and these mma.sync. Static, as for the attention op (backends/compiled/attention.py):
    no GPU measurement of either order exists yet."""
    return 15 if torch.cuda.get_device_capability(inputs["q"].device) >= (9, 0) else 30


CUDA = dict(
    min_compute_capability=(8, 0),
    head_dims=(64, 128),
    dtypes=(torch.float16, torch.bfloat16),
    features=frozenset({"window", "softcap", "gqa", "deterministic"}),
)
compiled.register("flash_attention", flash_attention, extra_reasons, cpu=(10, CPU), cuda=(cuda_priority, CUDA))
