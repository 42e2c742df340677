"""Triton flash attention over packed variable-length sequences (kernels/triton/flash.py): forward and backward
custom ops joined by the flash_attention autograd formula.

``metagpt_fast::triton_flash_attention_forward`` returns ``(out (Tq, Hq, Dv), lse (Hq, Tq) float32)``;
``metagpt_fast::triton_flash_attention_backward`` returns ``(dq, dk, dv)``. Both are ``torch.library.triton_op``s
whose kernels launch through ``wrap_triton``, so ``torch.compile`` traces them without graph breaks. Windows
(bottom-right aligned, causal included), softcap, ALiBi and GQA / MQA are served; dropout is not (the reference
serves it). The backward has no atomics: dK / dV of a GQA group are summed inside one program, so it is
bitwise repeatable (``deterministic``).
"""

from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from metagpt_fast._spec import MAX_GRID_YZ
from metagpt_fast.backends import autograd
from metagpt_fast.backends import triton as triton_backend
from metagpt_fast.kernels.triton import flash as kernels


@triton_op("metagpt_fast::triton_flash_attention_forward", mutates_args=())
def flash_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    dropout_p: float,
    seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``; arguments as in the flash_attention contract (``causal`` is already in ``window_right``,
    ``dropout_p`` is 0: the registry refuses dropout for this backend)."""
    total_q, hq, _ = q.shape
    # Zero-filled: rows of a sequence longer than max_seqlen_q would otherwise be left unwritten (the public function
    # checks the bound; the custom op may be called directly).
    out = q.new_zeros((total_q, hq, v.shape[-1]))
    lse = q.new_full((hq, total_q), float("inf"), dtype=torch.float32)
    kernels.flash_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right,
        softcap, alibi_slopes, out, lse, launch=wrap_triton,
    )  # fmt: skip
    return out, lse


@triton_op("metagpt_fast::triton_flash_attention_backward", mutates_args=())
def flash_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: Optional[torch.Tensor],
    dropout_p: float,
    seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` shaped like q, k and v (contiguous)."""
    grad_out = grad_out.contiguous()  # autograd may hand in an expanded or strided gradient
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=lse.device)
    kernels.flash_backward(
        grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
        window_left, window_right, softcap, alibi_slopes, dq, dk, dv, delta, launch=wrap_triton,
    )  # fmt: skip
    return dq, dk, dv


autograd.flash_attention("metagpt_fast::triton_flash_attention_forward", flash_attention_backward)


def flash_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right,
    softcap, alibi_slopes, dropout_p, seed,
):  # fmt: skip
    """The flash_attention op's contract (see ``ops/flash.py``): returns ``(out, lse)``."""
    return flash_attention_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
        window_right, softcap, alibi_slopes, dropout_p, seed,
    )  # fmt: skip


def extra_reasons(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left, window_right,
    softcap, alibi_slopes, dropout_p,
) -> list[str]:  # fmt: skip
    reasons = triton_backend.interpreter_reasons(q)
    batch, hq = cu_seqlens_q.shape[0] - 1, q.shape[1]
    if batch > MAX_GRID_YZ or hq > MAX_GRID_YZ:
        reasons.append(f"batch and heads up to {MAX_GRID_YZ} (CUDA grid limit), got batch {batch}, heads {hq}")
    if any(t.shape[-1] > 1 and t.stride(-1) != 1 for t in (q, k, v)):
        reasons.append("q, k and v need a contiguous last dim (stride 1)")
    if alibi_slopes is not None and alibi_slopes.stride(-1) != 1:
        reasons.append("alibi_slopes needs a contiguous last dim (stride 1)")
    if max(max_seqlen_q, max_seqlen_k) >= 2**31 - 1:
        reasons.append(f"sequence lengths below 2**31 (32-bit positions), got {max(max_seqlen_q, max_seqlen_k)}")
    return reasons


# Priority 20 on CUDA (above the cpu kernel, which never takes CUDA tensors, and the reference).
CAPABILITIES = triton_backend.capabilities(
    min_compute_capability=triton_backend.MIN_COMPUTE_CAPABILITY,
    max_head_dim=kernels.MAX_HEAD_DIM,
    features=frozenset({"window", "softcap", "alibi", "gqa", "deterministic"}),
)
triton_backend.register("flash_attention", flash_attention, CAPABILITIES, extra_reasons, priority=20)
