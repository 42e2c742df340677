"""Triton linear + cross-entropy: ``metagpt_fast::triton_linear_cross_entropy``, chunked over rows. Per chunk, the
logits come from a matrix product (torch's cuBLAS), the kernel of ``kernels/triton/linear_cross_entropy.py`` turns
them into each row's loss and, in place, the logit gradient, and two more products give the chunk's gradients of
``hidden`` and ``weight``. The autograd formula is ``backends/autograd.py``'s (gradients from the forward for a
reduced loss, recomputed for reduction none)."""

from typing import Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from metagpt_fast.backends import autograd
from metagpt_fast.backends import triton as triton_backend
from metagpt_fast.kernels.triton import linear_cross_entropy as kernels

NONE, MEAN = 0, 1


def default_chunk_size(rows: int, vocab: int, d: int) -> int:
    """Liger-Kernel's choice: about as many logits per chunk as ``hidden`` has elements (a power of two of rows),
    so the chunk's logits cost no more memory than the input."""
    return min(max(rows, 1), triton.next_power_of_2(triton.cdiv(rows, max(1, triton.cdiv(vocab, max(d, 1))))))


@triton_op("metagpt_fast::triton_linear_cross_entropy", mutates_args=())
def linear_cross_entropy_forward(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor],
    grad_rows: Optional[torch.Tensor], ignore_index: int, reduction: int, label_smoothing: float, softcap: float,
    chunk_size: int, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(loss, dhidden, dweight, dbias) as ``metagpt_fast::linear_cross_entropy`` (csrc/cpu/linear_cross_entropy_cpu.cpp)
    defines them: loss float32, () or (N,) for reduction none; an unwanted gradient is an empty tensor."""
    rows, d = hidden.shape
    vocab = weight.shape[0]
    f32 = torch.float32
    valid = (targets != ignore_index).sum()
    # mean: each row's gradient divided by the rows counted (a device scalar folded into the rows' factors).
    grad_scale = 1.0
    rows_scale = None if grad_rows is None else grad_rows.reshape(rows).to(f32)
    if reduction == MEAN and (grad_hidden or grad_weight or grad_bias):
        inv = 1.0 / valid.to(f32)
        rows_scale = inv.expand(rows) if rows_scale is None else rows_scale * inv
    if rows_scale is not None:
        rows_scale = rows_scale.contiguous()
    losses = torch.empty(rows, device=hidden.device, dtype=f32)
    low = hidden.dtype != f32
    dh = torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0)
    dw = torch.zeros(vocab, d, device=hidden.device, dtype=f32) if grad_weight else weight.new_empty(0)
    db = torch.zeros(vocab, device=hidden.device, dtype=f32) if grad_bias else hidden.new_empty(0)
    grads = grad_hidden or grad_weight or grad_bias
    wt = weight.t()
    for r0 in range(0, rows, chunk_size):
        r1 = min(rows, r0 + chunk_size)
        h = hidden[r0:r1]
        z = torch.addmm(bias, h, wt) if bias is not None else torch.mm(h, wt)
        kernels.cross_entropy_rows(
            z, targets[r0:r1], losses[r0:r1], None if rows_scale is None else rows_scale[r0:r1], grad_scale,
            ignore_index, label_smoothing, softcap, grads, launch=wrap_triton,
        )  # fmt: skip
        if grad_hidden:
            torch.mm(z, weight, out=dh[r0:r1])
        if grad_weight:
            if low:  # the chunk's product in the inputs' dtype, added into the float32 sum (no float32 copy)
                dw.add_(torch.mm(z.t(), h))
            else:
                dw.addmm_(z.t(), h)
        if grad_bias:
            db += z.sum(0, dtype=f32)
    if low:
        dw = dw.to(weight.dtype) if grad_weight else dw
        db = db.to(hidden.dtype) if grad_bias else db
    if reduction == NONE:
        loss = losses
    else:
        loss = losses.sum(dtype=torch.float64)
        loss = (loss / valid if reduction == MEAN else loss).to(f32)
    return loss, dh, dw, db


_call = autograd.linear_cross_entropy("metagpt_fast::triton_linear_cross_entropy", linear_cross_entropy_forward)


def linear_cross_entropy(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, softcap, chunk_size):
    rows, d = hidden.shape
    chunk = default_chunk_size(rows, weight.shape[0], d) if chunk_size is None else chunk_size
    return _call(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, softcap, chunk)


def linear_cross_entropy_reasons(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, softcap,
                                 chunk_size) -> list[str]:  # fmt: skip
    # The row pass reads every logit of a chunk row with 32-bit column offsets.
    reasons = triton_backend.bfloat16_reasons(hidden)
    if weight.shape[0] >= 2**31:
        reasons.append(f"vocabulary below 2**31, got {weight.shape[0]}")
    return reasons


# Priority 30 on CUDA, above the compiled backends; interpreted Triton is never picked by auto.
triton_backend.register(
    "linear_cross_entropy", linear_cross_entropy, triton_backend.capabilities(), linear_cross_entropy_reasons,
    priority=30,
)  # fmt: skip
