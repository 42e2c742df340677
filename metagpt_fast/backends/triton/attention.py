"""Triton backend of the attention op: forward and backward custom ops joined by ``register_autograd``.

``metagpt_fast::triton_attention_forward`` returns the output and the per-row base-2 log-sum-exp the backward needs;
``metagpt_fast::triton_attention_backward`` returns (dQ, dK, dV). Both are ``torch.library.triton_op``s whose kernels
launch through ``wrap_triton``, so ``torch.compile`` traces them (and Inductor sees the kernels) without graph breaks.
Gradients flow to query, key and value; an additive ``attn_mask`` is treated as a constant.
"""

import os
from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from metagpt_fast import backends
from metagpt_fast.kernels.triton import attention as kernels

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID_YZ = 65535  # CUDA's limit on the 2nd and 3rd grid dimensions (heads, batch)


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
    kernels.attention_backward(
        grad_out, query, key, value, out, lse, attn_mask, seed, dropout_p, is_causal, scale, dq, dk, dv, delta,
        launch=wrap_triton,
    )  # fmt: skip
    return dq, dk, dv


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, dropout_p, is_causal, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, attn_mask, seed)
    ctx.dropout_p, ctx.is_causal, ctx.scale = dropout_p, is_causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, out, lse, attn_mask, seed = ctx.saved_tensors
    dq, dk, dv = attention_backward(
        grad_out, query, key, value, out, lse, attn_mask, ctx.dropout_p, ctx.is_causal, ctx.scale, seed
    )
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd(
    "metagpt_fast::triton_attention_forward", _backward, setup_context=_setup_context
)


def attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed):
    """The attention op's contract (see ``ops/attention.py``): query (B, Hq, Nq, D), key (B, Hk, Nk, D),
    value (B, Hk, Nk, Dv) with any strides; returns (B, Hq, Nq, Dv). GQA follows from ``Hq // Hk``."""
    out, _ = attention_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, seed)
    return out


def not_supported_reasons(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> list[str]:
    reasons = []
    device = query.device.type
    if _INTERPRETED:
        if device != "cpu":
            reasons.append(f"TRITON_INTERPRET=1 runs Triton on CPU tensors only, got {device}")
    elif device != "cuda":
        reasons.append(f"needs CUDA tensors, got {device}")
    elif torch.cuda.get_device_capability(query.device) < (8, 0):
        reasons.append(f"needs compute capability >= 8.0, got {torch.cuda.get_device_capability(query.device)}")
    if query.dtype not in _DTYPES:
        reasons.append(f"supports float16, bfloat16 and float32, got {query.dtype}")
    elif query.dtype == torch.bfloat16 and _INTERPRETED:
        reasons.append("bfloat16 products are wrong under TRITON_INTERPRET (triton issue #11584)")
    d, dv = query.shape[-1], value.shape[-1]
    if d > kernels.MAX_HEAD_DIM or dv > kernels.MAX_HEAD_DIM:
        reasons.append(f"head dims up to {kernels.MAX_HEAD_DIM}, got query/key {d} and value {dv}")
    b, hq = query.shape[0], query.shape[1]
    if b > _MAX_GRID_YZ or max(hq, key.shape[1]) > _MAX_GRID_YZ:
        reasons.append(f"batch and heads up to {_MAX_GRID_YZ} (CUDA grid limit), got batch {b}, heads {hq}")
    if attn_mask is not None and attn_mask.requires_grad:
        reasons.append("no gradient with respect to attn_mask (it is read as a constant)")
    return reasons


backends.register("attention", "triton", attention, not_supported_reasons, priority=20, slow=_INTERPRETED)
