"""Triton decode attention: ``metagpt_fast::triton_decode_attention`` (kernels/triton/decode.py: split-KV programs per
(sequence, key head, split) with the GQA group packed into one tile, paged reads, an LSE-combine kernel). Inference
only: the public op refuses inputs that require grad, so the op has no autograd formula."""

from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from metagpt_fast._spec import MAX_GRID_YZ
from metagpt_fast.backends import triton as triton_backend
from metagpt_fast.kernels.triton import decode as kernels

# The largest head dim the kernel's register tiles are sized for (a (BLOCK_M, 256) accumulator at 4 warps).
MAX_HEAD_DIM = 256


@triton_op("metagpt_fast::triton_decode_attention", mutates_args=())
def decode_attention_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens: torch.Tensor,
    batch_idx: Optional[torch.Tensor], block_table: Optional[torch.Tensor], scale: float, window_left: int,
    window_right: int, softcap: float, alibi_slopes: Optional[torch.Tensor], num_splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(out (B, Nq, Hq, D), lse (B, Hq, Nq) float32)`` of q against the cache (see the kernel module)."""
    return kernels.decode_attention(
        q, k_cache, v_cache, seqlens, batch_idx, block_table, scale, window_left, window_right, softcap,
        alibi_slopes, num_splits, launch=wrap_triton,
    )  # fmt: skip


def decode_attention(q, k_cache, v_cache, seqlens, batch_idx, block_table, scale, window_left, window_right, softcap,
                     alibi_slopes, num_splits):  # fmt: skip
    return decode_attention_op(
        q, k_cache, v_cache, seqlens, batch_idx, block_table, scale, window_left, window_right, softcap,
        alibi_slopes, num_splits,
    )  # fmt: skip


def decode_reasons(q, k_cache, v_cache, seqlens, batch_idx, block_table, scale, window_left, window_right, softcap,
                   alibi_slopes, num_splits) -> list[str]:  # fmt: skip
    reasons = triton_backend.interpreter_reasons(q)
    if q.dtype == torch.bfloat16 and q.device.type == "cuda":
        reasons += triton_backend.bfloat16_reasons(q)
    b, nq, hq, d = q.shape
    group = hq // max(k_cache.shape[2], 1)
    if d > MAX_HEAD_DIM:
        reasons.append(f"head dim up to {MAX_HEAD_DIM}, got {d}")
    if nq * group > kernels.MAX_PACKED_ROWS:
        reasons.append(f"Nq * (Hq / Hk) up to {kernels.MAX_PACKED_ROWS} packed rows per tile, got {nq * group}")
    splits = num_splits if num_splits > 0 else 1
    if splits > MAX_GRID_YZ:
        reasons.append(f"num_splits up to {MAX_GRID_YZ} (CUDA grid limit), got {num_splits}")
    return reasons


# Priority 20 on CUDA, above the reference; the only decode kernel on GPUs.
triton_backend.register(
    "decode_attention", decode_attention, triton_backend.capabilities(), decode_reasons, priority=20
)
