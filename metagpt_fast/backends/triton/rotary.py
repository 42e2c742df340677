"""Triton rotary embedding: ``metagpt_fast::triton_rotary`` (its backward is itself with ``conjugate`` flipped) and
``metagpt_fast::triton_rotary_``, which rotates q and k in place (inference)."""

from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from metagpt_fast._spec import MAX_GRID_YZ
from metagpt_fast.backends import autograd
from metagpt_fast.backends import triton as triton_backend
from metagpt_fast.backends.triton.positional import position_reasons
from metagpt_fast.kernels.triton import rotary as kernels


@triton_op("metagpt_fast::triton_rotary", mutates_args=())
def rotary_forward(
    q: torch.Tensor, k: torch.Tensor, position_ids: Optional[torch.Tensor], offset: int, rotary_dim: int,
    base: float, interleaved: bool, conjugate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Rotated copies of q (B, Hq, T, D) and k (B, Hk, T, D), contiguous; ``conjugate`` rotates by -theta."""
    return kernels.rotary_forward(
        q, k, position_ids, offset, rotary_dim, base, interleaved, conjugate, launch=wrap_triton
    )


@triton_op("metagpt_fast::triton_rotary_", mutates_args=("q", "k"))
def rotary_inplace(
    q: torch.Tensor, k: torch.Tensor, position_ids: Optional[torch.Tensor], offset: int, rotary_dim: int,
    base: float, interleaved: bool,
) -> None:  # fmt: skip
    """Rotates q and k in place (features past ``rotary_dim`` are not touched)."""
    kernels.rotary_launch(
        q, k, q, k, position_ids, offset, rotary_dim, base, interleaved, False, True, launch=wrap_triton
    )


autograd.rotary("metagpt_fast::triton_rotary", rotary_forward)


def rotary(q, k, position_ids, offset, rotary_dim, base, interleaved, inplace):
    if inplace:
        rotary_inplace(q, k, position_ids, offset, rotary_dim, base, interleaved)
        return q, k
    return rotary_forward(q, k, position_ids, offset, rotary_dim, base, interleaved, False)


def rotary_reasons(q, k, position_ids, offset, rotary_dim, base, interleaved, inplace) -> list[str]:
    # Explicit position ids are not range-checked here: that would read them back from the device on every call.
    reasons = triton_backend.bfloat16_reasons(q)
    if position_ids is None:
        reasons += position_reasons(offset + q.shape[2] - 1)
    if q.shape[0] > MAX_GRID_YZ:
        reasons.append(f"batch up to {MAX_GRID_YZ} (CUDA grid limit), got {q.shape[0]}")
    if inplace and q is k:
        reasons.append("inplace=True with q and k the same tensor would rotate it twice")
    if inplace and max((t.shape[-1] - 1) * t.stride(-1) for t in (q, k)) >= 2**31:
        reasons.append("inplace=True needs (head_dim - 1) * feature stride < 2**31 (32-bit column offsets)")
    return reasons


# Priority 30 on CUDA, above the compiled CUDA kernel (25): see backends/triton/positional.py.
triton_backend.register("rotary", rotary, triton_backend.capabilities(), rotary_reasons, priority=30)
