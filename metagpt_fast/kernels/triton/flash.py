"""flash-attn's attention over packed variable-length batches in Triton: forward, backward preprocess, dK/dV and dQ.

Inputs are packed (no padding): q (Tq, Hq, D), k (Tk, Hk, D), v (Tk, Hk, Dv), sequence ``b`` owning rows
``[cu_q[b], cu_q[b+1])`` of q and ``[cu_k[b], cu_k[b+1])`` of k and v. Every kernel reads its sequence's start and
length from ``cu_seqlens`` and returns at once when its block lies past that length, so a grid sized by the longest
sequence costs nothing for the shorter ones.

Per sequence (``Lq``, ``Lk``, ``shift = Lk - Lq``: bottom-right alignment), local query ``i`` sees key ``j`` iff

    (no right window or j <= i + shift + window_right) and (no left window or j >= i + shift - window_left)

(causal is ``window_right = 0``). The score is ``s = scale * q.k``, then ``softcap * tanh(s / softcap)`` with a
softcap, then ``- slope[b, h] * |i + shift - j|`` with ALiBi. The window edges, the softcap and ALiBi are
compile-time flags (``WINDOW_LEFT``, ``WINDOW_RIGHT``, ``SOFTCAP``, ``ALIBI``): a call without them compiles none of
their code.

Block skipping: the keys some row of a query block may see form one interval (the union of the rows' sliding
intervals), so the forward and dQ loops run over the key blocks that meet it and no others; the dK/dV loop runs over
the query blocks that meet the matching interval of rows. Within those bounds, the blocks every row sees whole (no
window edge and no end of the keys crosses them) skip the per-element mask; only the blocks at the two edges are
masked. A window of ``w`` thus costs O(N * (w + block)), not O(N^2). Each kernel can count the blocks it visits
(``COUNT_VISITS``; tests).

Scores are kept in base 2 (``log2(e)`` folded into the scale, the softcap and the slopes), so every exponential is
an ``exp2``. The forward returns ``lse`` (Hq, Tq) float32, natural log, ``+inf`` on rows that see no key (their
output is 0); the backward reads it back (times ``log2(e)``). Backward (split as in kernels/triton/attention.py, no
atomics, deterministic):

    Delta_i = rowsum(dO_i * O_i)                       (_flash_bwd_preprocess)
    P = exp2(S - LSE);  dV = P^T dO;  dP = dO V^T;  dS = P * (dP - Delta) [* (1 - tanh^2) with a softcap]
    dK = scale * dS^T Q     (_flash_bwd_dkdv: one program per key block, looping over the query heads of its GQA
                             group and the query blocks that see it)
    dQ = scale * dS K       (_flash_bwd_dq: one program per query block, over the key blocks it sees)

The forward reads K and V through per-sequence tensor descriptors where they lower to TMA (16-bit on sm_90) and
under the interpreter, else through block pointers. The softcap's tanh is a short exp2 form for 16-bit inputs and an
accurate one (a polynomial near 0) for float32. fp32 matmuls use ``input_precision="ieee"`` (no TF32). Token
offsets are int64. Not served: dropout (the reference serves it).
"""

import functools
import math
import warnings

import torch
import triton
import triton.language as tl

from metagpt_fast._spec import triton_interpreted
from metagpt_fast.kernels.triton.allocator import ensure_allocator

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 256
INTERPRETED = triton_interpreted()

warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated")


# ----------------------------------------------------------------------------------------------------------------
# helpers


@triton.jit
def _load_rows(base, start, n, stride_n, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``[start, start + BLOCK_N)`` of an (n, D) matrix with unit column stride, as a (BLOCK_N, BLOCK_D) tile;
    rows past ``n`` (the next sequence's tokens) and columns past ``D`` read 0."""
    ptr = tl.make_block_ptr(base, (n, D), (stride_n, 1), (start, 0), (BLOCK_N, BLOCK_D), (1, 0))
    if BLOCK_D == D:
        tile = tl.load(ptr, boundary_check=(0,), padding_option="zero")
    else:
        tile = tl.load(ptr, boundary_check=(0, 1), padding_option="zero")
    return tile


@triton.jit
def _store_rows(
    base, tile, start, n, stride_n, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):  # fmt: skip
    """Stores a (BLOCK_N, BLOCK_D) tile as rows ``[start, start + BLOCK_N)`` of an (n, D) matrix with unit column
    stride (rows past ``n`` and columns past ``D`` are left alone). The block's offset is int64 (one sequence may pass
    2**31 elements), the offsets within it int32 (an int64 pointer tile costs registers: 8 B spilled in dK/dV)."""
    rows = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + start.to(tl.int64) * stride_n + (rows[:, None] * stride_n + offs_d[None, :])
    if BLOCK_D == D:
        tl.store(ptrs, tile, mask=rows[:, None] < n - start)
    else:
        tl.store(ptrs, tile, mask=(rows[:, None] < n - start) & (offs_d[None, :] < D))


@triton.jit
def _tanh(x):
    """tanh in float32 from exp2 (no libdevice: it does not run under the interpreter). Near 0, where
    ``1 - exp(-2|x|)`` cancels, a Taylor polynomial (|x| < 0.25: next term below 2e-10 relative)."""
    ax = tl.abs(x)
    e = tl.exp2(ax * (-2.0 * LOG2E))
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    poly = x2 * (-1382.0 / 155925.0) + 62.0 / 2835.0
    poly = poly * x2 - 17.0 / 315.0
    poly = poly * x2 + 2.0 / 15.0
    poly = poly * x2 - 1.0 / 3.0
    small = x + x * x2 * poly
    return tl.where(ax < 0.25, small, tl.where(x < 0, -big, big))


@triton.jit
def _tanh_fast(x):
    """tanh as ``1 - 2 / (exp(2x) + 1)``: one exp2 and one reciprocal, exact limits at overflow, an absolute error of
    a few float32 roundings (relative near 0: a score error far below what 16-bit inputs carry already). The
    polynomial of :func:`_tanh` costs ~20 more instructions per score (the 16-bit forward's main loop: 1952 SASS
    instructions per 128 keys on sm_90 against 670 without softcap)."""
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def _scores(
    qk, rows, cols, shift, Lk, window_left, window_right, qk_scale, cap_scale, cap2, slope2,
    MASKED: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr, TRANSPOSED: tl.constexpr, ACCURATE_TANH: tl.constexpr,
):  # fmt: skip
    """Base-2 scores of the products ``qk`` (queries ``rows`` by keys ``cols``, local indices; keys by queries when
    ``TRANSPOSED``), and the tanh of the softcap (``qk`` itself without one). ``MASKED``: keys past ``Lk`` and
    outside the window read -inf (the blocks at the edges only). ``ACCURATE_TANH``: float32 inputs (:func:`_tanh`),
    else :func:`_tanh_fast`."""
    if TRANSPOSED:
        r = rows[None, :]
        c = cols[:, None]
    else:
        r = rows[:, None]
        c = cols[None, :]
    if SOFTCAP:
        if ACCURATE_TANH:  # cap_scale = scale / softcap; cap2 = softcap * log2(e)
            t = _tanh(qk * cap_scale)
        else:
            t = _tanh_fast(qk * cap_scale)
        s = t * cap2
    else:
        t = qk
        s = qk * qk_scale
    if ALIBI:
        s = s - slope2 * tl.abs(r + shift - c).to(tl.float32)
    if MASKED:
        valid = c < Lk
        if WINDOW_RIGHT:
            valid = valid & (c <= r + shift + window_right)
        if WINDOW_LEFT:
            valid = valid & (c >= r + shift - window_left)
        s = tl.where(valid, s, float("-inf"))
    return s, t


@triton.jit
def _sequence(Cu_q, Cu_k, b):
    """(start of the sequence's queries, Lq, start of its keys, Lk) of sequence ``b``; starts in int64."""
    start_q = tl.load(Cu_q + b)
    start_k = tl.load(Cu_k + b)
    Lq = tl.load(Cu_q + b + 1) - start_q
    Lk = tl.load(Cu_k + b + 1) - start_k
    return start_q.to(tl.int64), Lq, start_k.to(tl.int64), Lk


@triton.jit
def _key_range(
    m0, last, shift, Lk, window_left, window_right,
    BLOCK_N: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
):  # fmt: skip
    """For the query rows ``[m0, last]``: (lo, full_lo, full_hi, hi) with key blocks ``[lo, hi)`` the ones some row
    sees, and ``[full_lo, full_hi)`` (multiples of BLOCK_N) the ones every row sees whole (no mask needed)."""
    if WINDOW_LEFT:
        lo = tl.maximum(m0 + shift - window_left, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(last + shift - window_left, 0), BLOCK_N) * BLOCK_N
    else:
        lo = m0 * 0
        full_lo = lo
    if WINDOW_RIGHT:
        hi = tl.minimum(last + shift + window_right + 1, Lk)
        full_hi = tl.maximum(tl.minimum(m0 + shift + window_right + 1, Lk), 0) // BLOCK_N * BLOCK_N
    else:
        hi = Lk
        full_hi = Lk // BLOCK_N * BLOCK_N
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_range(
    n0, last, shift, Lq, window_left, window_right,
    BLOCK_M: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
):  # fmt: skip
    """For the keys ``[n0, last]``: (lo, full_lo, full_hi, hi) with query blocks ``[lo, hi)`` the ones whose rows see
    some of these keys, ``[full_lo, full_hi)`` (multiples of BLOCK_M) those whose every row sees all of them."""
    if WINDOW_RIGHT:  # j <= i + shift + window_right  <=>  i >= j - shift - window_right
        lo = tl.maximum(n0 - shift - window_right, 0) // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(last - shift - window_right, 0), BLOCK_M) * BLOCK_M
    else:
        lo = n0 * 0
        full_lo = lo
    if WINDOW_LEFT:  # j >= i + shift - window_left  <=>  i <= j - shift + window_left
        hi = tl.minimum(last - shift + window_left + 1, Lq)
        full_hi = tl.maximum(n0 - shift + window_left + 1, 0) // BLOCK_M * BLOCK_M
    else:
        hi = Lq
        full_hi = tl.cdiv(Lq, BLOCK_M) * BLOCK_M  # rows past Lq read LSE = +inf: P = 0, no mask needed
    hi = tl.maximum(hi, lo)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, full_lo, full_hi, hi


# ----------------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _flash_fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, rows, lo, hi, stride_kt, stride_vt, Lk, shift,
    window_left, window_right, qk_scale, cap_scale, cap2, slope2, visits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, FOLD_SCALE: tl.constexpr, COUNT_VISITS: tl.constexpr,
    KV_DESCRIPTORS: tl.constexpr,
):  # fmt: skip
    """Online softmax over the key blocks ``[lo, hi)``; ``MASKED`` blocks get the per-element mask.
    ``KV_DESCRIPTORS``: ``k_base`` and ``v_base`` are tensor descriptors of the sequence's keys (see _flash_fwd).

    ``FOLD_SCALE`` (``qk_scale >= 0``, no softcap, no ALiBi): in unmasked blocks the row maximum is taken on the raw
    products and scaled once per row, and the scale goes into the exponent as one fused multiply-add per score."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if COUNT_VISITS:
            tl.atomic_add(visits, 1)
        if KV_DESCRIPTORS:  # rows past Lk and columns past HEAD_DIM read 0
            k = k_base.load([start_n, 0])
        else:
            k = _load_rows(k_base, start_n, Lk, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BLOCK_M, BLOCK_N)
        if FOLD_SCALE and not MASKED and not SOFTCAP and not ALIBI:
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(tl.fma(qk, qk_scale, -m_use[:, None]))
        else:
            s, _ = _scores(
                qk, rows, cols, shift, Lk, window_left, window_right, qk_scale, cap_scale, cap2, slope2,
                MASKED, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI, False, q.dtype == tl.float32,
            )  # fmt: skip
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with no visible key so far has m = -inf: subtract 0 instead so exp2 gives 0, not NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if KV_DESCRIPTORS:
            v = v_base.load([start_n, 0])
        else:
            v = _load_rows(v_base, start_n, Lk, stride_vt, HEAD_DIM_V, BLOCK_N, BLOCK_DV)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _flash_fwd(
    Q, K, V, Cu_q, Cu_k, Alibi, Out, Lse, Visits,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_ab, stride_lh,
    Hq, GROUP, window_left, window_right, Lq_bucket, Lk_bucket,
    qk_scale, cap_scale, cap2,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    FOLD_SCALE: tl.constexpr,
    COUNT_VISITS: tl.constexpr,
    KV_DESCRIPTORS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(max_seqlen_q, BLOCK_M), Hq, B). Q (Tq, Hq, D), K (Tk, Hk, D), V (Tk, Hk, Dv), Out (Tq, Hq, Dv),
    all with unit last stride; Cu_q, Cu_k (B + 1,) int32; Alibi (B, Hq) float32 (row stride ``stride_ab``); Lse
    (Hq, Tq) float32 (row stride ``stride_lh``); Visits (B, Hq, grid 0) int32 blocks visited per program (only
    with ``COUNT_VISITS``). ``Lq_bucket``, ``Lk_bucket``: the autotuner's key only.

    ``KV_DESCRIPTORS``: K and V are read through tensor descriptors of the sequence's (Lk, D) rows (on sm_90, TMA
    copies into shared memory, in place of every thread's cp.async address arithmetic; rows past Lk read 0). They need
    unit last strides, 16-byte aligned token and head strides and base (:func:`kv_descriptors`), and scratch memory
    from triton's allocator for the descriptors."""
    tl.static_assert(BLOCK_D >= HEAD_DIM)
    tl.static_assert(BLOCK_DV >= HEAD_DIM_V)
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    start_q, Lq, start_k, Lk = _sequence(Cu_q, Cu_k, b)
    m0 = pid_m * BLOCK_M
    if m0 >= Lq:
        return
    shift = Lk - Lq
    hk = h // GROUP
    rows = m0 + tl.arange(0, BLOCK_M)
    last = tl.minimum(m0 + BLOCK_M, Lq) - 1
    visits = Visits + (b * Hq + h) * tl.num_programs(0) + pid_m
    if ALIBI:
        slope2 = tl.load(Alibi + b * stride_ab + h) * LOG2E
    else:
        slope2 = 0.0

    q = _load_rows(Q + start_q * stride_qt + h * stride_qh, m0, Lq, stride_qt, HEAD_DIM, BLOCK_M, BLOCK_D)
    k_base = K + start_k * stride_kt + hk * stride_kh
    v_base = V + start_k * stride_vt + hk * stride_vh
    if KV_DESCRIPTORS:
        # At least one row: a sequence without keys visits no key block, but its descriptor is still built.
        rows_k = tl.maximum(Lk, 1)
        k_base = tl.make_tensor_descriptor(k_base, [rows_k, HEAD_DIM], [stride_kt, 1], [BLOCK_N, BLOCK_D])
        v_base = tl.make_tensor_descriptor(v_base, [rows_k, HEAD_DIM_V], [stride_vt, 1], [BLOCK_N, BLOCK_DV])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _key_range(
        m0, last, shift, Lk, window_left, window_right, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT
    )
    # Each loop guarded, not left to a zero-trip loop: on sm_90 the path that skips an empty loop redefines the
    # accumulator registers while a wgmma is in flight, and ptxas then serialises every wgmma of the kernel (C7515).
    if lo < full_lo:
        acc, l_i, m_i = _flash_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, rows, lo, full_lo, stride_kt, stride_vt, Lk, shift,
            window_left, window_right, qk_scale, cap_scale, cap2, slope2, visits,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, True, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI,
            FOLD_SCALE, COUNT_VISITS, KV_DESCRIPTORS,
        )  # fmt: skip
    if full_lo < full_hi:
        acc, l_i, m_i = _flash_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, rows, full_lo, full_hi, stride_kt, stride_vt, Lk, shift,
            window_left, window_right, qk_scale, cap_scale, cap2, slope2, visits,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, False, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI,
            FOLD_SCALE, COUNT_VISITS, KV_DESCRIPTORS,
        )  # fmt: skip
    if full_hi < hi:
        acc, l_i, m_i = _flash_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, rows, full_hi, hi, stride_kt, stride_vt, Lk, shift,
            window_left, window_right, qk_scale, cap_scale, cap2, slope2, visits,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, True, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI,
            FOLD_SCALE, COUNT_VISITS, KV_DESCRIPTORS,
        )  # fmt: skip

    # A row that sees no key has l = 0 and acc = 0: output 0, LSE = +inf (so the backward's P is 0).
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * LN2)
    tl.store(Lse + h.to(tl.int64) * stride_lh + start_q + rows, lse, mask=rows < Lq)
    o_base = Out + start_q * stride_ot + h * stride_oh
    _store_rows(o_base, out.to(Out.dtype.element_ty), m0, Lq, stride_ot, HEAD_DIM_V, BLOCK_M, BLOCK_DV)


# ----------------------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _flash_bwd_preprocess(
    Out, DOut, Delta, stride_ot, stride_oh, stride_dot, stride_doh, stride_lh, Tq,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Tq, BLOCK_M), Hq): Delta (Hq, Tq) float32 = rowsum(dO * O) over the packed tokens."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    start = pid * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    n = Tq - start
    o_base = Out + start.to(tl.int64) * stride_ot + h * stride_oh  # token offsets in int64
    do_base = DOut + start.to(tl.int64) * stride_dot + h * stride_doh
    o = _load_rows(o_base, 0, n, stride_ot, HEAD_DIM_V, BLOCK_M, BLOCK_DV).to(tl.float32)
    do = _load_rows(do_base, 0, n, stride_dot, HEAD_DIM_V, BLOCK_M, BLOCK_DV).to(tl.float32)
    tl.store(Delta + h.to(tl.int64) * stride_lh + start + rows, tl.sum(o * do, 1), mask=rows < n)


@triton.jit
def _flash_bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, cols, lo, hi, stride_qt, stride_dot, Lq, Lk, shift,
    window_left, window_right, qk_scale, cap_scale, cap2, slope2, visits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, MASKED: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, COUNT_VISITS: tl.constexpr,
):  # fmt: skip
    """Accumulates dK, dV of one key block over the query blocks ``[lo, hi)`` of one query head, keys by queries
    (both products accumulate without transposing the accumulators). Rows past Lq read LSE = +inf: P = 0."""
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        if COUNT_VISITS:
            tl.atomic_add(visits, 1)
        q = _load_rows(q_base, start_m, Lq, stride_qt, HEAD_DIM, BLOCK_M, BLOCK_D)
        lse = tl.load(lse_base + rows, mask=rows < Lq, other=float("inf")) * LOG2E
        qk_t = tl.dot(k, tl.trans(q), input_precision="ieee")  # (BLOCK_N, BLOCK_M)
        s_t, t_t = _scores(
            qk_t, rows, cols, shift, Lk, window_left, window_right, qk_scale, cap_scale, cap2, slope2,
            MASKED, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI, True, q.dtype == tl.float32,
        )  # fmt: skip
        p_t = tl.exp2(s_t - lse[None, :])
        do = _load_rows(do_base, start_m, Lq, stride_dot, HEAD_DIM_V, BLOCK_M, BLOCK_DV)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")  # (BLOCK_N, BLOCK_M)
        delta = tl.load(delta_base + rows, mask=rows < Lq, other=0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision="ieee")
    return dk, dv


@triton.jit
def _flash_bwd_dkdv(
    Q, K, V, Cu_q, Cu_k, Alibi, DOut, Lse, Delta, DK, DV, Visits,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_ab, stride_lh,
    Hk, GROUP, window_left, window_right, Lq_bucket, Lk_bucket,
    sm_scale, qk_scale, cap_scale, cap2,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    COUNT_VISITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(max_seqlen_k, BLOCK_N), Hk, B). dK (Tk, Hk, D), dV (Tk, Hk, Dv): each sums over the GROUP query
    heads of its key/value head inside this program, so no two programs write the same element. Keys that no query
    sees get 0. Delta and Lse (Hq, Tq), row stride ``stride_lh``; Visits (B, Hk, grid 0) as in the forward."""
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    start_q, Lq, start_k, Lk = _sequence(Cu_q, Cu_k, b)
    n0 = pid_n * BLOCK_N
    if n0 >= Lk:
        return
    shift = Lk - Lq
    cols = n0 + tl.arange(0, BLOCK_N)
    last = tl.minimum(n0 + BLOCK_N, Lk) - 1
    visits = Visits + (b * Hk + hk) * tl.num_programs(0) + pid_n

    k = _load_rows(K + start_k * stride_kt + hk * stride_kh, n0, Lk, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D)
    v = _load_rows(V + start_k * stride_vt + hk * stride_vh, n0, Lk, stride_vt, HEAD_DIM_V, BLOCK_N, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _query_range(
        n0, last, shift, Lq, window_left, window_right, BLOCK_M, WINDOW_LEFT, WINDOW_RIGHT
    )
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + start_q * stride_qt + h * stride_qh
        do_base = DOut + start_q * stride_dot + h * stride_doh
        lse_base = Lse + h.to(tl.int64) * stride_lh + start_q
        delta_base = Delta + h.to(tl.int64) * stride_lh + start_q
        if ALIBI:
            slope2 = tl.load(Alibi + b * stride_ab + h) * LOG2E
        else:
            slope2 = 0.0
        if lo < full_lo:
            dk, dv = _flash_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, cols, lo, full_lo, stride_qt, stride_dot,
                Lq, Lk, shift, window_left, window_right, qk_scale, cap_scale, cap2, slope2, visits,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, True, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI,
                COUNT_VISITS,
            )  # fmt: skip
        if full_lo < full_hi:
            dk, dv = _flash_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, cols, full_lo, full_hi, stride_qt, stride_dot,
                Lq, Lk, shift, window_left, window_right, qk_scale, cap_scale, cap2, slope2, visits,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, False, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI,
                COUNT_VISITS,
            )  # fmt: skip
        if full_hi < hi:
            dk, dv = _flash_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, cols, full_hi, hi, stride_qt, stride_dot,
                Lq, Lk, shift, window_left, window_right, qk_scale, cap_scale, cap2, slope2, visits,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, True, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI,
                COUNT_VISITS,
            )  # fmt: skip

    dk_base = DK + start_k * stride_dkt + hk * stride_dkh
    dv_base = DV + start_k * stride_dvt + hk * stride_dvh
    _store_rows(dk_base, (dk * sm_scale).to(DK.dtype.element_ty), n0, Lk, stride_dkt, HEAD_DIM, BLOCK_N, BLOCK_D)
    _store_rows(dv_base, dv.to(DV.dtype.element_ty), n0, Lk, stride_dvt, HEAD_DIM_V, BLOCK_N, BLOCK_DV)


@triton.jit
def _flash_bwd_dq_inner(
    dq, q, do, lse, delta, k_base, v_base, rows, lo, hi, stride_kt, stride_vt, Lk, shift,
    window_left, window_right, qk_scale, cap_scale, cap2, slope2, visits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, COUNT_VISITS: tl.constexpr,
):  # fmt: skip
    """Accumulates dQ of one query block over the key blocks ``[lo, hi)`` (``MASKED`` as in the forward)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        if COUNT_VISITS:
            tl.atomic_add(visits, 1)
        k = _load_rows(k_base, start_n, Lk, stride_kt, HEAD_DIM, BLOCK_N, BLOCK_D)
        v = _load_rows(v_base, start_n, Lk, stride_vt, HEAD_DIM_V, BLOCK_N, BLOCK_DV)
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        s, t = _scores(
            qk, rows, cols, shift, Lk, window_left, window_right, qk_scale, cap_scale, cap2, slope2,
            MASKED, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI, False, q.dtype == tl.float32,
        )  # fmt: skip
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision="ieee")
    return dq


@triton.jit
def _flash_bwd_dq(
    Q, K, V, Cu_q, Cu_k, Alibi, DOut, Lse, Delta, DQ, Visits,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_ab, stride_lh,
    Hq, GROUP, window_left, window_right, Lq_bucket, Lk_bucket,
    sm_scale, qk_scale, cap_scale, cap2,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    COUNT_VISITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(max_seqlen_q, BLOCK_M), Hq, B). dQ (Tq, Hq, D); rows that see no key get 0."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    start_q, Lq, start_k, Lk = _sequence(Cu_q, Cu_k, b)
    m0 = pid_m * BLOCK_M
    if m0 >= Lq:
        return
    shift = Lk - Lq
    hk = h // GROUP
    rows = m0 + tl.arange(0, BLOCK_M)
    last = tl.minimum(m0 + BLOCK_M, Lq) - 1
    visits = Visits + (b * Hq + h) * tl.num_programs(0) + pid_m
    if ALIBI:
        slope2 = tl.load(Alibi + b * stride_ab + h) * LOG2E
    else:
        slope2 = 0.0

    q = _load_rows(Q + start_q * stride_qt + h * stride_qh, m0, Lq, stride_qt, HEAD_DIM, BLOCK_M, BLOCK_D)
    do = _load_rows(DOut + start_q * stride_dot + h * stride_doh, m0, Lq, stride_dot, HEAD_DIM_V, BLOCK_M, BLOCK_DV)
    lse = tl.load(Lse + h.to(tl.int64) * stride_lh + start_q + rows, mask=rows < Lq, other=float("inf")) * LOG2E
    delta = tl.load(Delta + h.to(tl.int64) * stride_lh + start_q + rows, mask=rows < Lq, other=0.0)
    k_base = K + start_k * stride_kt + hk * stride_kh
    v_base = V + start_k * stride_vt + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, full_lo, full_hi, hi = _key_range(
        m0, last, shift, Lk, window_left, window_right, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT
    )
    if lo < full_lo:  # each loop guarded, as in the forward
        dq = _flash_bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, rows, lo, full_lo, stride_kt, stride_vt, Lk, shift,
            window_left, window_right, qk_scale, cap_scale, cap2, slope2, visits,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, True, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI,
            COUNT_VISITS,
        )  # fmt: skip
    if full_lo < full_hi:
        dq = _flash_bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, rows, full_lo, full_hi, stride_kt, stride_vt, Lk, shift,
            window_left, window_right, qk_scale, cap_scale, cap2, slope2, visits,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, False, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI,
            COUNT_VISITS,
        )  # fmt: skip
    if full_hi < hi:
        dq = _flash_bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, rows, full_hi, hi, stride_kt, stride_vt, Lk, shift,
            window_left, window_right, qk_scale, cap_scale, cap2, slope2, visits,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, True, WINDOW_LEFT, WINDOW_RIGHT, SOFTCAP, ALIBI,
            COUNT_VISITS,
        )  # fmt: skip
    dq_base = DQ + start_q * stride_dqt + h * stride_dqh
    _store_rows(dq_base, (dq * sm_scale).to(DQ.dtype.element_ty), m0, Lq, stride_dqt, HEAD_DIM, BLOCK_M, BLOCK_D)


# ----------------------------------------------------------------------------------------------------------------
# configurations
#
# Tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per (operand bits, head-dim bucket). As in attention.py: the row
# block of each kernel (BLOCK_M for the forward and dQ, BLOCK_N for dK/dV) is 64 rows with 4 warps or 128 with 8, so
# that Hopper's wgmma (64 rows per warpgroup) never has two warpgroups compute the same product; the few smaller
# ones (D=256 backward) run on mma.sync.

# Every tile below compiles without spills for sm_80 and sm_90 with triton 3.8, both for the training default
# (causal only) and the heaviest variant (both window edges, softcap and ALiBi); the AOT cases of
# metagpt_fast/devtools/aot.py check it. Replaced tiles and their figures (registers, spilled bytes) in comments.
FWD_TILES = {
    (16, 64): [(128, 64, 8, 3), (64, 64, 4, 3)],
    (16, 128): [(128, 64, 8, 2), (64, 64, 4, 3)],
    (16, 256): [(64, 32, 4, 1)],  # 64x32 with 2 stages: 255, 24 B on sm_90 with every feature
    (32, 64): [(32, 32, 4, 2)],
    (32, 128): [(16, 16, 4, 2)],
    (32, 256): [(16, 16, 4, 2)],
}
DKDV_TILES = {  # BLOCK_M is the streamed query block, BLOCK_N the resident key block
    # 32x128 with 2 stages: 255, 8-16 B on sm_80; 32x64 and 16x64 on 4 warps: 255, 8-64 B
    (16, 64): [(32, 128, 8, 1)],
    # 16x128 with 2 stages: 255, 16 B on sm_80 with every feature; 16x64 on 4 warps: 255, 120-232 B
    (16, 128): [(16, 128, 8, 1)],
    # 16x32: 255, 120-184 B; 32x16 on 4 warps: 16 B on sm_90 (causal only)
    (16, 256): [(64, 16, 4, 1)],
    # float32 on FMA units: 32x32 on 4 warps: 255, 40-48 B; 16x16 on 4 warps: 168, 24 B (D=128) and 48 B (D=256)
    (32, 64): [(16, 32, 4, 1)],
    (32, 128): [(16, 16, 8, 1)],
    (32, 256): [(16, 16, 8, 1)],
}
DQ_TILES = {  # BLOCK_M is the resident query block, BLOCK_N the streamed key block
    (16, 64): [(128, 64, 8, 2), (64, 64, 4, 2)],
    (16, 128): [(128, 32, 8, 2), (64, 32, 4, 2)],
    (16, 256): [(32, 32, 4, 1)],
    (32, 64): [(32, 32, 4, 2)],
    (32, 128): [(32, 16, 8, 2)],  # 32x16 on 4 warps: 255, 304-312 B on sm_90 with every feature
    (32, 256): [(16, 16, 4, 2)],
}
TILES = {"fwd": FWD_TILES, "dkdv": DKDV_TILES, "dq": DQ_TILES}
# float32 dK/dV on FMA units: dK, dV, K and V of the key block stay in registers while the query blocks stream, and
# ptxas picks register targets of 128 or 168 for these kernels, spilling 8-40 B with every tile tried (16x16 and
# 16x32 on 4 or 8 warps; causal or with every feature). float32 is the accuracy path, not the speed path: allowed,
# as in kernels/triton/attention.py (FP32_DKDV_256_SPILL).
FP32_DKDV_SPILL = 48

# Under TRITON_INTERPRET=1 (CPU tests) one small configuration; BLOCK_M != BLOCK_N so both orders of the block
# bookkeeping are exercised.
INTERPRETER_TILES = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}
PREPROCESS_BLOCK_M = 64

KERNELS = {"fwd": _flash_fwd, "dkdv": _flash_bwd_dkdv, "dq": _flash_bwd_dq, "preprocess": _flash_bwd_preprocess}
_TUNING_KEY = [
    "Lq_bucket", "Lk_bucket", "GROUP", "HEAD_DIM", "HEAD_DIM_V", "WINDOW_LEFT", "WINDOW_RIGHT", "SOFTCAP", "ALIBI",
]  # fmt: skip


def block_dim(d: int) -> int:
    """Padded head dim of a tile: a power of 2, at least 16 (the K dimension of a tensor-core product)."""
    return max(16, triton.next_power_of_2(d))


def tile_family(itemsize: int, head_dim: int, head_dim_v: int) -> tuple[int, int]:
    """The (bits, head-dim bucket) key of the tile tables."""
    width = max(block_dim(head_dim), block_dim(head_dim_v))
    return (32 if itemsize == 4 else 16, 64 if width <= 64 else width)


def length_buckets(max_seqlen_q: int, max_seqlen_k: int) -> tuple[int, int]:
    """The autotuning buckets of the longest query and key lengths: the next powers of 2."""
    return triton.next_power_of_2(max(max_seqlen_q, 1)), triton.next_power_of_2(max(max_seqlen_k, 1))


@functools.cache
def _autotuned(kind: str, family: tuple[int, int]):
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in TILES[kind][family]
    ]
    return triton.autotune(configs=configs, key=_TUNING_KEY)(KERNELS[kind])


def _kernel(kind: str, family: tuple[int, int], launch, tiles=None):
    """The kernel to launch and its fixed meta-parameters (none when the autotuner chooses them). ``tiles``:
    (BLOCK_M, BLOCK_N) to force (tests)."""
    if INTERPRETED or tiles is not None:
        m, n, w, s = INTERPRETER_TILES[kind] if tiles is None else (*tiles, 4, 1)
        return launch(KERNELS[kind]), {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
    return launch(_autotuned(kind, family)), {}


# ----------------------------------------------------------------------------------------------------------------
# launchers


def _identity(kernel):
    return kernel


def features(max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap, alibi_slopes) -> dict:
    """The compile-time flags of a call, and the window sizes it passes. A window edge that no (query, key) pair of
    sequences this long can cross is no window (left: ``window_left >= max_seqlen_k - 1`` keeps every key before
    the diagonal; right: ``window_right >= max_seqlen_q - 1`` every key after it): one specialisation fewer, and
    no 32-bit overflow for huge windows."""
    left = 0 <= window_left < max_seqlen_k - 1
    right = 0 <= window_right < max_seqlen_q - 1
    flags = {
        "WINDOW_LEFT": left,
        "WINDOW_RIGHT": right,
        "SOFTCAP": softcap > 0,
        "ALIBI": alibi_slopes is not None,
    }
    fold = softmax_scale >= 0 and softcap <= 0 and alibi_slopes is None
    return {"flags": flags, "fold": fold, "windows": (window_left if left else 0, window_right if right else 0)}


def _scales(softmax_scale: float, softcap: float) -> tuple[float, float, float]:
    """(qk_scale, cap_scale, cap2): the base-2 scale, and with a softcap ``scale / softcap`` and
    ``softcap * log2(e)``."""
    log2e = math.log2(math.e)
    if softcap > 0:
        return softmax_scale * log2e, softmax_scale / softcap, softcap * log2e
    return softmax_scale * log2e, 0.0, 0.0


def _alibi(alibi_slopes, placeholder):
    if alibi_slopes is None:
        return placeholder, 0
    return alibi_slopes, alibi_slopes.stride(0)


def _tma_aligned(t) -> bool:
    """A tensor descriptor can address the rows of ``t`` (T, H, D) per (sequence, head): unit last stride, and the
    token stride, the head stride (for more than one head) and the start 16-byte aligned."""
    size = t.element_size()
    if t.stride(-1) != 1 or (t.stride(0) * size) % 16 or (t.shape[1] > 1 and (t.stride(1) * size) % 16):
        return False
    try:
        start = t.data_ptr()
    except (RuntimeError, NotImplementedError):  # fake tensors while tracing: torch's storages are aligned
        start = t.storage_offset() * size
    return start % 16 == 0


def kv_descriptors(q, k, v) -> bool:
    """Whether the forward reads K and V through tensor descriptors (KV_DESCRIPTORS): where they lower to TMA
    (16-bit data on sm_90 and newer), and under the interpreter so that the CPU tests run that path (unaligned inputs
    there run the block-pointer path), when K and V are :func:`_tma_aligned`."""
    if not (_tma_aligned(k) and _tma_aligned(v)):
        return False
    if INTERPRETED:
        return True
    return q.element_size() == 2 and q.is_cuda and torch.cuda.get_device_capability(q.device) >= (9, 0)


def _visits(visits, placeholder):
    return (placeholder, False) if visits is None else (visits, True)


def flash_forward(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right,
    softcap, alibi_slopes, out, lse, launch=_identity, visits=None, tiles=None,
):  # fmt: skip
    """Fills ``out`` (Tq, Hq, Dv) and ``lse`` (Hq, Tq) float32. ``visits``: an int32 (B, Hq, cdiv(max_seqlen_q,
    BLOCK_M)) zero tensor that gets the key blocks each program visits (tests; needs ``tiles`` or the interpreter).

    ``launch`` wraps each kernel before its launch (``torch.library.wrap_triton`` inside a custom op)."""
    Tq, Hq, D = q.shape
    Hk, Dv = k.shape[1], v.shape[2]
    B = cu_seqlens_q.shape[0] - 1
    if Tq == 0 or B == 0 or max_seqlen_q == 0:
        return
    feats = features(max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap, alibi_slopes)
    alibi, stride_ab = _alibi(alibi_slopes, lse)
    counter, count = _visits(visits, lse)
    descriptors = kv_descriptors(q, k, v)
    if descriptors:
        ensure_allocator(q.device)
    kernel, meta = _kernel("fwd", tile_family(q.element_size(), D, Dv), launch, tiles)
    kernel[lambda META: (triton.cdiv(max_seqlen_q, META["BLOCK_M"]), Hq, B)](
        q, k, v, cu_seqlens_q, cu_seqlens_k, alibi, out, lse, counter,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        stride_ab, lse.stride(0),
        Hq, Hq // Hk, *feats["windows"], *length_buckets(max_seqlen_q, max_seqlen_k),
        *_scales(softmax_scale, softcap),
        HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=block_dim(D), BLOCK_DV=block_dim(Dv), **feats["flags"],
        FOLD_SCALE=feats["fold"], COUNT_VISITS=count, KV_DESCRIPTORS=descriptors, **meta,
    )  # fmt: skip


def flash_backward(
    grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
    window_left, window_right, softcap, alibi_slopes, dq, dk, dv, delta, launch=_identity, visits=None, tiles=None,
):  # fmt: skip
    """Fills ``dq`` (Tq, Hq, D), ``dk`` (Tk, Hk, D), ``dv`` (Tk, Hk, Dv); ``delta`` (Hq, Tq) float32 is scratch
    laid out like ``lse``. Each output element is written by exactly one program: no atomics, deterministic.
    ``visits``: ``(dkdv (B, Hk, cdiv(max_seqlen_k, BLOCK_N)), dq (B, Hq, cdiv(max_seqlen_q, BLOCK_M)))`` int32
    zero tensors (tests), ``tiles``: ``(dkdv (BLOCK_M, BLOCK_N), dq (BLOCK_M, BLOCK_N))``."""
    Tq, Hq, D = q.shape
    Tk, Hk, Dv = k.shape[0], k.shape[1], v.shape[2]
    B = cu_seqlens_q.shape[0] - 1
    if B == 0:
        return
    feats = features(max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap, alibi_slopes)
    alibi, stride_ab = _alibi(alibi_slopes, lse)
    family = tile_family(q.element_size(), D, Dv)
    visits_dkdv, visits_dq = visits if visits is not None else (None, None)
    tiles_dkdv, tiles_dq = tiles if tiles is not None else (None, None)
    flags = dict(HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=block_dim(D), BLOCK_DV=block_dim(Dv), **feats["flags"])
    scalars = (
        *feats["windows"], *length_buckets(max_seqlen_q, max_seqlen_k), softmax_scale,
        *_scales(softmax_scale, softcap),
    )  # fmt: skip
    if Tq > 0:
        launch(_flash_bwd_preprocess)[(triton.cdiv(Tq, PREPROCESS_BLOCK_M), Hq)](
            out, grad_out, delta, out.stride(0), out.stride(1), grad_out.stride(0), grad_out.stride(1),
            delta.stride(0), Tq, HEAD_DIM_V=Dv, BLOCK_DV=block_dim(Dv), BLOCK_M=PREPROCESS_BLOCK_M, num_warps=4,
        )  # fmt: skip
    strides = (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), grad_out.stride(0),
        grad_out.stride(1),
    )  # fmt: skip
    if Tk > 0 and max_seqlen_k > 0:
        counter, count = _visits(visits_dkdv, lse)
        kernel, meta = _kernel("dkdv", family, launch, tiles_dkdv)
        kernel[lambda META: (triton.cdiv(max_seqlen_k, META["BLOCK_N"]), Hk, B)](
            q, k, v, cu_seqlens_q, cu_seqlens_k, alibi, grad_out, lse, delta, dk, dv, counter,
            *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), stride_ab, lse.stride(0),
            Hk, Hq // Hk, *scalars, **flags, COUNT_VISITS=count, **meta,
        )  # fmt: skip
    if Tq > 0 and max_seqlen_q > 0:
        counter, count = _visits(visits_dq, lse)
        kernel, meta = _kernel("dq", family, launch, tiles_dq)
        kernel[lambda META: (triton.cdiv(max_seqlen_q, META["BLOCK_M"]), Hq, B)](
            q, k, v, cu_seqlens_q, cu_seqlens_k, alibi, grad_out, lse, delta, dq, counter,
            *strides, dq.stride(0), dq.stride(1), stride_ab, lse.stride(0),
            Hq, Hq // Hk, *scalars, **flags, COUNT_VISITS=count, **meta,
        )  # fmt: skip
