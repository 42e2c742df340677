"""Parity checks shared by the test suite, the benchmarks and the GPU suite.

The rule (flash-attention's test suite): for low-precision outputs and gradients

    max|fast - ref_fp32| <= 2 * max|ref_lowp - ref_fp32| + atol

where ``ref_fp32`` is the reference run in float32 on upcast inputs and ``ref_lowp`` the reference run in the same
low precision: a fast kernel may be at most twice as far from the exact answer as PyTorch's own low-precision
computation. For float32 (and float64) outputs a fixed absolute/relative tolerance applies.
"""

from __future__ import annotations

import torch

# Absolute slack per dtype: float32 kernels reorder sums (online softmax, blocked reductions), which costs a few ulps
# of the largest intermediate; 1e-5 covers unit-scale inputs with sequence lengths up to a few thousand.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
RTOL = {torch.float64: 1e-8, torch.float32: 1e-5, torch.float16: 0.0, torch.bfloat16: 0.0}


def float32_angle_error(last_position: int) -> float:
    """Bound, in radians, on the angle error of float32 sinusoid / rotary kernels at positions up to
    ``last_position``: the inverse frequency is rounded once from float64 and ``pos * inv_freq`` once more, each a
    relative error of 2**-24, so at most ``2 * pos * 2**-24``. The reference tables are exact (float64, rounded
    once), so this is the extra slack those kernels get on top of ``ATOL`` (times ``|x1| + |x2|`` for rotary)."""
    return 2 * max(last_position, 1) * 2**-24


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference, compared in float64; NaNs in the same places count as equal."""
    a, b = a.detach().double(), b.detach().double()
    both_nan = torch.isnan(a) & torch.isnan(b)
    diff = (a - b).abs().masked_fill(both_nan, 0.0)
    return float(diff.max()) if diff.numel() else 0.0


def assert_parity(
    fast: torch.Tensor,
    ref_lowp: torch.Tensor,
    ref_fp32: torch.Tensor,
    *,
    name: str = "output",
    atol: float | None = None,
) -> float:
    """Asserts the parity rule for ``fast`` against the two reference runs; returns ``max|fast - ref_fp32|``."""
    if fast.shape != ref_fp32.shape:
        raise AssertionError(f"{name}: shape {tuple(fast.shape)} != reference {tuple(ref_fp32.shape)}")
    dtype = fast.dtype
    err = max_error(fast, ref_fp32)
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(
            fast.to(ref_fp32.dtype),
            ref_fp32,
            atol=ATOL[dtype] if atol is None else atol,
            rtol=RTOL[dtype],
            equal_nan=True,
            msg=lambda m: f"{name}: {m}",
        )
        return err
    bound = 2 * max_error(ref_lowp, ref_fp32) + (ATOL[dtype] if atol is None else atol)
    if not err <= bound:
        raise AssertionError(f"{name} ({dtype}): max|fast - ref_fp32| = {err:.3e} > bound {bound:.3e}")
    return err
