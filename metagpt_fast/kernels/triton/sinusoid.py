"""What the sinusoidal kernels share: sin/cos of float32 angles in registers, the inverse frequency
``base^(-2i/d)``, and the launch-side rule for their 32-bit column offsets. Used by ``positional.py`` (the sinusoidal
encoding) and ``rotary.py`` (RoPE).

sin and cos come from one Cody-Waite reduction by pi/2 and two short polynomials (:func:`sincos`): libdevice's
``sinf`` falls back to a Payne-Hanek reduction that keeps an array on the stack (32 bytes: spills in the AOT check).

Accuracy: the inverse frequency is computed in float64 and rounded once to float32 (relative error <= 2**-24), and
the angle ``pos * inv_freq`` is one float32 product (another 2**-24): the angle is off by at most
``2 * pos * 2**-24`` radians against the exact (float64) one. :func:`sincos` adds at most 2 ulp of its result for
``|angle| <= 2**21``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# pi/2 split in three float32 parts (C1 + C2 + C3 = pi/2 to 1e-23): with fused multiply-adds the reduced angle
# r = a - k*pi/2 keeps ~1 ulp accuracy while k*C1 stays exact in float32 (|a| up to ~2**21).
_PIO2_1 = tl.constexpr(1.5707963705062866)
_PIO2_2 = tl.constexpr(-4.371138828673793e-08)
_PIO2_3 = tl.constexpr(-1.7151245100058819e-15)
_TWO_OVER_PI = tl.constexpr(0.6366197466850281)
# Taylor coefficients up to r**9 (sin) and r**10 (cos): truncation error < 2e-9 on |r| <= pi/4, below float32's ulp.
_S3 = tl.constexpr(-1.0 / 6.0)
_S5 = tl.constexpr(1.0 / 120.0)
_S7 = tl.constexpr(-1.0 / 5040.0)
_S9 = tl.constexpr(1.0 / 362880.0)
_C2 = tl.constexpr(-0.5)
_C4 = tl.constexpr(1.0 / 24.0)
_C6 = tl.constexpr(-1.0 / 720.0)
_C8 = tl.constexpr(1.0 / 40320.0)
_C10 = tl.constexpr(-1.0 / 3628800.0)


@triton.jit
def sincos(angle):
    """(sin, cos) of a float32 tensor, within 2 ulp for |angle| <= 2**21, using no stack memory."""
    k = tl.floor(angle * _TWO_OVER_PI + 0.5)
    r = tl.fma(k, -_PIO2_1, angle)
    r = tl.fma(k, -_PIO2_2, r)
    r = tl.fma(k, -_PIO2_3, r)  # r in [-pi/4, pi/4] (a hair beyond when k rounds the other way)
    r2 = r * r
    s = r + r * r2 * (_S3 + r2 * (_S5 + r2 * (_S7 + r2 * _S9)))
    c = 1.0 + r2 * (_C2 + r2 * (_C4 + r2 * (_C6 + r2 * (_C8 + r2 * _C10))))
    # angle = k*pi/2 + r: quadrant q = k mod 4 maps (sin r, cos r) to (sin, cos) of the angle.
    q = k.to(tl.int32) & 3
    swap = (q & 1) != 0
    sin = tl.where(swap, c, s)
    cos = tl.where(swap, s, c)
    sin = tl.where((q & 2) != 0, -sin, sin)
    cos = tl.where(((q + 1) & 2) != 0, -cos, cos)
    return sin, cos


@triton.jit
def inverse_frequency(two_i, base, width):
    """base^(-2i/width) correctly rounded to float32: computed in float64 (once per program, so its cost is nil),
    so the float32 angle pos * inv_freq carries two roundings only (a float32 exp2 would add ~2-4 ulp)."""
    log2_base = tl.log2(tl.cast(base, tl.float64))
    return tl.exp2(-two_i.to(tl.float64) * log2_base / width).to(tl.float32)


def small_column_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last-dim offsets fit the kernels' 32-bit column offsets, else a contiguous copy.

    The kernels address a tile as per-row 64-bit pointers plus per-column 32-bit offsets ``j * stride_d``:
    per-element 64-bit offsets are loop-invariant, get hoisted out of the batch / head loops and cost twice the
    registers."""
    if t.dim() and (t.shape[-1] - 1) * t.stride(-1) >= 2**31:
        return t.contiguous()
    return t
