"""LayerNorm and RMSNorm over rows of features, with the optional residual add before the norm (Triton).

Forward, one program per row (the row is one block in registers, ``BLOCK_N = next_power_of_2(N)``):

    x = input (+ residual, rounded to the input's dtype and written out: the sum the next residual add needs)
    mean = sum(x) / N                       (LayerNorm; 0 for RMSNorm)
    rstd = 1 / sqrt(sum((x - mean)^2) / N + eps)
    y = (x - mean) * rstd * w + b

with float32 statistics; ``mean`` and ``rstd`` are stored for the backward pass. Backward, with
``xhat = (x - mean) * rstd`` and ``wg = w * dy``:

    dx = rstd * (wg - mean(wg) - xhat * mean(wg * xhat))     (+ the gradient reaching the sum directly)
    dw = sum_rows dy * xhat,   db = sum_rows dy

Each backward program owns a fixed slice of rows and keeps its weight / bias partial sums in registers, written to a
(programs, N) buffer that the launcher sums in a fixed order: deterministic, no atomics. References: Ba et al. 2016
("Layer Normalization"), Zhang & Sennrich 2019 ("Root Mean Square Layer Normalization"); the row-per-program layout
of Triton's layer-norm tutorial and Liger-Kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metagpt_fast._spec import triton_interpreted

# The widest row a program holds in registers; wider rows go to another backend (the registry's reason). At 16384
# features the backward spilled ~500 bytes on sm_90 (16 warps).
MAX_FEATURES = 8192
# Backward programs: each sums its rows' weight / bias gradients into one row of partials. Fixed (not per device)
# so the reduction order, hence the result, is the same on every GPU.
GRAD_PROGRAMS = 256


@triton.jit
def _norm_forward_kernel(
    x_ptr,  # (M, N), unit column stride
    res_ptr,  # (M, N) when HAS_RESIDUAL
    w_ptr,  # (N,) when HAS_WEIGHT
    b_ptr,  # (N,) when HAS_BIAS
    y_ptr,  # (M, N) out
    sum_ptr,  # (M, N) out, x + residual, when HAS_RESIDUAL
    mean_ptr,  # (M,) float32 out (LayerNorm)
    rstd_ptr,  # (M,) float32 out
    stride_x,
    stride_r,
    stride_y,
    stride_s,
    N,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        total = (x + r).to(sum_ptr.dtype.element_ty)  # rounded: the tensor the unfused norm would see
        tl.store(sum_ptr + row * stride_s + cols, total, mask=mask)
        x = total.to(tl.float32)
    if RMS:
        centred = x
    else:
        mean = tl.sum(x, axis=0) / N
        centred = tl.where(mask, x - mean, 0.0)
        tl.store(mean_ptr + row, mean)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / N + eps)
    tl.store(rstd_ptr + row, rstd)
    y = centred * rstd
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_backward_kernel(
    dy_ptr,  # (M, N)
    dsum_ptr,  # (M, N) gradient reaching the residual sum, when HAS_GRAD_SUM
    x_ptr,  # (M, N) the normalised tensor
    w_ptr,  # (N,) when HAS_WEIGHT
    mean_ptr,  # (M,) float32 (LayerNorm)
    rstd_ptr,  # (M,) float32
    dx_ptr,  # (M, N) out
    dw_ptr,  # (programs, N) float32 partials out, when WEIGHT_GRAD
    db_ptr,  # (programs, N) float32 partials out, when BIAS_GRAD
    stride_dy,
    stride_ds,
    stride_x,
    stride_dx,
    M,
    N,
    rows_per_program,
    HAS_GRAD_SUM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, M)
    for row in range(first, last):
        row64 = tl.cast(row, tl.int64)
        x = tl.load(x_ptr + row64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row64)
        if RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(mask, (x - tl.load(mean_ptr + row64)) * rstd, 0.0)
        wg = dy * w if HAS_WEIGHT else dy
        c1 = tl.sum(wg * xhat, axis=0) / N
        if RMS:
            dx = rstd * (wg - xhat * c1)
        else:
            dx = rstd * (wg - tl.sum(wg, axis=0) / N - xhat * c1)
        if HAS_GRAD_SUM:
            dx += tl.load(dsum_ptr + row64 * stride_ds + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row64 * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if WEIGHT_GRAD:
            dw += dy * xhat
        if BIAS_GRAD:
            db += dy
    if WEIGHT_GRAD:
        tl.store(dw_ptr + pid * N + cols, dw, mask=mask)
    if BIAS_GRAD:
        tl.store(db_ptr + pid * N + cols, db, mask=mask)


# The kernels, for tooling that compiles them ahead of time.
KERNELS = {"norm_forward": _norm_forward_kernel, "norm_backward": _norm_backward_kernel}


def _identity(kernel):
    return kernel


def _num_warps(block_n: int) -> int:
    # One warp per 256 features (8 per thread), 1 to 32 warps: at 8192 features 16 warps spilled 8 bytes in the
    # float32 LayerNorm backward (AOT compile for sm_90), 32 take 64 registers and none.
    return 1 if triton_interpreted() else min(32, max(1, block_n // 256))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (M, N) with a unit column stride (a copy only when it has not)."""
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def norm_forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
    *,
    launch=_identity,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, sum, mean, rstd)`` of rows ``x`` (M, N), as ``metagpt_fast::norm_forward``."""
    x = _rows(x)
    weight, bias = (p.contiguous() if p is not None else None for p in (weight, bias))  # read with unit stride
    m, n = x.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res = _rows(residual) if residual is not None else None
    total = torch.empty((m, n) if res is not None else (0,), dtype=x.dtype, device=x.device)
    mean = torch.empty((0,) if rms else (m,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return out, total, mean, rstd
    block_n = triton.next_power_of_2(n)
    launch(_norm_forward_kernel)[(m,)](
        x, res if res is not None else x, weight if weight is not None else x, bias if bias is not None else x,
        out, total if res is not None else out, mean if not rms else rstd, rstd,
        x.stride(0), res.stride(0) if res is not None else 0, out.stride(0), total.stride(0) if res is not None else 0,
        n, eps,
        HAS_RESIDUAL=res is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, RMS=rms,
        BLOCK_N=block_n, num_warps=_num_warps(block_n),
    )  # fmt: skip
    return out, total, mean, rstd


def norm_backward(
    grad_out: torch.Tensor,
    grad_sum: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    rms: bool,
    weight_grad: bool,
    bias_grad: bool,
    *,
    launch=_identity,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)`` as ``metagpt_fast::norm_backward`` (empty gradients unless asked for)."""
    x, grad_out = _rows(x), _rows(grad_out)
    weight = weight.contiguous() if weight is not None else None
    grad_sum = _rows(grad_sum) if grad_sum is not None else None
    m, n = x.shape
    param = weight if weight is not None else x
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    programs = max(1, min(m, 2 if triton_interpreted() else GRAD_PROGRAMS))
    rows_per_program = triton.cdiv(m, programs) if m else 0
    programs = triton.cdiv(m, rows_per_program) if m else 1
    dw = torch.zeros((programs, n) if weight_grad else (0,), dtype=torch.float32, device=x.device)
    db = torch.zeros((programs, n) if bias_grad else (0,), dtype=torch.float32, device=x.device)
    if m:
        block_n = triton.next_power_of_2(n)
        launch(_norm_backward_kernel)[(programs,)](
            grad_out, grad_sum if grad_sum is not None else grad_out, x, weight if weight is not None else x,
            mean if not rms else rstd, rstd, dx, dw if weight_grad else dx, db if bias_grad else dx,
            grad_out.stride(0), grad_sum.stride(0) if grad_sum is not None else 0, x.stride(0), dx.stride(0),
            m, n, rows_per_program,
            HAS_GRAD_SUM=grad_sum is not None, HAS_WEIGHT=weight is not None, WEIGHT_GRAD=weight_grad,
            BIAS_GRAD=bias_grad, RMS=rms, BLOCK_N=block_n, num_warps=_num_warps(block_n),
        )  # fmt: skip
    # Partials summed over programs in index order (a plain tensor reduction: deterministic).
    dweight = dw.sum(0).to(param.dtype) if weight_grad else torch.empty((0,), dtype=param.dtype, device=x.device)
    dbias = db.sum(0).to(param.dtype) if bias_grad else torch.empty((0,), dtype=param.dtype, device=x.device)
    return dx, dweight, dbias
