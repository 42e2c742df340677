"""CUDA C++ backend of the attention op: the fused kernels of csrc/attention/ behind ``metagpt_fast::attention_fwd``.

The op's CUDA kernel is registered by the compiled extension; its fake kernel and autograd formula (which calls
``attention_bwd`` with the saved ``out`` and ``lse``) by :mod:`metagpt_fast.ops.cpp`. Served: CUDA tensors of
compute capability >= 8.0, float16 / bfloat16, head dims 64 and 128 (query, key and value alike), any strides,
causal or not, GQA, dropout (the shared Philox stream), and boolean masks of any broadcastable shape (read through
broadcast strides, so a ``(B, 1, 1, Nk)`` key-padding mask is never materialised).
"""

from __future__ import annotations

import torch

from metagpt_fast import backends

HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)
_MAX_GRID_YZ = 65535  # batch and heads index the CUDA grid's z and y dimensions


def _kernels_missing_reason() -> str | None:
    """Why the compiled CUDA attention kernels cannot run in this process (None when they can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    from metagpt_fast import _extension

    if _extension.load() is None:
        return f"the compiled extension is unavailable: {_extension.unavailable_reason()}"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("metagpt_fast::attention_fwd", "CUDA"):
        return "the compiled extension was built without its CUDA part"
    return None


# Decided once at import (outside any torch.compile trace): loading the extension is not traceable.
_KERNELS_MISSING = _kernels_missing_reason()


def attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed):
    return torch.ops.metagpt_fast.attention_fwd(query, key, value, attn_mask, dropout_p, is_causal, scale, seed)[0]


def not_supported_reasons(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> list[str]:
    reasons = []
    if query.device.type != "cuda":
        reasons.append(f"needs CUDA tensors, got {query.device}")
    elif _KERNELS_MISSING is not None:
        reasons.append(_KERNELS_MISSING)
    elif (capability := torch.cuda.get_device_capability(query.device)) < MIN_CAPABILITY:
        reasons.append(f"needs compute capability >= 8.0 (mma.sync fp16/bf16), got {capability}")
    if query.dtype not in DTYPES:
        reasons.append(f"supports float16 and bfloat16, got {query.dtype}")
    d, dv = query.shape[-1], value.shape[-1]
    if d not in HEAD_DIMS or dv != d:
        reasons.append(f"compiled for head dims {HEAD_DIMS} with value's equal to query's, got {d} and {dv}")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            reasons.append(f"boolean masks only (additive masks go to another backend), got {attn_mask.dtype}")
    b, hq = query.shape[0], query.shape[1]
    if b > _MAX_GRID_YZ or hq > _MAX_GRID_YZ:
        reasons.append(f"batch and heads up to {_MAX_GRID_YZ} (CUDA grid limit), got batch {b}, heads {hq}")
    return reasons


backends.register("attention", "cuda", attention, not_supported_reasons, priority=30)
