"""Cross-entropy of a chunk of logits and its logit gradient, in place (Liger-Kernel's fused linear cross-entropy).

The chunked op (``backends/triton/linear_cross_entropy.py``) computes one chunk of logits ``z = h W^T + b`` with a
matrix product, then one program per row here: the softcap ``c * tanh(z / c)``, an online max / sum of
``exp(z - max)`` over blocks of the row (float32), the row's loss

    loss = lse - (1 - eps) z[t] - eps * mean(z)          (label smoothing eps, torch's definition)

and, when gradients are wanted, the logit gradient written over the logits:

    dz_j = scale * (softmax(z)_j - eps / V - (1 - eps) [j == t]) * (1 - (z_j / c)^2 with a softcap)

``scale`` is the loss's own factor (1 / rows counted for a mean) times the row's upstream gradient when one is
given (the backward pass of reduction none). Rows whose target is ``ignore_index`` get loss 0 and a zero gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metagpt_fast._spec import triton_interpreted

# Blocks of up to 8192 logits on 32 warps (8 per thread). Liger-Kernel's 32768 on 32 warps spills with gradients
# on sm_90 (64 registers, 40-432 bytes of stack, devtools/aot.py); 16384 still spills 56 bytes in float32; 8192
# does not (64 registers fp32, 50 bf16) and a V = 50257 row takes 7 blocks.
MAX_BLOCK = 8192
NUM_WARPS = 32


@triton.jit
def _tanh(x):
    # |x| >= 0.25: 1 - 2 / (exp(2|x|) + 1), with the sign (exp overflowing to inf gives 1); its absolute rounding
    # error (~1e-7) is a few ulps of |tanh| >= 0.24 there. Below, the odd Taylor series to x^9 (next term < 1e-8
    # relative), so logits near 0 keep their relative precision too.
    a = tl.abs(x)
    large = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    x2 = x * x
    small = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, small, large)
    return tl.where(x < 0, -t, t)


@triton.jit
def _capped(z, cap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        z = cap * _tanh(z / cap)
    return z


@triton.jit
def _cross_entropy_rows_kernel(
    logits_ptr,  # (rows, V), row stride stride_row: read, then overwritten by the gradient when GRADS
    stride_row,
    targets_ptr,  # (rows,) int64
    rows_scale_ptr,  # (rows,) float32 upstream gradient of each row (HAS_ROWS)
    losses_ptr,  # (rows,) float32
    V,
    ignore_index,
    grad_scale,
    eps,
    cap,
    SOFTCAP: tl.constexpr,
    SMOOTH: tl.constexpr,
    GRADS: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    cols = tl.arange(0, BLOCK)
    if target == ignore_index:
        if GRADS:
            for start in range(0, V, BLOCK):
                offs = start + cols
                tl.store(row_ptr + offs, tl.zeros([BLOCK], dtype=tl.float32).to(logits_ptr.dtype.element_ty),
                         mask=offs < V)  # fmt: skip
        tl.store(losses_ptr + row, 0.0)
        return

    # Online max and sum of exp over the row's blocks.
    m = -float("inf")
    s = 0.0
    total = 0.0
    for start in range(0, V, BLOCK):
        offs = start + cols
        mask = offs < V
        z = _capped(tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32), cap, SOFTCAP)
        z = tl.where(mask, z, -float("inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        if SMOOTH:
            total += tl.sum(tl.where(mask, z, 0.0), axis=0)
    lse = m + tl.log(s)
    z_target = _capped(tl.load(row_ptr + target).to(tl.float32), cap, SOFTCAP)
    loss = lse - (1.0 - eps) * z_target
    if SMOOTH:
        loss -= eps * (total / V)

    if GRADS:
        scale = grad_scale
        if HAS_ROWS:
            scale *= tl.load(rows_scale_ptr + row)
        smooth = eps / V
        # exp(z - m) / s rather than exp(z - lse): the rounding of lse (~|lse| ulps) would scale the whole row's
        # probabilities alike, that of 1 / s is one ulp.
        inv_s = 1.0 / s
        for start in range(0, V, BLOCK):
            offs = start + cols
            mask = offs < V
            z = _capped(tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32), cap, SOFTCAP)
            g = tl.exp(z - m) * inv_s - smooth - tl.where(offs == target, 1.0 - eps, 0.0)
            if SOFTCAP:
                t = z / cap
                g = g * (1.0 - t * t)
            tl.store(row_ptr + offs, (scale * g).to(logits_ptr.dtype.element_ty), mask=mask)
    tl.store(losses_ptr + row, loss)


KERNELS = {"cross_entropy_rows": _cross_entropy_rows_kernel}


def _identity(kernel):
    return kernel


def block_size(vocab: int) -> int:
    """Logits per block of the row pass: the whole row up to ``MAX_BLOCK``; under the interpreter 256 up to
    V = 2048 and 1024 above, so test rows span several blocks at a few NumPy calls per block."""
    if triton_interpreted():
        return min(256 if vocab <= 2048 else 1024, triton.next_power_of_2(max(vocab, 1)))
    return min(MAX_BLOCK, triton.next_power_of_2(max(vocab, 1)))


def cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    losses: torch.Tensor,
    rows_scale: torch.Tensor | None,
    grad_scale: float,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    grads: bool,
    *,
    launch=_identity,
) -> None:
    """Writes each row's loss into ``losses`` (float32) and, with ``grads``, the logit gradient over ``logits``
    ``(rows, V)`` (unit column stride), scaled by ``grad_scale`` and ``rows_scale`` (float32 per row, or None).
    ``softcap`` 0 means none."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    launch(_cross_entropy_rows_kernel)[(rows,)](
        logits,
        logits.stride(0),
        targets,
        losses if rows_scale is None else rows_scale,
        losses,
        vocab,
        ignore_index,
        grad_scale,
        label_smoothing,
        softcap if softcap > 0 else 1.0,
        SOFTCAP=softcap > 0,
        SMOOTH=label_smoothing > 0,
        GRADS=grads,
        HAS_ROWS=rows_scale is not None,
        BLOCK=block_size(vocab),
        num_warps=NUM_WARPS,
    )
