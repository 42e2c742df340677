"""Triton attention: forward and backward custom ops joined by the attention autograd formula.

``metagpt_fast::triton_attention_forward`` returns the output and the per-row base-2 log-sum-exp the backward needs;
``metagpt_fast::triton_attention_backward`` returns (dQ, dK, dV). Both are ``torch.library.triton_op``s whose kernels
launch through ``wrap_triton``, so ``torch.compile`` traces them (and Inductor sees the kernels) without graph breaks.
Gradients flow to query, key and value; an additive ``attn_mask`` is treated as a constant.
"""

from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from metagpt_fast._spec import MAX_GRID_YZ
from metagpt_fast.backends import autograd, measured
from metagpt_fast.backends import triton as triton_backend
from metagpt_fast.kernels.triton import attention as kernels
from metagpt_fast.kernels.triton import attention_fused_bwd as fused_bwd


@triton_op("metagpt_fast::triton_attention_forward", mutates_args=())
def attention_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: float,
    seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Hq, Nq, Dv), lse (1 or 2, B, Hq, Nq) float32)``; arguments as in :func:`attention`."""
    b, hq, nq, _ = query.shape
    out = query.new_empty((b, hq, nq, value.shape[-1]))
    lse = query.new_empty((kernels.lse_rows(attn_mask), b, hq, nq), dtype=torch.float32)
    kernels.attention_forward(
        query, key, value, attn_mask, out, lse, seed, dropout_p, is_causal, scale, launch=wrap_triton
    )
    return out, lse


@triton_op("metagpt_fast::triton_attention_backward", mutates_args=())
def attention_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: float,
    seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dQ, dK, dV)`` shaped like query, key and value (contiguous)."""
    dq = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    dk = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    dv = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    delta = torch.empty(lse.shape[1:], dtype=torch.float32, device=lse.device)
    # The split kernels, or the fused 5-product kernel where METAGPT_FAST_ATTENTION_BACKWARD asks for it and it has a
    # spill-free tile (deterministic unless atomics are asked for): kernels/triton/attention_fused_bwd.py.
    fused = fused_bwd.select(query, key, value, attn_mask, dropout_p)
    if fused is not None:
        fused_bwd.attention_backward(
            grad_out, query, key, value, out, lse, attn_mask, seed, dropout_p, is_causal, scale, dq, dk, dv, delta,
            *fused, launch=wrap_triton,
        )  # fmt: skip
        return dq, dk, dv
    kernels.attention_backward(
        grad_out, query, key, value, out, lse, attn_mask, seed, dropout_p, is_causal, scale, dq, dk, dv, delta,
        launch=wrap_triton,
    )  # fmt: skip
    return dq, dk, dv


autograd.attention("metagpt_fast::triton_attention_forward", attention_backward)


def attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed):
    """The attention op's contract (see ``ops/attention.py``): query (B, Hq, Nq, D), key (B, Hk, Nk, D),
    value (B, Hk, Nk, Dv) with any strides; returns (B, Hq, Nq, Dv). GQA follows from ``Hq // Hk``."""
    out, _ = attention_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, seed)
    return out


def extra_reasons(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> list[str]:
    reasons = triton_backend.interpreter_reasons(query)
    b, hq = query.shape[0], query.shape[1]
    if b > MAX_GRID_YZ or max(hq, key.shape[1]) > MAX_GRID_YZ:
        reasons.append(f"batch and heads up to {MAX_GRID_YZ} (CUDA grid limit), got batch {b}, heads {hq}")
    return reasons


# Priority 20: above the cpu kernels (which never take CUDA tensors anyway) and, on sm_90, above the mma.sync CUDA
# kernel, whose static figures (254 registers, 3+ shared-memory wavefronts per mma) put it below Triton's wgmma
# kernels there; see backends/compiled/attention.py for the ranking on sm_80.
CAPABILITIES = triton_backend.capabilities(
    min_compute_capability=triton_backend.MIN_COMPUTE_CAPABILITY,
    max_head_dim=kernels.MAX_HEAD_DIM,
    features=frozenset({"dropout", "bool_mask", "additive_mask", "gqa"}),
)
triton_backend.register(
    "attention", attention, CAPABILITIES, extra_reasons,
    priority=lambda inputs: measured.attention_priority("triton", 20, inputs),  # the measured class first
)  # fmt: skip
