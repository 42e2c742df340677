"""Fused scaled-dot-product attention in Triton (FlashAttention-2): forward, backward preprocess, dK/dV and dQ.

    S = scale * Q K^T (+ mask)        P = softmax(S)        O = dropout(P) V

Forward (Dao 2023, "FlashAttention-2", algorithm 1): a program owns BLOCK_M query rows of one (batch, head) and
streams BLOCK_N-key blocks of K and V, keeping the running row maximum ``m``, normaliser ``l`` and un-normalised
output in registers: the (Nq, Nk) score matrix never exists in memory. Scores are kept in base 2 (``log2(e)`` is
folded into the scale) so every exponential is an ``exp2``. The forward saves ``LSE = m + log2(l)`` per row (base 2;
``+inf`` for a row whose every key is masked, whose output is then 0).

Backward (algorithm 2, split in two kernels as in Triton's fused-attention tutorial, so no atomics and gradients are
bitwise deterministic):

    Delta_i = rowsum(dO_i * O_i)                                    (_attn_bwd_preprocess)
    P = exp2(S * log2(e) - LSE);  dV = dropout(P)^T dO;  dP = dropout'(dO V^T);  dS = P * (dP - Delta)
    dK = scale * dS^T Q          (_attn_bwd_dkdv: one program per key block, looping over the query heads of its
                                  GQA group and over query blocks)
    dQ = scale * dS K            (_attn_bwd_dq: one program per query block, looping over key blocks)

Dropout keeps element (b, h, i, j) of P by the shared Philox stream (kernels/triton/dropout.py) at offset
``((b * Hq + h) * Nq + i) * Nk + j``; the backward regenerates the same decisions, so no mask is stored, and
the reference ``dropout_keep_mask`` rebuilds it exactly for tests.

Masking: causal (query ``i`` sees keys ``j <= i``, torch's top-left alignment when ``Nq != Nk``) only costs work in
the blocks that straddle the diagonal; fully-masked blocks are skipped. ``attn_mask`` (bool or additive) is read
through its broadcast strides; a mask that is constant along queries (key padding, ``(B, 1, 1, Nk)``) is read as one
row vector per key block. Batch and head offsets are int64. fp32 matmuls use ``input_precision="ieee"`` (no TF32).
"""

import functools
import math
import os
import warnings

import torch
import triton
import triton.language as tl

from metagpt_fast._spec import dropout_threshold, triton_interpreted
from metagpt_fast.kernels.triton.allocator import ensure_allocator
from metagpt_fast.kernels.triton.dropout import dropout_keep

LOG2E = tl.constexpr(1.4426950408889634)
FLT_MAX = tl.constexpr(3.4028234663852886e38)
MAX_HEAD_DIM = 256
INTERPRETED = triton_interpreted()

MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2

# Triton 3.8 deprecates block pointers in favour of tensor descriptors, which need a device-side allocator hook and
# Hopper-specific layouts; block pointers compile on both sm_80 and sm_90 with triton 3.6 and 3.8.
warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated")


# ----------------------------------------------------------------------------------------------------------------
# helpers


@triton.jit
def _load_block(
    base, start, n, stride_n, stride_d,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr,
):  # fmt: skip
    """Loads rows ``[start, start + BLOCK_N)`` of an (n, D) matrix as a (BLOCK_N, BLOCK_D) tile; rows past ``n`` and
    columns past ``D`` (padding of a non-power-of-2 head dim) read 0.

    A block pointer keeps only the scalar base and offsets live in a loop; a tile of per-element pointers costs
    registers (the forward with D=128, 128x64 tiles, 8 warps: 255 registers and 72 B spilled on sm_80 with pointer
    tiles, 211 and none with block pointers)."""
    ptr = tl.make_block_ptr(base, (n, D), (stride_n, stride_d), (start, 0), (BLOCK_N, BLOCK_D), (1, 0))
    if CHECK_ROWS:
        if BLOCK_D == D:
            tile = tl.load(ptr, boundary_check=(0,), padding_option="zero")
        else:
            tile = tl.load(ptr, boundary_check=(0, 1), padding_option="zero")
    else:
        if BLOCK_D == D:
            tile = tl.load(ptr)
        else:
            tile = tl.load(ptr, boundary_check=(1,), padding_option="zero")
    return tile


@triton.jit
def _store_tile(ptrs, tile, idx, n, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr):
    if BLOCK_D == D:
        tl.store(ptrs, tile, mask=idx[:, None] < n)
    else:
        tl.store(ptrs, tile, mask=(idx[:, None] < n) & (offs_d[None, :] < D))


@triton.jit
def _mask_scores(
    s, rows, cols, row_start, col_start, mask_base, stride_mm, stride_mn, Nq, Nk,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, CAUSAL: tl.constexpr, KEY_BOUND: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, TRANSPOSED: tl.constexpr,
):  # fmt: skip
    """Applies causal / key-bound / attn_mask masking to a score tile in base-2 units.

    ``s`` is (BLOCK_R, BLOCK_C) — queries ``rows = row_start + arange`` by keys ``cols`` — or its transpose when
    ``TRANSPOSED``. The mask is read through block pointers (a per-element pointer tile spilled: 504 B on sm_80 for
    the forward with D=128, 128x64 tiles, 8 warps). With every flag off it returns ``s`` as it is.
    """
    if TRANSPOSED:
        r = rows[None, :]
        c = cols[:, None]
    else:
        r = rows[:, None]
        c = cols[None, :]
    if CAUSAL:
        s = tl.where(r >= c, s, float("-inf"))
    if KEY_BOUND:
        s = tl.where(c < Nk, s, float("-inf"))
    if MASK_KIND != 0:
        if MASK_ROW_BCAST:  # the same mask row for every query (key padding): one vector per key block
            ptr = tl.make_block_ptr(mask_base, (Nk,), (stride_mn,), (col_start,), (BLOCK_C,), (0,))
            val = tl.load(ptr, boundary_check=(0,), padding_option="zero")
            if TRANSPOSED:
                val = val[:, None]
            else:
                val = val[None, :]
        elif TRANSPOSED:
            ptr = tl.make_block_ptr(
                mask_base, (Nk, Nq), (stride_mn, stride_mm), (col_start, row_start), (BLOCK_C, BLOCK_R), (0, 1)
            )
            val = tl.load(ptr, boundary_check=(0, 1), padding_option="zero")
        else:
            ptr = tl.make_block_ptr(
                mask_base, (Nq, Nk), (stride_mm, stride_mn), (row_start, col_start), (BLOCK_R, BLOCK_C), (1, 0)
            )
            val = tl.load(ptr, boundary_check=(0, 1), padding_option="zero")
        if MASK_KIND == 1:
            s = tl.where(val != 0, s, float("-inf"))
        else:
            # Converted to base 2 like the scores. A finite mask as large as float32's minimum (the additive masks
            # built with torch.finfo(float32).min) would overflow to -inf when scaled by log2(e) and turn a row
            # of them into a "fully masked" row; clamping keeps it finite, as it is in the reference.
            bias = tl.maximum(val.to(tl.float32) * LOG2E, -FLT_MAX)
            s = s + tl.where(val == float("-inf"), float("-inf"), bias)
    return s


@triton.jit
def _load_lse(lse_ptr, rows, Nq, lse_split, SPLIT_LSE: tl.constexpr):
    """(max, log2 sum) of each row (see _attn_fwd); rows past Nq read (+inf, 0) so their weights are 0."""
    m = tl.load(lse_ptr + rows, mask=rows < Nq, other=float("inf"))
    if SPLIT_LSE:
        log_l = tl.load(lse_ptr + lse_split + rows, mask=rows < Nq, other=0.0)
    else:
        log_l = 0.0
    return m, log_l


@triton.jit
def _probabilities(s, m, log_l, SPLIT_LSE: tl.constexpr, TRANSPOSED: tl.constexpr):
    """P = exp2(S - LSE) from the row statistics of _load_lse; ``s`` is queries by keys, or keys by queries."""
    if TRANSPOSED:
        if SPLIT_LSE:
            p = tl.exp2((s - m[None, :]) - log_l[None, :])
        else:
            p = tl.exp2(s - m[None, :])
    else:
        if SPLIT_LSE:
            p = tl.exp2((s - m[:, None]) - log_l[:, None])
        else:
            p = tl.exp2(s - m[:, None])
    return p


# ----------------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, mask_base, seed, drop_base, rows, row_start, lo, hi,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, Nq, Nk,
    qk_scale, dropout_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr, IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr, FOLD_SCALE: tl.constexpr,
    KV_DESCRIPTORS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):  # fmt: skip
    """Online softmax over key blocks ``[lo, hi)``. ``BOUNDARY`` blocks straddle the causal diagonal or the end of
    the keys and are masked; the others are known to be fully visible and in bounds (no per-element work).
    ``KV_DESCRIPTORS``: ``k_base`` and ``v_base`` are tensor descriptors (see _attn_fwd), else base pointers.
    ``WARP_SPECIALIZE``: the loop asks triton for warp specialisation (a producer warpgroup issuing the loads and
    consumer warpgroups computing; see _attn_fwd's schedules).

    ``FOLD_SCALE`` (``qk_scale >= 0``): where no mask applies, the row maximum is taken on the raw products and
    scaled once per row (rounding is monotonic, so it equals the maximum of the rounded scaled scores), and the scale
    goes into the exponent's argument as one fused multiply-add per score instead of a multiply and a subtract."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if KV_DESCRIPTORS:  # rows past Nk and columns past HEAD_DIM read 0
            k = k_base.load([start_n, 0])
        else:
            k = _load_block(k_base, start_n, Nk, stride_kn, stride_kd, HEAD_DIM, BLOCK_N, BLOCK_D, BOUNDARY)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BLOCK_M, BLOCK_N)
        if FOLD_SCALE and not BOUNDARY and MASK_KIND == 0:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            # A row with no visible key so far has m = -inf: subtract 0 instead so exp2 gives 0, not NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(tl.fma(qk, qk_scale, -m_use[:, None]))
        else:
            s = qk * qk_scale  # base 2
            # Causal and key-bound masks only in BOUNDARY blocks, attn_mask in every block; nothing when none applies.
            s = _mask_scores(
                s, rows, cols, row_start, start_n, mask_base, stride_mm, stride_mn, Nq, Nk, BLOCK_M, BLOCK_N,
                IS_CAUSAL and BOUNDARY, BOUNDARY, MASK_KIND, MASK_ROW_BCAST, False,
            )  # fmt: skip
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # as above
            p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser counts every weight, dropped or not
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            offsets = drop_base + rows.to(tl.int64)[:, None] * Nk + cols[None, :]
            p = tl.where(dropout_keep(seed, offsets, dropout_threshold), p * dropout_scale, 0.0)
        if KV_DESCRIPTORS:
            v = v_base.load([start_n, 0])
        else:
            v = _load_block(v_base, start_n, Nk, stride_vn, stride_vd, HEAD_DIM_V, BLOCK_N, BLOCK_DV, BOUNDARY)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_tile(
    Q, K, V, Mask, Out, Lse, seed, start_m, h, b,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, Nq, Nk, GROUP, lse_split,
    qk_scale, dropout_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    FOLD_SCALE: tl.constexpr, KV_DESCRIPTORS: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Query block ``start_m`` of head ``h`` of batch ``b`` (int64): its output rows and their LSE (see _attn_fwd)."""
    hk = h // GROUP
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    if KV_DESCRIPTORS:
        k_base = tl.make_tensor_descriptor(k_base, [Nk, HEAD_DIM], [stride_kn, 1], [BLOCK_N, BLOCK_D])
        v_base = tl.make_tensor_descriptor(v_base, [Nk, HEAD_DIM_V], [stride_vn, 1], [BLOCK_N, BLOCK_DV])
    mask_base = Mask + b * stride_mb + h * stride_mh
    row_base = (b * Hq + h) * Nq  # first row of this (b, h) in Lse and in the dropout offsets
    drop_base = row_base * Nk

    q_base = Q + b * stride_qb + h * stride_qh
    if WARP_SPECIALIZE:
        # Every load of a warp-specialised kernel goes through a descriptor: triton 3.8 aborts on a pointer load
        # ("unsupported load type for producer commit").
        tl.static_assert(KV_DESCRIPTORS)
        q_desc = tl.make_tensor_descriptor(q_base, [Nq, HEAD_DIM], [stride_qm, 1], [BLOCK_M, BLOCK_D])
        q = q_desc.load([start_m * BLOCK_M, 0])
    else:
        q = _load_block(q_base, start_m * BLOCK_M, Nq, stride_qm, stride_qd, HEAD_DIM, BLOCK_M, BLOCK_D, True)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # Key blocks [0, full_end) need no per-element masking; [full_end, hi) straddle the diagonal or the end.
    if IS_CAUSAL:
        hi = tl.minimum(Nk, (start_m + 1) * BLOCK_M)
        full_end = tl.minimum((start_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N, Nk // BLOCK_N * BLOCK_N)
    else:
        hi = Nk
        full_end = Nk // BLOCK_N * BLOCK_N
    if WARP_SPECIALIZE:
        # One loop over [0, hi) that masks every step: triton 3.8's Hopper warp specialisation takes a kernel's one
        # marked loop, and leaves the two-loop form (or a mask under a branch on the step) unspecialised.
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, mask_base, seed, drop_base, rows, start_m * BLOCK_M, 0, hi,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, Nq, Nk, qk_scale, dropout_threshold,
            dropout_scale,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N,
            True, IS_CAUSAL, MASK_KIND, MASK_ROW_BCAST, HAS_DROPOUT, FOLD_SCALE, KV_DESCRIPTORS, True,
        )  # fmt: skip
    else:
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, mask_base, seed, drop_base, rows, start_m * BLOCK_M, 0, full_end,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, Nq, Nk, qk_scale, dropout_threshold,
            dropout_scale,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N,
            False, IS_CAUSAL, MASK_KIND, MASK_ROW_BCAST, HAS_DROPOUT, FOLD_SCALE, KV_DESCRIPTORS, False,
        )  # fmt: skip
        # Guarded, not left to a zero-trip loop: on sm_90 the path that skips an empty loop redefines the
        # accumulator registers while a wgmma is in flight, and ptxas then serialises every wgmma of the kernel
        # (C7515: one wait per HGMMA, 24 for 24 at D=128 with 128x64 tiles; 4 with the guard).
        if full_end < hi:
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, k_base, v_base, mask_base, seed, drop_base, rows, start_m * BLOCK_M, full_end, hi,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, Nq, Nk, qk_scale,
                dropout_threshold, dropout_scale,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N,
                True, IS_CAUSAL, MASK_KIND, MASK_ROW_BCAST, HAS_DROPOUT, FOLD_SCALE, KV_DESCRIPTORS, False,
            )  # fmt: skip

    # A row whose every key is masked has l = 0 and acc = 0: output 0, LSE = +inf (so the backward's P is 0).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if MASK_KIND == 2:
        tl.store(Lse + row_base + rows, tl.where(empty, float("inf"), m_i), mask=rows < Nq)
        tl.store(Lse + lse_split + row_base + rows, tl.log2(l_safe), mask=rows < Nq)
    else:
        tl.store(Lse + row_base + rows, tl.where(empty, float("inf"), m_i + tl.log2(l_safe)), mask=rows < Nq)
    o_ptrs = Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_dv[None, :] * stride_od
    _store_tile(o_ptrs, out.to(Out.dtype.element_ty), rows, Nq, offs_dv, HEAD_DIM_V, BLOCK_DV)


@triton.jit
def _attn_fwd(
    Q, K, V, Mask, Out, Lse, Seed,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    B, Hq, Nq, Nk, GROUP, lse_split, Nq_bucket, Nk_bucket,
    qk_scale, dropout_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_ROW_BCAST: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    FOLD_SCALE: tl.constexpr,
    KV_DESCRIPTORS: tl.constexpr,
    PERSISTENT: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Q (B, Hq, Nq, D), K (B, Hk, Nk, D), V (B, Hk, Nk, Dv), Mask broadcast to (B, Hq, Nq, Nk) (stride 0 on
    broadcast dims), Out (B, Hq, Nq, Dv), Lse (1 or 2, B, Hq, Nq) float32 with ``lse_split = B * Hq * Nq``, Seed (1,)
    int64. ``Nq_bucket``, ``Nk_bucket``: the autotuner's key only (:func:`length_buckets`; the same in the backward
    kernels).

    Schedules (:data:`FORWARD_SCHEDULES`): grid (cdiv(Nq, BLOCK_M), Hq, B), one query block a program; or
    ``PERSISTENT``: a 1-D grid of at most one program per SM, each looping over the (query block, head, batch) tiles
    ``pid, pid + num_programs, ...``. With ``IS_CAUSAL`` the query blocks run longest-first in both: the last query
    block sees the most keys, so program 0 takes it (the grid's first dimension is mapped in reverse; the persistent
    order takes every head's last block before any head's second-to-last), and the short blocks fill the tail.
    ``WARP_SPECIALIZE``: one key loop that masks every step, marked for warp specialisation (_attn_fwd_tile).

    Lse holds m + log2(l) per row. With an additive mask it holds m and log2(l) apart (2, ...): a row whose every
    key carries a huge finite bias (torch.finfo(float32).min) has |m| ~ 1e38, where m + log2(l) rounds to m and the
    backward would lose the 1/l of its weights. ``FOLD_SCALE``: ``qk_scale >= 0`` (see _attn_fwd_inner).

    ``KV_DESCRIPTORS``: K and V are read through tensor descriptors (on sm_90, TMA copies issued by one thread into
    shared memory, in place of every thread's cp.async address arithmetic); they need a last stride of 1, the other
    strides and the base 16-byte aligned (:func:`kv_descriptors`), and scratch memory from triton's allocator for the
    descriptors (:func:`metagpt_fast.kernels.triton.allocator.ensure_allocator`)."""
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_DV >= HEAD_DIM_V)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    else:
        seed = 0
    if PERSISTENT:
        blocks = tl.cdiv(Nq, BLOCK_M)
        heads = B * Hq
        for tile in tl.range(tl.program_id(0), blocks * heads, tl.num_programs(0)):
            block = tile // heads
            if IS_CAUSAL:
                block = blocks - 1 - block
            bh = (tile % heads).to(tl.int64)
            _attn_fwd_tile(
                Q, K, V, Mask, Out, Lse, seed, block, bh % Hq, bh // Hq,
                stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm, stride_mn,
                stride_ob, stride_oh, stride_om, stride_od,
                Hq, Nq, Nk, GROUP, lse_split, qk_scale, dropout_threshold, dropout_scale,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, IS_CAUSAL, MASK_KIND, MASK_ROW_BCAST, HAS_DROPOUT,
                FOLD_SCALE, KV_DESCRIPTORS, WARP_SPECIALIZE, BLOCK_M, BLOCK_N,
            )  # fmt: skip
    else:
        start_m = tl.program_id(0)
        if IS_CAUSAL:
            start_m = tl.num_programs(0) - 1 - start_m
        _attn_fwd_tile(
            Q, K, V, Mask, Out, Lse, seed, start_m, tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64),
            stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
            stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm, stride_mn,
            stride_ob, stride_oh, stride_om, stride_od,
            Hq, Nq, Nk, GROUP, lse_split, qk_scale, dropout_threshold, dropout_scale,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, IS_CAUSAL, MASK_KIND, MASK_ROW_BCAST, HAS_DROPOUT,
            FOLD_SCALE, KV_DESCRIPTORS, WARP_SPECIALIZE, BLOCK_M, BLOCK_N,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _attn_bwd_preprocess(
    Out, DOut, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    Hq, Nq,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Nq, BLOCK_M), Hq, B): Delta (B, Hq, Nq) float32 = rowsum(dO * O)."""
    start_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_base = Out + b * stride_ob + h * stride_oh
    do_base = DOut + b * stride_dob + h * stride_doh
    start = start_m * BLOCK_M
    o = _load_block(o_base, start, Nq, stride_om, stride_od, HEAD_DIM_V, BLOCK_M, BLOCK_DV, True).to(tl.float32)
    do = _load_block(do_base, start, Nq, stride_dom, stride_dod, HEAD_DIM_V, BLOCK_M, BLOCK_DV, True).to(tl.float32)
    tl.store(Delta + (b * Hq + h) * Nq + rows, tl.sum(o * do, 1), mask=rows < Nq)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_ptr, lse_split, delta_ptr, mask_base, seed, drop_base, cols, col_start, lo, hi,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, Nq, Nk,
    qk_scale, dropout_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr, DESCRIPTORS: tl.constexpr,
):  # fmt: skip
    """Accumulates dK, dV of one key block over the query blocks ``[lo, hi)`` of one query head, in the transposed
    (keys by queries) layout so both products accumulate without transposing the accumulators. ``DESCRIPTORS``:
    ``q_base`` and ``do_base`` are tensor descriptors (rows past Nq read 0), else base pointers."""
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        if DESCRIPTORS:
            q = q_base.load([start_m, 0])
        else:
            q = _load_block(q_base, start_m, Nq, stride_qm, stride_qd, HEAD_DIM, BLOCK_M, BLOCK_D, True)
        # Rows past Nq read LSE = +inf, so their P is 0 and they contribute nothing.
        m, log_l = _load_lse(lse_ptr, rows, Nq, lse_split, MASK_KIND == 2)
        s_t = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale  # (BLOCK_N, BLOCK_M)
        # Keys past Nk need no mask here: their dK/dV rows are never stored. Nothing when no mask applies.
        s_t = _mask_scores(
            s_t, rows, cols, start_m, col_start, mask_base, stride_mm, stride_mn, Nq, Nk, BLOCK_M, BLOCK_N,
            CAUSAL, False, MASK_KIND, MASK_ROW_BCAST, True,
        )  # fmt: skip
        p_t = _probabilities(s_t, m, log_l, MASK_KIND == 2, True)
        if DESCRIPTORS:
            do = do_base.load([start_m, 0])
        else:
            do = _load_block(do_base, start_m, Nq, stride_dom, stride_dod, HEAD_DIM_V, BLOCK_M, BLOCK_DV, True)
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")  # (BLOCK_N, BLOCK_M)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, drop_base + rows.to(tl.int64)[None, :] * Nk + cols[:, None], dropout_threshold)
            dv = tl.dot(tl.where(keep, p_t * dropout_scale, 0.0).to(do.dtype), do, dv, input_precision="ieee")
            dp_t = tl.where(keep, dp_t * dropout_scale, 0.0)
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision="ieee")
        delta = tl.load(delta_ptr + rows, mask=rows < Nq, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision="ieee")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, Mask, DOut, Lse, Delta, DK, DV, Seed,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    Hq, Nq, Nk, GROUP, lse_split, Nq_bucket, Nk_bucket,
    sm_scale, qk_scale, dropout_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_ROW_BCAST: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DESCRIPTORS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Nk, BLOCK_N), Hk, B). dK (B, Hk, Nk, D), dV (B, Hk, Nk, Dv): each sums over the GROUP query heads
    that share its key/value head inside this program, so no two programs write the same element.

    ``DESCRIPTORS``: the streamed Q and dO are read through tensor descriptors (TMA on sm_90), as K and V in the
    forward; they need what :func:`_tma_aligned` checks of Q and dO."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    k = _load_block(
        K + b * stride_kb + hk * stride_kh, start_n, Nk, stride_kn, stride_kd, HEAD_DIM, BLOCK_N, BLOCK_D, True
    )
    v = _load_block(
        V + b * stride_vb + hk * stride_vh, start_n, Nk, stride_vn, stride_vd, HEAD_DIM_V, BLOCK_N, BLOCK_DV, True
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    else:
        seed = 0

    # Query blocks [lo, full_start) straddle the diagonal (masked); [full_start, Nq) see the whole key block.
    if IS_CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
        full_start = tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        full_start = 0
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DOut + b * stride_dob + h * stride_doh
        if DESCRIPTORS:
            q_base = tl.make_tensor_descriptor(q_base, [Nq, HEAD_DIM], [stride_qm, 1], [BLOCK_M, BLOCK_D])
            do_base = tl.make_tensor_descriptor(do_base, [Nq, HEAD_DIM_V], [stride_dom, 1], [BLOCK_M, BLOCK_DV])
        row_base = (b * Hq + h) * Nq
        mask_base = Mask + b * stride_mb + h * stride_mh
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, Lse + row_base, lse_split, Delta + row_base, mask_base, seed,
            row_base * Nk, cols, start_n, lo, tl.minimum(full_start, Nq),
            stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, Nq, Nk,
            qk_scale, dropout_threshold, dropout_scale,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N,
            IS_CAUSAL, MASK_KIND, MASK_ROW_BCAST, HAS_DROPOUT, DESCRIPTORS,
        )  # fmt: skip
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, Lse + row_base, lse_split, Delta + row_base, mask_base, seed,
            row_base * Nk, cols, start_n, full_start, Nq,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, Nq, Nk,
            qk_scale, dropout_threshold, dropout_scale,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N,
            False, MASK_KIND, MASK_ROW_BCAST, HAS_DROPOUT, DESCRIPTORS,
        )  # fmt: skip

    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd
    _store_tile(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), cols, Nk, offs_d, HEAD_DIM, BLOCK_D)
    _store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), cols, Nk, offs_dv, HEAD_DIM_V, BLOCK_DV)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, m, log_l, delta, k_base, v_base, mask_base, seed, drop_base, rows, row_start, lo, hi,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, Nq, Nk,
    qk_scale, dropout_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BOUNDARY: tl.constexpr, IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr, DESCRIPTORS: tl.constexpr,
):  # fmt: skip
    """Accumulates dQ of one query block over the key blocks ``[lo, hi)`` (``BOUNDARY`` as in the forward;
    ``DESCRIPTORS``: ``k_base`` and ``v_base`` are tensor descriptors)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if DESCRIPTORS:
            k = k_base.load([start_n, 0])
            v = v_base.load([start_n, 0])
        else:
            k = _load_block(k_base, start_n, Nk, stride_kn, stride_kd, HEAD_DIM, BLOCK_N, BLOCK_D, BOUNDARY)
            v = _load_block(v_base, start_n, Nk, stride_vn, stride_vd, HEAD_DIM_V, BLOCK_N, BLOCK_DV, BOUNDARY)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # (BLOCK_M, BLOCK_N)
        # Causal and key-bound masks only in BOUNDARY blocks, attn_mask in every block; nothing when none applies.
        s = _mask_scores(
            s, rows, cols, row_start, start_n, mask_base, stride_mm, stride_mn, Nq, Nk, BLOCK_M, BLOCK_N,
            IS_CAUSAL and BOUNDARY, BOUNDARY, MASK_KIND, MASK_ROW_BCAST, False,
        )  # fmt: skip
        p = _probabilities(s, m, log_l, MASK_KIND == 2, False)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        if HAS_DROPOUT:
            keep = dropout_keep(seed, drop_base + rows.to(tl.int64)[:, None] * Nk + cols[None, :], dropout_threshold)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision="ieee")
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, Mask, DOut, Lse, Delta, DQ, Seed,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    Hq, Nq, Nk, GROUP, lse_split, Nq_bucket, Nk_bucket,
    sm_scale, qk_scale, dropout_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_ROW_BCAST: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    DESCRIPTORS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Nq, BLOCK_M), Hq, B). dQ (B, Hq, Nq, D). Causal query blocks run longest-first, as in the
    forward. ``DESCRIPTORS``: the streamed K and V are read through tensor descriptors (as in the forward)."""
    start_m = tl.program_id(0)
    if IS_CAUSAL:
        start_m = tl.num_programs(0) - 1 - start_m
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    if DESCRIPTORS:
        k_base = tl.make_tensor_descriptor(k_base, [Nk, HEAD_DIM], [stride_kn, 1], [BLOCK_N, BLOCK_D])
        v_base = tl.make_tensor_descriptor(v_base, [Nk, HEAD_DIM_V], [stride_vn, 1], [BLOCK_N, BLOCK_DV])
    mask_base = Mask + b * stride_mb + h * stride_mh
    row_base = (b * Hq + h) * Nq
    start = start_m * BLOCK_M
    q = _load_block(
        Q + b * stride_qb + h * stride_qh, start, Nq, stride_qm, stride_qd, HEAD_DIM, BLOCK_M, BLOCK_D, True
    )
    do = _load_block(
        DOut + b * stride_dob + h * stride_doh, start, Nq, stride_dom, stride_dod, HEAD_DIM_V, BLOCK_M, BLOCK_DV, True
    )
    m, log_l = _load_lse(Lse + row_base, rows, Nq, lse_split, MASK_KIND == 2)
    delta = tl.load(Delta + row_base + rows, mask=rows < Nq, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    else:
        seed = 0

    if IS_CAUSAL:
        hi = tl.minimum(Nk, (start_m + 1) * BLOCK_M)
        full_end = tl.minimum((start_m * BLOCK_M + 1) // BLOCK_N * BLOCK_N, Nk // BLOCK_N * BLOCK_N)
    else:
        hi = Nk
        full_end = Nk // BLOCK_N * BLOCK_N
    dq = _attn_bwd_dq_inner(
        dq, q, do, m, log_l, delta, k_base, v_base, mask_base, seed,
        row_base * Nk, rows, start_m * BLOCK_M, 0, full_end,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, Nq, Nk, qk_scale, dropout_threshold,
        dropout_scale,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N,
        False, IS_CAUSAL, MASK_KIND, MASK_ROW_BCAST, HAS_DROPOUT, DESCRIPTORS,
    )  # fmt: skip
    if full_end < hi:  # guarded for ptxas, as in the forward (36 waits for 36 HGMMA at D=128 without it)
        dq = _attn_bwd_dq_inner(
            dq, q, do, m, log_l, delta, k_base, v_base, mask_base, seed,
            row_base * Nk, rows, start_m * BLOCK_M, full_end, hi,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, Nq, Nk, qk_scale, dropout_threshold,
            dropout_scale,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N,
            True, IS_CAUSAL, MASK_KIND, MASK_ROW_BCAST, HAS_DROPOUT, DESCRIPTORS,
        )  # fmt: skip
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    _store_tile(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), rows, Nq, offs_d, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------------------------------------------
# configurations
#
# Tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per (operand bits, head-dim bucket). Hopper's wgmma needs 64 rows
# per warpgroup in the left operand of every product, so the row block of each kernel (BLOCK_M for the forward and
# dQ, BLOCK_N for dK/dV, whose products are keys-by-queries) is 64 with 4 warps or 128 with 8. float32 runs on FMA
# units (input_precision="ieee"): its tiles are small enough for the accumulators to stay in registers.

FWD_TILES = {
    (16, 64): [(128, 128, 8, 3), (64, 64, 4, 4)],
    (16, 128): [(128, 64, 8, 3), (64, 64, 4, 3)],
    (16, 256): [(64, 64, 8, 2)],
    (32, 64): [(32, 32, 4, 2)],  # 64x32 spilled 120 B (sm_80) / 560 B (sm_90)
    (32, 128): [(16, 16, 4, 2)],  # 32x32 spilled 552 B on sm_90
    (32, 256): [(16, 16, 4, 2)],
}
DKDV_TILES = {  # BLOCK_M is the streamed query block, BLOCK_N the resident key block
    (16, 64): [(32, 128, 8, 3)],  # 64x64 with 4 warps spilled 184 B
    (16, 128): [(32, 64, 8, 2)],  # 32x64 with 4 warps spilled 264 / 360 B
    # dK and dV of 64 keys x 256 dims (128 fp32 registers a thread at 8 warps) plus resident K and V spill 448 B on
    # sm_90 under wgmma's 64-row tiles; 32 keys per program run on mma.sync instead (see the AOT cases).
    (16, 256): [(16, 32, 8, 1)],
    (32, 64): [(32, 32, 4, 2)],
    (32, 128): [(16, 16, 8, 1)],  # 4 warps spilled 8 B with mask and dropout on sm_80
    (32, 256): [(16, 16, 4, 2)],  # see FP32_DKDV_256_SPILL
}
DQ_TILES = {  # BLOCK_M is the resident query block, BLOCK_N the streamed key block
    # D=64: 64 keys a step, not 32: the three products of a step (S, dP, dQ) wait once each, and with 32 keys they
    # are 10 HGMMA for 3 waits; with 64 keys 12 for 3, and 516 instructions per 128 keys instead of 664 (sm_90).
    (16, 64): [(128, 64, 8, 3), (64, 64, 4, 3)],
    (16, 128): [(128, 32, 8, 3), (64, 32, 4, 3)],
    (16, 256): [(64, 32, 8, 2)],
    (32, 64): [(32, 32, 4, 2)],
    (32, 128): [(32, 16, 4, 2)],
    (32, 256): [(16, 16, 4, 2)],
}
# float32 dK/dV at D=256 on FMA units: dK and dV (16 x 256 fp32) alone are 64 registers a thread at 4 warps and
# the FMA operand layouts replicate K and V; the AOT compile measured 16-48 B of stack (sm_80 / sm_90) at 4 warps and
# 264-376 B at 8 warps. float32 with D=256 is an accuracy path, not a speed path: allowed.
FP32_DKDV_256_SPILL = 48
# Philox dropout (four 32-bit words of state per score) and dense masks need more registers per score: smaller score
# tiles over 8 warps (the forward with D=64, 128x64 tiles, 4 warps, mask and dropout spilled 1368 B on sm_80; D=128
# with 64x64 tiles and 8 warps 424 B on sm_90).
HEAVY_TILES = {
    "fwd": {(16, 64): [(128, 64, 8, 2), (64, 64, 8, 2)], (16, 128): [(64, 32, 8, 2)], (16, 256): [(64, 16, 8, 2)]},
    "dkdv": {(16, 64): [(16, 64, 8, 2)], (16, 128): [(16, 64, 8, 2)], (16, 256): [(16, 32, 8, 1)]},
    # D=256: 64x16 with wgmma spilled 296 B on sm_90; 32-row tiles run on mma.sync
    "dq": {(16, 64): [(64, 32, 8, 2)], (16, 128): [(64, 32, 8, 2)], (16, 256): [(32, 32, 8, 1)]},
}
TILES = {"fwd": FWD_TILES, "dkdv": DKDV_TILES, "dq": DQ_TILES}

# Hopper (sm_90) lists where they differ from the tables above (docs/triton-attention.md). Mostly replacements for
# 16-bit tiles that repeat work there: wgmma gives each warpgroup (4 warps) 64 rows of a product, and Triton puts all
# the warps of a product that feeds another one (S -> P V, dP -> dS -> dQ) on its rows (warpsPerCTA = [num_warps,
# 1]): an 8-warp tile with 64 rows has both warpgroups compute the same S and dP, twice the tensor work (the AOT gate
# "replicated_products"). So here 8 warps take 128 rows and 4 warps take 64. The figures are triton 3.8's AOT
# compile for sm_90 (registers, spilled bytes; the forward without mask with K and V through tensor descriptors),
# and the tile replaced.
SM90_TILES = {
    "fwd": {
        # 128 keys a step as at D=64: 189 registers, 0 B, 161 KiB, 479 SASS instructions per 128 keys against 664
        # for 128x64 (one rescale of the accumulator and one set of row reductions per 128 keys instead of two);
        # on sm_80 the same tile spills (64 B).
        (16, 128): [(128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3)],
        (16, 256): [(128, 64, 8, 2), (128, 32, 8, 2)],  # 222 / 198 registers, 0 B; was 64x64 on 8 warps
    },
    "dkdv": {
        # 255 / 218 registers, 0 B; was 32x64 (64 keys) on 8 warps. With triton 3.6 (the oldest supported) 32x128
        # spills 56 B (32x64 spilled 64 B); 16x128 does not, so the autotuner has both.
        (16, 128): [(32, 128, 8, 2), (16, 128, 8, 2)],
        # mma.sync: 64 or 32 queries by 16 keys on 4 warps, 227 / 180 registers, 0 B; was 16x32 on 8 warps, whose
        # warps lie along the 16 queries of S^T and dP^T (64 columns of warps, each product computed 4 times)
        (16, 256): [(64, 16, 4, 1), (32, 16, 4, 1)],
    },
    "dq": {(16, 256): [(128, 32, 8, 2)]},  # 241 registers, 0 B; was 64x32 on 8 warps
}
SM90_HEAVY_TILES = {
    "fwd": {
        # the 64x64 8-warp alternative goes. With triton 3.6 128x64 spills 56-112 B (as before these tables); 128x32
        # does not, but its steps are 6 HGMMA for 2 waits (over the AOT gate's 1 per 4)
        (16, 64): [(128, 64, 8, 2)],
        # 200 / 236 registers, 0 B (128x32 on 8 warps: 0 B with triton 3.8, 40 B with 3.6); was 64x32 on 8 warps
        (16, 128): [(128, 16, 8, 2), (64, 16, 4, 2)],
    },
    "dkdv": {
        (16, 64): [(16, 128, 8, 2), (16, 64, 4, 2)],  # 220 / 174 registers, 0 B; was 16x64 on 8 warps
        (16, 128): [(16, 128, 8, 2)],  # 250 registers, 0 B; was 16x64 on 8 warps
        (16, 256): [(32, 16, 4, 1)],  # mma.sync, 186 registers, 0 B; was 16x32 on 8 warps (see above)
    },
    "dq": {
        # 255 registers, 0 B; was 64x32 on 8 warps. 64 keys a step as in the plain table (with 32, 10 HGMMA for 3
        # waits); 64x64 on 4 warps spilled 40 B with triton 3.6
        (16, 64): [(128, 64, 8, 2)],
        (16, 128): [(128, 32, 8, 2), (64, 16, 4, 2)],  # 248 / 233 registers, 0 B; was 64x32 on 8 warps
        # mma.sync, 178 registers, 0 B; was 32x32 on 8 warps, whose warps lie along the 32 keys (64 columns of warps)
        (16, 256): [(16, 32, 4, 2)],
    },
}
# The one repeated product left on sm_90: the 16-bit forward at D=256 with a dense mask and dropout keeps 64x16 tiles
# on 8 warps, whose 64 x 16 scores both warpgroups compute (the 64 x 256 P V product is split, not repeated). Every
# tile without the repeat spills: 128x16 on 8 warps 24-64 B, 64x16 on 4 warps 96-104 B, 64x32 on 4 warps 448-504 B.
SM90_HEAVY_FWD_256_REPLICATION = 2
# Static budget of the 16-bit sm_90 forward with 128 x 128 tiles (D <= 128, no mask): SASS instructions of one main-loop
# step per thread (128 keys). This kernel compiles to 479 (D=128) and 450 (D=64) with TMA loads, 516 and 478 with
# cp.async; 128x64 tiles took 842 per 128 keys before the changes of docs/triton-attention.md.
FWD_128X128_LOOP_BUDGET = 550

# Under TRITON_INTERPRET=1 (CPU tests) one small configuration; BLOCK_M != BLOCK_N so both orders of the causal
# diagonal bookkeeping are exercised.
INTERPRETER_TILES = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}

# Forward schedules (_attn_fwd): "grid", one program per query block (the default); "persistent", one program per SM
# looping over the tiles; "warp_specialize", the one-loop form marked for triton's Hopper warp specialisation. Neither
# alternative has been measured on a GPU (docs/triton-attention.md has their static figures), so the grid stays the
# default. The environment variable picks one for every call that does not name one.
FORWARD_SCHEDULES = ("grid", "persistent", "warp_specialize")
SCHEDULE_ENV_VAR = "METAGPT_FAST_TRITON_ATTENTION_SCHEDULE"
# Warp specialisation on sm_90: triton 3.8 specialises 4-warp programs only (one producer warpgroup and two consumer
# warpgroups of 64 rows each: 12 warps in all); 8-warp programs compile unspecialised. 16-bit data, D <= 128, no
# dropout or dense mask.
WS_TILES = {(16, 64): [(128, 128, 4, 3)], (16, 128): [(128, 128, 4, 2)]}
# (bits, head-dim bucket) families whose backward keeps block pointers for its streamed loads on sm_90. dK/dV at
# D=128: with Q and dO through descriptors its 32x128 tile spills 56 B (255 registers; 32 B with K and V through
# descriptors too), and the spill-free 16x128 takes 1728 SASS instructions per 128 queries against 1200 for 32x128
# with block pointers. (Descriptors for the LSE and Delta rows as well took every dK/dV tile to 0 spills but
# serialised every wgmma: 40 waits for 40 HGMMA.)
BLOCK_POINTER_FAMILIES = {"dkdv": frozenset({(16, 128)}), "dq": frozenset()}
# Programs of the persistent forward under the interpreter (CPU tests): fewer than the tiles of a test, so each
# program loops over several.
INTERPRETER_PROGRAMS = 3

# The kernels by role; "preprocess" is never autotuned. Tooling that compiles them ahead of time
# (``metagpt_fast/devtools/aot.py``) reads this and the tile tables.
KERNELS = {"fwd": _attn_fwd, "dkdv": _attn_bwd_dkdv, "dq": _attn_bwd_dq, "preprocess": _attn_bwd_preprocess}
# The autotuner's key. Sequence lengths enter it as powers of 2 (``Nq_bucket``, ``Nk_bucket``: kernel arguments used
# for nothing else), so a model that sees many lengths tunes once per bucket, not once per length.
_TUNING_KEY = [
    "Nq_bucket", "Nk_bucket", "GROUP", "HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "MASK_KIND", "MASK_ROW_BCAST",
    "HAS_DROPOUT", "KV_DESCRIPTORS", "DESCRIPTORS",
]  # fmt: skip
# The descriptor flags are in the key: aligned (TMA) and unaligned (block-pointer) inputs compile to different kernels
# with different shared memory and registers, so a tile tuned for one is not evidence for the other. Each kernel keys
# on the names it takes (the forward's flag is KV_DESCRIPTORS, the backward's DESCRIPTORS).


def length_buckets(nq: int, nk: int) -> tuple[int, int]:
    """The autotuning buckets of the query and key lengths: the next powers of 2."""
    return triton.next_power_of_2(max(nq, 1)), triton.next_power_of_2(max(nk, 1))


def block_dim(d: int) -> int:
    """Padded head dim of a tile: a power of 2, at least 16 (the K dimension of a tensor-core product)."""
    return max(16, triton.next_power_of_2(d))


def tile_family(itemsize: int, head_dim: int, head_dim_v: int, heavy: bool = False) -> tuple[int, int, bool]:
    """The (bits, head-dim bucket, heavy) key of the tile tables: prunes the configurations to those that fit.
    ``heavy``: dropout or a dense mask (float32 tiles are small enough for both)."""
    width = max(block_dim(head_dim), block_dim(head_dim_v))
    bits = 32 if itemsize == 4 else 16
    return (bits, 64 if width <= 64 else width, heavy and bits == 16)


def tiles(
    kind: str, family: tuple[int, int, bool], capability: tuple[int, int] = (8, 0), schedule: str = "grid"
) -> list[tuple[int, int, int, int]]:
    """The tiles the autotuner tries for ``kind`` and ``family`` on a GPU of compute ``capability`` (the forward's
    ``schedule`` as :func:`forward_schedule` resolves it: its own list for "warp_specialize")."""
    bits, width, heavy = family
    if kind == "fwd" and schedule == "warp_specialize":
        return WS_TILES[(bits, width)]
    if capability >= (9, 0):
        hopper = (SM90_HEAVY_TILES if heavy else SM90_TILES)[kind]
        if (bits, width) in hopper:
            return hopper[(bits, width)]
    return (HEAVY_TILES if heavy else TILES)[kind][(bits, width)]


def forward_schedule(requested: str | None, family: tuple[int, int, bool], capability: tuple[int, int] | None) -> str:
    """The forward schedule to run: ``requested`` (None: the environment variable :data:`SCHEDULE_ENV_VAR`, else
    "grid"). "warp_specialize" applies to the 16-bit forward without dropout or dense mask at D <= 128 on sm_90
    (``capability``; None under the interpreter, which runs its loop form everywhere) with Q, K and V
    :func:`_tma_aligned` (the launcher checks that); elsewhere the grid runs, as the schedule is a tuning choice and
    the result is the same."""
    if requested is None:
        requested = os.environ.get(SCHEDULE_ENV_VAR, "").strip().lower() or "grid"
    if requested not in FORWARD_SCHEDULES:
        raise ValueError(f"{SCHEDULE_ENV_VAR} / schedule must be one of {FORWARD_SCHEDULES}, got {requested!r}")
    if requested == "warp_specialize" and capability is not None:
        bits, width, heavy = family
        if heavy or (bits, width) not in WS_TILES or capability[0] != 9:
            return "grid"
    return requested


# --------------------------------------------------------------------------------------------- autotune pruning
#
# Shared memory per block that a kernel may opt into, per compute capability (CUDA's programming guide); the device's
# own figure (torch's shared_memory_per_block_optin) takes precedence where torch gives it.
SHARED_MEMORY_PER_BLOCK = {
    (8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448, (10, 0): 232448,
    (12, 0): 101376,
}  # fmt: skip
# Tiles known to spill, from the AOT compiles (python -m metagpt_fast.devtools.aot; docs/triton-attention.md):
# (triton (major, minor), capability, kind, family, tile) -> spilled bytes. The tables above hold no tile that spills
# with triton 3.8; these spill with triton 3.6, the oldest supported version.
KNOWN_SPILLS = {
    ((3, 6), (9, 0), "dkdv", (16, 128, False), (32, 128, 8, 2)): 56,  # 16x128 in the same list does not
    ((3, 6), (9, 0), "fwd", (16, 64, True), (128, 64, 8, 2)): 112,  # the only tile of its list: kept
}
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])


def shared_memory_limit(capability: tuple[int, int], device: torch.device | None = None) -> int:
    """Bytes of shared memory one program may use on ``device`` (or a GPU of ``capability``)."""
    if device is not None:
        optin = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)
        if optin:
            return int(optin)
    known = [cc for cc in SHARED_MEMORY_PER_BLOCK if cc <= capability]
    return SHARED_MEMORY_PER_BLOCK[max(known)] if known else min(SHARED_MEMORY_PER_BLOCK.values())


def shared_memory_estimate(
    kind: str, tile: tuple[int, int, int, int], block_d: int, block_dv: int, itemsize: int, dense_mask: bool = False
) -> int:
    """Shared memory (bytes) a tile of ``kind`` takes: its resident operands (Q in the forward, Q and dO in dQ, K and
    V in dK/dV) once, its streamed ones (the others) once per pipeline stage, and with a dense mask one mask tile. At
    one stage nothing is pipelined and the resident operands pass through shared memory on their way to the tensor
    cores as well. Matches triton 3.8's sm_90 figures with block pointers within 4 KiB for every tile of the tables
    but the D=256 dQ with mask and dropout, which it overestimates (its loads are not pipelined), as it does tiles
    whose streamed loads go through descriptors at one stage (D=256 dK/dV: 50 KiB against 96):
    tests/test_attention_tuning.py."""
    block_m, block_n, _, stages = tile
    width = block_d + block_dv
    if kind == "dkdv":
        resident, streamed = block_n * width, block_m * width
    else:
        resident, streamed = block_m * (block_d if kind == "fwd" else width), block_n * width
    total = resident * (2 if stages <= 1 else 1) + streamed * max(stages, 1)
    if dense_mask:
        total += block_m * block_n
    return total * itemsize


def prune_tiles(
    kind: str,
    candidates: list[tuple[int, int, int, int]],
    *,
    block_d: int,
    block_dv: int,
    itemsize: int,
    shared_limit: int,
    dense_mask: bool = False,
    spills: frozenset | set = frozenset(),
) -> list[tuple[int, int, int, int]]:
    """The tiles of ``candidates`` worth compiling: those whose :func:`shared_memory_estimate` fits in
    ``shared_limit`` and that are not in ``spills`` (the tiles known to spill here). Never empty: if every tile that
    fits spills, those; if none fits, the smallest with its stages cut until it fits (at least 1)."""

    def estimate(tile):
        return shared_memory_estimate(kind, tile, block_d, block_dv, itemsize, dense_mask)

    fits = [tile for tile in candidates if estimate(tile) <= shared_limit]
    clean = [tile for tile in fits if tile not in spills]
    if clean or fits:
        return clean or fits
    m, n, w, s = min(candidates, key=estimate)
    stages = next((k for k in range(s - 1, 0, -1) if estimate((m, n, w, k)) <= shared_limit), 1)
    return [(m, n, w, stages)]


def known_spills(kind: str, family: tuple[int, int, bool], capability: tuple[int, int]) -> frozenset:
    """The tiles of ``kind`` and ``family`` that :data:`KNOWN_SPILLS` lists for this triton and ``capability``."""
    return frozenset(
        tile for (version, cc, k, fam, tile) in KNOWN_SPILLS if (version, cc, k, fam) == (
            TRITON_VERSION, capability, kind, family)
    )  # fmt: skip


def _config_tile(config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _early_config_prune(kind, family, capability, shared_limit):
    """triton.autotune's ``early_config_prune`` for ``kind`` and ``family`` on a device: :func:`prune_tiles` on the
    configurations, with the launch's padded head dims and mask kind."""
    bits, width, _ = family
    spills = known_spills(kind, family, capability)

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        dense = args.get("MASK_KIND", MASK_NONE) != MASK_NONE and not args.get("MASK_ROW_BCAST", False)
        kept = prune_tiles(
            kind, [_config_tile(c) for c in configs], block_d=args.get("BLOCK_D", width),
            block_dv=args.get("BLOCK_DV", width), itemsize=bits // 8, shared_limit=shared_limit, dense_mask=dense,
            spills=spills,
        )  # fmt: skip
        by_tile = {_config_tile(c): c for c in configs}
        return [
            by_tile.get(tile) or triton.Config({"BLOCK_M": tile[0], "BLOCK_N": tile[1]}, num_warps=tile[2],
                                               num_stages=tile[3])
            for tile in kept
        ]  # fmt: skip

    return prune


@functools.cache
def _autotuned(
    kind: str,
    family: tuple[int, int, bool],
    capability: tuple[int, int],
    shared_limit: int | None = None,
    schedule: str = "grid",
):
    """The autotuned kernel of ``kind`` for ``family`` on a GPU of ``capability`` whose programs may use
    ``shared_limit`` bytes of shared memory (None: :func:`shared_memory_limit` of the capability)."""
    shared_limit = shared_memory_limit(capability) if shared_limit is None else shared_limit
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
        for m, n, w, s in tiles(kind, family, capability, schedule)
    ]
    prune = {"early_config_prune": _early_config_prune(kind, family, capability, shared_limit)}
    key = [name for name in _TUNING_KEY if name in KERNELS[kind].arg_names]
    return triton.autotune(configs=configs, key=key, prune_configs_by=prune)(KERNELS[kind])


def _kernel(kind: str, family: tuple[int, int, bool], launch, device: torch.device, schedule: str = "grid"):
    """The kernel to launch on ``device`` and its fixed meta-parameters (none when the autotuner chooses them)."""
    if INTERPRETED:
        m, n, w, s = INTERPRETER_TILES[kind]
        return launch(KERNELS[kind]), {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
    capability = torch.cuda.get_device_capability(device)
    limit = shared_memory_limit(capability, device)
    return launch(_autotuned(kind, family, capability, limit, schedule)), {}


# ----------------------------------------------------------------------------------------------------------------
# launchers


def _identity(kernel):
    return kernel


def _mask_arguments(attn_mask, shape, placeholder):
    """(tensor, strides, MASK_KIND, MASK_ROW_BCAST) for a mask broadcastable to ``shape`` (B, Hq, Nq, Nk).

    The mask is expanded as a view (stride 0 on broadcast dims): nothing dense is materialised.
    """
    if attn_mask is None:
        return placeholder, (0, 0, 0, 0), MASK_NONE, False
    mask = attn_mask.expand(shape)
    kind = MASK_ADDITIVE
    if mask.dtype == torch.bool:  # read its bytes
        mask, kind = mask.view(torch.uint8), MASK_BOOL
    return mask, mask.stride(), kind, mask.stride(2) == 0 or shape[2] == 1


def _tma_aligned(t: torch.Tensor) -> bool:
    """A tensor descriptor can address the rows of ``t`` (B, H, N, D): last stride 1, the row stride 16-byte aligned
    (the descriptor's stride, even for one row), and the start of every (batch, head) matrix 16-byte aligned (the
    batch and head strides of dims longer than 1, and the start of ``t``)."""
    size = t.element_size()
    outer = zip(t.shape[:-2], t.stride()[:-2], strict=True)
    if t.stride(-1) != 1 or (t.stride(-2) * size) % 16 or any(n > 1 and (stride * size) % 16 for n, stride in outer):
        return False
    try:
        start = t.data_ptr()
    except (RuntimeError, NotImplementedError):  # fake tensors while tracing: torch's storages are aligned
        start = t.storage_offset() * size
    return start % 16 == 0


def stream_descriptors(streamed: tuple[torch.Tensor, ...], heavy: bool) -> bool:
    """Whether a kernel reads its ``streamed`` operands (K and V in the forward and dQ, Q and dO in dK/dV) through
    tensor descriptors: as :func:`kv_descriptors` says for the forward's K and V."""
    if heavy or not all(_tma_aligned(t) for t in streamed):
        return False
    if INTERPRETED:
        return True
    first = streamed[0]
    return first.element_size() == 2 and first.is_cuda and torch.cuda.get_device_capability(first.device) >= (9, 0)


def kv_descriptors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heavy: bool) -> bool:
    """Whether the forward reads K and V through tensor descriptors (KV_DESCRIPTORS): where they lower to TMA
    (16-bit data on sm_90 and newer) and under the interpreter (so that the CPU tests run the descriptor path; strided
    inputs there run the block-pointer path), when K and V are :func:`_tma_aligned`, and not with dropout or a dense
    mask (``heavy``): their tiles already use every register, and descriptors made them spill (the 128x64 tile at
    D=64: 728 B with triton 3.6 against 56 B with block pointers)."""
    return stream_descriptors((k, v), heavy)


def _dropout_arguments(dropout_p, seed, placeholder):
    if dropout_p == 0.0:
        return placeholder, 0, 1.0, False
    return seed, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p), True


def attention_forward(q, k, v, attn_mask, out, lse, seed, dropout_p, is_causal, scale, launch=_identity, schedule=None):
    """Fills ``out`` (B, Hq, Nq, Dv) and ``lse`` (:func:`lse_rows`, B, Hq, Nq) float32: the base-2 log-sum-exp
    (+inf on empty rows), split in (max, log2 sum) with an additive mask.

    ``launch`` wraps each kernel before its launch (``torch.library.wrap_triton`` inside a custom op); ``schedule``:
    one of :data:`FORWARD_SCHEDULES` (:func:`forward_schedule`; None: the environment's, else "grid").
    """
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if B * Hq * Nq == 0:
        return
    mask, mask_strides, mask_kind, row_bcast = _mask_arguments(attn_mask, (B, Hq, Nq, Nk), lse)
    seed, threshold, dropout_scale, has_dropout = _dropout_arguments(dropout_p, seed, lse)
    heavy = has_dropout or (mask_kind != MASK_NONE and not row_bcast)
    descriptors = kv_descriptors(q, k, v, heavy)
    if descriptors:
        ensure_allocator(q.device)
    family = tile_family(q.element_size(), D, Dv, heavy)
    capability = None if INTERPRETED else torch.cuda.get_device_capability(q.device)
    schedule = forward_schedule(schedule, family, capability)
    if schedule == "warp_specialize" and not (descriptors and _tma_aligned(q)):
        schedule = "grid"  # the warp-specialised form reads Q, K and V through descriptors only
    kernel, meta = _kernel("fwd", family, launch, q.device, schedule)
    if schedule == "persistent":
        programs = (
            INTERPRETER_PROGRAMS if INTERPRETED else torch.cuda.get_device_properties(q.device).multi_processor_count
        )

        def grid(META):
            return (min(programs, triton.cdiv(Nq, META["BLOCK_M"]) * Hq * B),)
    else:

        def grid(META):
            return (triton.cdiv(Nq, META["BLOCK_M"]), Hq, B)

    kernel[grid](
        q, k, v, mask, out, lse, seed,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *out.stride(),
        B, Hq, Nq, Nk, Hq // Hk, B * Hq * Nq, *length_buckets(Nq, Nk), scale * math.log2(math.e), threshold,
        dropout_scale,
        HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=block_dim(D), BLOCK_DV=block_dim(Dv), IS_CAUSAL=is_causal,
        MASK_KIND=mask_kind, MASK_ROW_BCAST=row_bcast, HAS_DROPOUT=has_dropout, FOLD_SCALE=scale >= 0,
        KV_DESCRIPTORS=descriptors, PERSISTENT=schedule == "persistent",
        WARP_SPECIALIZE=schedule == "warp_specialize", **meta,
    )  # fmt: skip


def attention_backward(
    grad_out, q, k, v, out, lse, attn_mask, seed, dropout_p, is_causal, scale, dq, dk, dv, delta, launch=_identity
):
    """Fills ``dq`` (B, Hq, Nq, D), ``dk`` (B, Hk, Nk, D), ``dv`` (B, Hk, Nk, Dv); ``delta`` (B, Hq, Nq) float32
    is scratch. Each output element is written by exactly one program: no atomics, deterministic."""
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if B * Hq == 0:
        return
    mask, mask_strides, mask_kind, row_bcast = _mask_arguments(attn_mask, (B, Hq, Nq, Nk), lse)
    seed, threshold, dropout_scale, has_dropout = _dropout_arguments(dropout_p, seed, lse)
    heavy = has_dropout or (mask_kind != MASK_NONE and not row_bcast)
    family = tile_family(q.element_size(), D, Dv, heavy)
    dkdv_descriptors = stream_descriptors((q, grad_out), heavy) and family[:2] not in BLOCK_POINTER_FAMILIES["dkdv"]
    dq_descriptors = stream_descriptors((k, v), heavy) and family[:2] not in BLOCK_POINTER_FAMILIES["dq"]
    if dkdv_descriptors or dq_descriptors:
        ensure_allocator(q.device)
    flags = dict(
        HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=block_dim(D), BLOCK_DV=block_dim(Dv), IS_CAUSAL=is_causal,
        MASK_KIND=mask_kind, MASK_ROW_BCAST=row_bcast, HAS_DROPOUT=has_dropout,
    )  # fmt: skip
    scalars = (
        Hq, Nq, Nk, Hq // Hk, B * Hq * Nq, *length_buckets(Nq, Nk), scale, scale * math.log2(math.e), threshold,
        dropout_scale,
    )  # fmt: skip

    if Nq > 0:
        block_m = preprocess_block_m(Dv)
        launch(_attn_bwd_preprocess)[(triton.cdiv(Nq, block_m), Hq, B)](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), Hq, Nq,
            HEAD_DIM_V=Dv, BLOCK_DV=block_dim(Dv), BLOCK_M=block_m, num_warps=4,
        )  # fmt: skip
    if Nk > 0:
        kernel, meta = _kernel("dkdv", family, launch, q.device)
        kernel[lambda META: (triton.cdiv(Nk, META["BLOCK_N"]), Hk, B)](
            q, k, v, mask, grad_out, lse, delta, dk, dv, seed,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *grad_out.stride(), *dk.stride(), *dv.stride(),
            *scalars, **flags, DESCRIPTORS=dkdv_descriptors, **meta,
        )  # fmt: skip
    if Nq > 0:
        kernel, meta = _kernel("dq", family, launch, q.device)
        kernel[lambda META: (triton.cdiv(Nq, META["BLOCK_M"]), Hq, B)](
            q, k, v, mask, grad_out, lse, delta, dq, seed,
            *q.stride(), *k.stride(), *v.stride(), *mask_strides, *grad_out.stride(), *dq.stride(),
            *scalars, **flags, DESCRIPTORS=dq_descriptors, **meta,
        )  # fmt: skip


def lse_rows(attn_mask) -> int:
    """Leading size of the saved row statistics: 2 (max and log2 sum apart) with an additive mask, else 1."""
    return 2 if attn_mask is not None and attn_mask.dtype != torch.bool else 1


def preprocess_block_m(head_dim_v: int) -> int:
    # O and dO tiles in fp32 registers: 64 x 128 x 2 over 128 threads is 128 registers per thread.
    return 64 if block_dim(head_dim_v) <= 128 else 32
