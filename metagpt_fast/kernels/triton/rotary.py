"""Rotary position embedding (Su et al. 2021, "RoFormer") of queries and keys in one Triton launch.

For the first ``rotary_dim`` = R features of every head, pair ``(x1, x2)`` at position ``pos`` rotates by
``theta_i = pos * base^(-2i/R)``:

    y1 = x1 cos(theta) - x2 sin(theta)
    y2 = x2 cos(theta) + x1 sin(theta)

Pairs are ``(i, i + R/2)`` in the half-split GPT-NeoX / Llama layout and ``(2i, 2i+1)`` in the interleaved GPT-J
layout; features past R are copied through (or left untouched in place). The backward pass is the conjugate rotation
(``theta -> -theta``): the same kernel with ``sin_sign = -1``.

One program owns BLOCK_T positions of one sequence and a group of heads taken from q's heads followed by k's. It
computes cos/sin for a block of HALF_BLOCK frequencies once, in registers (``sinusoid.sincos``: no table, no stack), and
rotates that block for every head of its group, so q and k are each read and written exactly once and the
transcendental cost is shared by the heads. Positions come from ``offset + t`` or from ``position_ids`` (T,), (1, T)
or (B, T) read through a batch stride (0 when shared).

Accuracy matches the sinusoidal encoding's: the angle is reduced modulo 2*pi in float64 and only the reduced angle is
rounded to float32, so cos/sin are within ~3e-7 of the exact (float64) ones at any position.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metagpt_fast._spec import triton_interpreted
from metagpt_fast.kernels.triton.sinusoid import inverse_frequency, reduced_angle, sincos, small_column_stride

NUM_WARPS = 4
# A (BLOCK_T, HALF_BLOCK) block of 512 pairs (1024 elements, 8 per thread at 4 warps) per head step: 40-48
# registers as launched (AOT check); 1024 pairs took 64-72 for about the same bytes in flight per SM.
TILE_PAIRS = 512
# Programs to aim for when choosing how many heads one program rotates: ~8 per SM on a 132-SM H200.
TARGET_PROGRAMS = 1024


@triton.jit
def _rotate_block(
    x_ptr,
    y_ptr,  # same strides as x_ptr's tensor when rotating in place
    stride_xt,
    stride_xd,
    stride_yt,
    stride_yd,
    t64,
    t_mask,
    i0,  # first pair of the block
    half,  # R / 2
    cos,  # (BLOCK_T, HALF_BLOCK)
    sin,
    INTERLEAVED: tl.constexpr,
    HALF_BLOCK: tl.constexpr,
):
    """Rotates pairs [i0, i0 + HALF_BLOCK) of one head at positions ``t`` (pointers offset to the (b, h) head).

    Addresses are per-row 64-bit pointers plus per-column 32-bit offsets (the launcher checks (D-1)*stride_d fits):
    per-element 64-bit offsets are loop-invariant across heads, get hoisted, and cost twice the registers.
    """
    x_rows = x_ptr + t64 * stride_xt
    y_rows = y_ptr + t64 * stride_yt
    if INTERLEAVED:
        # Features [2*i0, 2*i0 + 2*HALF_BLOCK) load as one contiguous tile and split into even / odd lanes.
        f = 2 * i0 + tl.arange(0, 2 * HALF_BLOCK)
        f_mask = t_mask[:, None] & (f < 2 * half)[None, :]
        x = tl.load(x_rows[:, None] + (f * stride_xd)[None, :], mask=f_mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, [x.shape[0], HALF_BLOCK, 2]))
        y1 = x1 * cos - x2 * sin
        y2 = x2 * cos + x1 * sin
        y = tl.reshape(tl.join(y1, y2), [x.shape[0], 2 * HALF_BLOCK])
        tl.store(y_rows[:, None] + (f * stride_yd)[None, :], y.to(y_ptr.dtype.element_ty), mask=f_mask)
    else:
        i = i0 + tl.arange(0, HALF_BLOCK)
        mask = t_mask[:, None] & (i < half)[None, :]
        x1 = tl.load(x_rows[:, None] + (i * stride_xd)[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_rows[:, None] + ((i + half) * stride_xd)[None, :], mask=mask, other=0.0).to(tl.float32)
        y1 = x1 * cos - x2 * sin
        y2 = x2 * cos + x1 * sin
        tl.store(y_rows[:, None] + (i * stride_yd)[None, :], y1.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(y_rows[:, None] + ((i + half) * stride_yd)[None, :], y2.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _copy_rest(x_ptr, y_ptr, stride_xt, stride_xd, stride_yt, stride_yd, t64, t_mask, R, D, BLOCK: tl.constexpr):
    """Copies the features [R, D) of one head that rotary leaves unchanged (partial rotary_dim)."""
    x_rows = x_ptr + t64 * stride_xt
    y_rows = y_ptr + t64 * stride_yt
    for f0 in range(R, D, BLOCK):
        f = f0 + tl.arange(0, BLOCK)
        mask = t_mask[:, None] & (f < D)[None, :]
        x = tl.load(x_rows[:, None] + (f * stride_xd)[None, :], mask=mask)
        tl.store(y_rows[:, None] + (f * stride_yd)[None, :], x, mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,  # (B, Hq, T, D)
    k_ptr,  # (B, Hk, T, D)
    q_out_ptr,  # (B, Hq, T, D); q_ptr itself when in place
    k_out_ptr,
    pos_ptr,  # (B or 1, T) integer position ids when HAS_POSITION_IDS
    T,
    Hq,
    Hk,
    HALF,  # rotary_dim / 2: an argument (not R // 2) so Triton's launcher sees its divisibility by 16
    D,
    heads_per_program,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_qob,
    stride_qoh,
    stride_qot,
    stride_qod,
    stride_kob,
    stride_koh,
    stride_kot,
    stride_kod,
    stride_pb,  # 0 when position ids are shared by the batch
    stride_pt,
    offset,
    base,  # frequency base (rope_theta)
    sin_sign,  # +1 forward, -1 backward (conjugate rotation)
    HAS_POSITION_IDS: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    COPY_REST: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HALF_BLOCK: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    head_group = tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = t < T
    t64 = t.to(tl.int64)
    if HAS_POSITION_IDS:
        pos = tl.load(pos_ptr + b * stride_pb + t64 * stride_pt, mask=t_mask, other=0)
    else:
        pos = offset + t
    # Heads [h0, h1) of the concatenation (q heads, then k heads).
    h0 = head_group * heads_per_program
    h1 = tl.minimum(h0 + heads_per_program, Hq + Hk)
    q_end = tl.minimum(h1, Hq)
    k_start = tl.maximum(h0, Hq) - Hq
    k_end = tl.maximum(h1, Hq) - Hq
    for i0 in range(0, HALF, HALF_BLOCK):
        i0 = tl.multiple_of(i0, HALF_BLOCK)  # aligned blocks: vector loads when the features are contiguous
        i = i0 + tl.arange(0, HALF_BLOCK)
        inv_freq = inverse_frequency(2 * i, base, 2 * HALF)
        sin, cos = sincos(reduced_angle(pos, inv_freq))  # (BLOCK_T, HALF_BLOCK), shared by the group's heads
        sin = sin * sin_sign
        for h in range(h0, q_end):
            h64 = tl.cast(h, tl.int64)
            _rotate_block(
                q_ptr + b * stride_qb + h64 * stride_qh,
                q_out_ptr + b * stride_qob + h64 * stride_qoh,
                stride_qt, stride_qd, stride_qot, stride_qod,
                t64, t_mask, i0, HALF, cos, sin, INTERLEAVED, HALF_BLOCK,
            )  # fmt: skip
        for h in range(k_start, k_end):
            h64 = tl.cast(h, tl.int64)
            _rotate_block(
                k_ptr + b * stride_kb + h64 * stride_kh,
                k_out_ptr + b * stride_kob + h64 * stride_koh,
                stride_kt, stride_kd, stride_kot, stride_kod,
                t64, t_mask, i0, HALF, cos, sin, INTERLEAVED, HALF_BLOCK,
            )  # fmt: skip
    if COPY_REST:
        for h in range(h0, q_end):
            h64 = tl.cast(h, tl.int64)
            _copy_rest(
                q_ptr + b * stride_qb + h64 * stride_qh,
                q_out_ptr + b * stride_qob + h64 * stride_qoh,
                stride_qt, stride_qd, stride_qot, stride_qod, t64, t_mask, 2 * HALF, D, 2 * HALF_BLOCK,
            )  # fmt: skip
        for h in range(k_start, k_end):
            h64 = tl.cast(h, tl.int64)
            _copy_rest(
                k_ptr + b * stride_kb + h64 * stride_kh,
                k_out_ptr + b * stride_kob + h64 * stride_koh,
                stride_kt, stride_kd, stride_kot, stride_kod, t64, t_mask, 2 * HALF, D, 2 * HALF_BLOCK,
            )  # fmt: skip


# The kernel, for tooling that compiles it ahead of time (``metagpt_fast/devtools/aot.py``).
KERNELS = {"rotary": _rotary_kernel}


def _identity(kernel):
    return kernel


def _config(rotary_dim: int) -> tuple[int, int]:
    """(BLOCK_T, HALF_BLOCK): up to 64 pairs per block (128 features: a whole Llama head), positions fill the tile."""
    if triton_interpreted():
        return 8, 8  # one small configuration: several position blocks and frequency blocks at test shapes
    half_block = min(64, max(16, triton.next_power_of_2(rotary_dim // 2)))
    return TILE_PAIRS // half_block, half_block


# Every HALF_BLOCK that _config picks on a GPU: the AOT check compiles each.
GPU_HALF_BLOCKS = (16, 32, 64)


def rotary_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    position_ids: torch.Tensor | None,
    offset: int,
    rotary_dim: int,
    base: float,
    interleaved: bool,
    conjugate: bool,
    in_place: bool,
    *,
    heads_per_program: int | None = None,
    launch=_identity,
) -> None:
    """Writes the rotation of ``q`` (B, Hq, T, D) and ``k`` (B, Hk, T, D) into ``q_out``/``k_out`` (any strides).

    ``in_place=True`` means ``q_out is q`` and ``k_out is k``: features past ``rotary_dim`` are then not touched.
    ``conjugate=True`` rotates by ``-theta`` (the backward pass).
    """
    b, hq, t, d = q.shape
    hk = k.shape[1]
    if b * t == 0 or hq + hk == 0 or d == 0:
        return
    block_t, half_block = _config(rotary_dim)
    position_blocks = triton.cdiv(t, block_t) * b
    if heads_per_program is None:
        if triton_interpreted():
            heads_per_program = 3  # groups that straddle the q/k boundary at test head counts
        else:
            heads_per_program = triton.cdiv(hq + hk, max(1, min(hq + hk, TARGET_PROGRAMS // position_blocks)))
    if position_ids is None:
        pos, pos_strides = q, (0, 0)  # never read without HAS_POSITION_IDS
    else:
        pos = position_ids if position_ids.dim() == 2 else position_ids[None, :]
        pos_strides = (0 if pos.shape[0] == 1 else pos.stride(0), pos.stride(1))
    grid = (triton.cdiv(t, block_t), b, triton.cdiv(hq + hk, heads_per_program))
    launch(_rotary_kernel)[grid](
        q,
        k,
        q_out,
        k_out,
        pos,
        t,
        hq,
        hk,
        rotary_dim // 2,
        d,
        heads_per_program,
        *q.stride(),
        *k.stride(),
        *q_out.stride(),
        *k_out.stride(),
        *pos_strides,
        offset,
        base,
        -1.0 if conjugate else 1.0,
        HAS_POSITION_IDS=position_ids is not None,
        INTERLEAVED=interleaved,
        COPY_REST=rotary_dim < d and not in_place,
        BLOCK_T=block_t,
        HALF_BLOCK=half_block,
        num_warps=NUM_WARPS,
    )


def rotary_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor | None,
    offset: int,
    rotary_dim: int,
    base: float,
    interleaved: bool,
    conjugate: bool = False,
    *,
    launch=_identity,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of ``q`` and ``k``, contiguous (B, H, T, D); ``conjugate=True`` is the backward pass."""
    q, k = small_column_stride(q), small_column_stride(k)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    rotary_launch(
        q, k, q_out, k_out, position_ids, offset, rotary_dim, base, interleaved, conjugate, False, launch=launch
    )
    return q_out, k_out
