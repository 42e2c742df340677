"""What the sinusoidal kernels share: the angle ``pos * base^(-2i/d)`` reduced modulo 2*pi in float64, sin/cos of
the reduced float32 angle in registers, and the launch-side rule for their 32-bit column offsets. Used by
``positional.py`` (the sinusoidal encoding) and ``rotary.py`` (RoPE).

sin and cos come from one Cody-Waite reduction by pi/2 and two short polynomials (:func:`sincos`): libdevice's
``sinf`` falls back to a Payne-Hanek reduction that keeps an array on the stack (32 bytes: spills in the AOT check).

Accuracy, as in the C++ kernels (csrc/include/metagpt_fast/sinusoid.h): the inverse frequency stays in float64, the
angle ``pos * inv_freq`` is formed and reduced to [-pi, pi] in float64 (:func:`reduced_angle`: one product, one
floor, one fused multiply-add per element, relative error ~2**-52 of the angle), and only the reduced angle is
rounded to float32 (at most 2**-24 * pi rad). :func:`sincos` adds at most 2 ulp of its result, so sin and cos are
within ~3e-7 of the float64 ones at any position below 2**40 (a float32 angle, rounded inverse frequency and
product, erred by up to ``2 * pos * 2**-24``: 1.2e-2 rad at position 100000).
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
# 2*pi and 1/(2*pi) as float64 (tl.full with tl.float64 keeps all 53 bits; a bare Python float constant would be
# materialised as float32).
_TWO_PI = tl.constexpr(6.283185307179586)
_INV_TWO_PI = tl.constexpr(0.15915494309189535)
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
    """base^(-2i/width) in float64 (once per program and column, so its cost is nil); rounding it to float32 would
    put a relative error of 2**-24 on every angle (6e-3 rad at position 100000)."""
    log2_base = tl.log2(tl.cast(base, tl.float64))
    return tl.exp2(-two_i.to(tl.float64) * log2_base / width)


@triton.jit
def reduced_angle(pos, inv_freq):
    """``pos[:, None] * inv_freq[None, :]`` reduced modulo 2*pi to [-pi, pi] (a hair beyond when the quotient rounds
    the other way) in float64, then rounded once to float32: the argument for :func:`sincos`. ``pos`` holds
    integer (or float) positions, ``inv_freq`` float64 (:func:`inverse_frequency`)."""
    angle = pos.to(tl.float64)[:, None] * inv_freq[None, :]
    two_pi = tl.full([], _TWO_PI, tl.float64)
    turns = tl.floor(angle * tl.full([], _INV_TWO_PI, tl.float64) + 0.5)
    return tl.fma(turns, -two_pi, angle).to(tl.float32)


def small_column_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last-dim offsets fit the kernels' 32-bit column offsets, else a contiguous copy.

    The kernels address a tile as per-row 64-bit pointers plus per-column 32-bit offsets ``j * stride_d``:
    per-element 64-bit offsets are loop-invariant, get hoisted out of the batch / head loops and cost twice the
    registers."""
    if t.dim() and (t.shape[-1] - 1) * t.stride(-1) >= 2**31:
        return t.contiguous()
    return t
