"""Flash-decoding (Dao et al. 2023, "Flash-Decoding for long-context inference"): attention of a few queries per
sequence against a contiguous or paged key/value cache, split along the cache and combined through the LSE.

Decode reads the whole cache for a handful of queries, so the work is memory-bound and the grid must cover the GPU
even at batch 1:

- one program per (sequence b, key head hk, split s): it packs the ``Hq / Hk`` query heads of the GQA group times the
  ``Nq`` queries into the rows of one tile (``BLOCK_M >= 16`` for ``tl.dot``), so each key and value is loaded once
  for the whole group, and walks keys ``[s * split_keys, (s + 1) * split_keys)`` of its sequence (cut to the
  sequence's length and the queries' window) in blocks of ``BLOCK_N``, with the online softmax;
- paged caches: each key's page comes from ``block_table[b, j // PAGE_SIZE]`` (one gathered load per block of keys,
  so any page size works); contiguous ones read row ``batch_idx[b]`` (or ``b``);
- with one split the program writes the output; with several, a normalised partial output and its log-sum-exp
  (float32), and ``_combine_kernel`` merges them: ``lse = log sum_s exp(lse_s)``, ``out = sum_s exp(lse_s - lse)
  out_s``.

Scores: ``s = scale q.k`` (``softcap > 0``: ``softcap * tanh(s / softcap)``) minus ``slope * |pos - j|`` (ALiBi);
keys outside ``[0, seqlen)`` and the window ``[pos - left, pos + right]`` of the query at ``pos = i + seqlen - Nq``
are -inf (a side of -1 unbounded). Empty rows give 0 and ``lse = -inf``. float32 products use
``input_precision="ieee"`` (no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metagpt_fast._spec import triton_interpreted

# Fewest keys per split when the launcher chooses: below this the partial writes and the combine cost more than
# the extra programs gain.
MIN_SPLIT_KEYS = 256
MAX_SPLITS = 128
# Programs per SM the split heuristic aims for (2 resident per SM hides the load latency of the key loop).
PROGRAMS_PER_SM = 2
# SM count assumed under the interpreter, so test shapes exercise the splits.
INTERPRETER_SMS = 8
NUM_WARPS = 4


@triton.jit
def _tanh(x):
    # tanh to a few float32 roundings (tl has no tanh on every version, and 2 * sigmoid(2x) - 1 loses the relative
    # precision of small results): an odd Taylor polynomial below 0.25 (next term < 1e-10 relative), else
    # (1 - e^(-2|x|)) / (1 + e^(-2|x|)), where e^(-2|x|) <= 0.61 leaves no cancellation.
    a = tl.abs(x)
    t = tl.exp(-2.0 * a)
    x2 = a * a
    poly = -1382.0 / 155925.0
    poly = poly * x2 + 62.0 / 2835.0
    poly = poly * x2 - 17.0 / 315.0
    poly = poly * x2 + 2.0 / 15.0
    poly = poly * x2 - 1.0 / 3.0
    y = tl.where(a < 0.25, a + a * x2 * poly, (1.0 - t) / (1.0 + t))
    return tl.where(x < 0, -y, y)


@triton.jit
def _split_kernel(
    q_ptr,  # (B, Nq, Hq, D)
    k_ptr,  # (rows, N_or_page, Hk, D)
    v_ptr,
    seqlens_ptr,  # (B,) int32
    batch_idx_ptr,  # (B,) int32, read iff HAS_BATCH_IDX
    table_ptr,  # (B, max_blocks) int32, read iff PAGED
    slopes_ptr,  # (B, Hq) float32, read iff HAS_ALIBI
    out_ptr,  # SPLIT: (splits, B, Nq, Hq, D) float32 partials; else (B, Nq, Hq, D) of q's dtype
    lse_ptr,  # SPLIT: (splits, B, Hq, Nq) float32; else (B, Hq, Nq)
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_k0, stride_k1, stride_kh, stride_kd,
    stride_v0, stride_v1, stride_vh, stride_vd,
    stride_tb,
    B, NQ, HQ, HK, D,
    split_keys,  # keys per split (a multiple of BLOCK_N)
    scale,
    softcap,
    window_left,  # -1: unbounded
    window_right,
    GROUP: tl.constexpr,  # Hq / Hk
    PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr,
    HAS_BATCH_IDX: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    SOFTCAP: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    tl.static_assert(BLOCK_M >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // HK
    hk = pid_bh % HK
    b64 = b.to(tl.int64)
    n = tl.load(seqlens_ptr + b)

    # Packed rows: m = i * GROUP + g for query i and head hk * GROUP + g.
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    qi = offs_m // GROUP
    head = hk * GROUP + offs_m % GROUP
    row_ok = qi < NQ
    d_ok = offs_d < D
    q_rows = q_ptr + b64 * stride_qb + qi.to(tl.int64) * stride_qn + head.to(tl.int64) * stride_qh
    q = tl.load(q_rows[:, None] + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    # Visible keys: [lo, hi) per row; the program's keys are their union cut to its split.
    pos = qi + n - NQ
    lo = tl.where(window_left >= 0, tl.maximum(pos - window_left, 0), 0)
    hi = tl.where(window_right >= 0, tl.minimum(pos + window_right + 1, n), n)
    start = split * split_keys
    end = tl.minimum(start + split_keys, n)
    if window_left >= 0:
        start = tl.maximum(start, n - NQ - window_left)
    if window_right >= 0:
        end = tl.minimum(end, n + window_right)
    start = tl.maximum(start, 0) // BLOCK_N * BLOCK_N
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + b64 * HQ + head, mask=row_ok, other=0.0)

    if PAGED:
        k_base = k_ptr + hk.to(tl.int64) * stride_kh
        v_base = v_ptr + hk.to(tl.int64) * stride_vh
    else:
        if HAS_BATCH_IDX:
            row = tl.load(batch_idx_ptr + b).to(tl.int64)
        else:
            row = b64
        k_base = k_ptr + row * stride_k0 + hk.to(tl.int64) * stride_kh
        v_base = v_ptr + row * stride_v0 + hk.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    for j0 in range(start, end, BLOCK_N):
        offs_n = j0 + offs_n0
        key_ok = offs_n < end
        if PAGED:
            page = tl.load(table_ptr + b64 * stride_tb + offs_n // PAGE_SIZE, mask=key_ok, other=0).to(tl.int64)
            k_rows = page * stride_k0 + (offs_n % PAGE_SIZE).to(tl.int64) * stride_k1
            v_rows = page * stride_v0 + (offs_n % PAGE_SIZE).to(tl.int64) * stride_v1
        else:
            k_rows = offs_n.to(tl.int64) * stride_k1
            v_rows = offs_n.to(tl.int64) * stride_v1
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + k_rows[:, None] + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + v_rows[:, None] + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BLOCK_M, BLOCK_N)
        s = s * scale
        if SOFTCAP:
            s = softcap * _tanh(s / softcap)
        if HAS_ALIBI:
            s = s - slope[:, None] * tl.abs(pos[:, None] - offs_n[None, :]).to(tl.float32)
        visible = (offs_n[None, :] >= lo[:, None]) & (offs_n[None, :] < hi[:, None]) & key_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        # Scores and their maximum stay in natural units (lse = m + log(l) rounds like the reference's); the
        # exponentials are exp2 of (s - m) * log2(e), one FMA per score.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet: weights 0, not NaN
        alpha = tl.exp2((tl.where(m_i == float("-inf"), 0.0, m_i) - shift) * 1.4426950408889634)
        p = tl.exp2(s * 1.4426950408889634 - (shift * 1.4426950408889634)[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    out_rows = (b64 * NQ + qi) * HQ + head  # row of (B, Nq, Hq)
    lse_rows = (b64 * HQ + head) * NQ + qi  # row of (B, Hq, Nq)
    if SPLIT:
        out_rows += split.to(tl.int64) * B * NQ * HQ
        lse_rows += split.to(tl.int64) * B * HQ * NQ
        tl.store(out_ptr + out_rows[:, None] * D + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
    else:
        tl.store(
            out_ptr + out_rows[:, None] * D + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )
    tl.store(lse_ptr + lse_rows, lse, mask=row_ok)


@triton.jit
def _combine_kernel(
    part_out_ptr,  # (splits, B, Nq, Hq, D) float32
    part_lse_ptr,  # (splits, B, Hq, Nq) float32
    out_ptr,  # (B, Nq, Hq, D)
    lse_ptr,  # (B, Hq, Nq) float32
    B, NQ, HQ, D, splits,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # (b, i, h) of the output
    h = row % HQ
    i = (row // HQ) % NQ
    b = row // (HQ * NQ)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < splits
    rows = B * NQ * HQ
    lse_s = tl.load(part_lse_ptr + offs_s * rows + (b * HQ + h) * NQ + i, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    shift = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - shift)  # 0 for empty splits
    total = tl.sum(w, 0)
    o = tl.load(part_out_ptr + (offs_s[:, None] * rows + row) * D + offs_d[None, :],
                mask=s_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # fmt: skip
    out = tl.sum(o * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + row * D + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < D)
    lse = tl.where(total > 0.0, shift + tl.log(tl.where(total > 0.0, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + (b * HQ + h) * NQ + i, lse)


# The kernels, for tooling that compiles them ahead of time (``metagpt_fast/devtools/aot.py``).
KERNELS = {"decode_split": _split_kernel, "decode_combine": _combine_kernel}


def _identity(kernel):
    return kernel


_SM_COUNTS: dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached); ``INTERPRETER_SMS`` under the interpreter."""
    if triton_interpreted() or device.type != "cuda":
        return INTERPRETER_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def config(
    nq: int, group: int, d: int, dtype: torch.dtype, capability: tuple[int, int] = (8, 0)
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps): the packed rows padded to a tile (16 at least, for ``tl.dot``), and
    the keys per block and warps of :func:`gpu_tile` on a GPU of compute ``capability``."""
    block_m = max(16, triton.next_power_of_2(nq * group))
    block_d = max(16, triton.next_power_of_2(d))
    if triton_interpreted():
        return block_m, 16, block_d, NUM_WARPS  # small key blocks: several blocks per split at test shapes
    block_n, num_warps = gpu_tile(block_m, block_d, torch.empty(0, dtype=dtype).element_size(), capability)
    return block_m, block_n, block_d, num_warps


def gpu_tile(block_m: int, block_d: int, itemsize: int, capability: tuple[int, int] = (8, 0)) -> tuple[int, int]:
    """(BLOCK_N, num_warps) on a GPU, from the AOT statistics (devtools/aot.py, sm_80 and sm_90, every score option
    on): at 16 packed rows, 64 keys of 16-bit data (64-125 registers at D <= 128) or 32 of float32 (70-125; 64 keys
    spilled 8 bytes at D = 64 on sm_80) on 4 warps; at up to 64 rows, 8 warps with 64 keys of 16-bit data (165
    registers at D = 128; 4 warps spilled 24 bytes), 32 float32 keys at D <= 64 and 16 at D = 128 (4 warps spilled
    5-7 KiB, 32 keys at D = 128 on 8 warps 64 bytes)."""
    if block_m <= 16:
        return (64 if itemsize <= 2 else 32), NUM_WARPS
    if itemsize <= 2:
        # sm_90: one warpgroup. A 64-row wgmma is one warpgroup's product, so 8 warps computed every product twice
        # (devtools' replication gate); on 4 warps 127-188 registers, no spills at D <= 128.
        return 64, (4 if capability >= (9, 0) else 8)
    return (32 if block_d <= 64 else 16), 8


# Packed rows (Nq x Hq / Hk) the tiles above are sized for.
MAX_PACKED_ROWS = 64


def choose_splits(num_splits: int, batch: int, heads_k: int, capacity: int, block_n: int, sms: int) -> int:
    """num_splits if given (> 0), else enough (b, hk, split) programs for ``PROGRAMS_PER_SM`` per SM, at least
    ``MIN_SPLIT_KEYS`` keys per split, at most ``MAX_SPLITS``. ``capacity``: the keys a sequence can hold (the
    lengths live on the device; reading them would synchronise)."""
    if num_splits > 0:
        return num_splits
    programs = batch * heads_k
    want = triton.cdiv(PROGRAMS_PER_SM * sms, max(programs, 1))
    by_length = max(1, capacity // max(MIN_SPLIT_KEYS, block_n))
    return max(1, min(want, by_length, MAX_SPLITS))


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    batch_idx: torch.Tensor | None,
    block_table: torch.Tensor | None,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    num_splits: int,
    *,
    launch=_identity,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Nq, Hq, D) of q's dtype, lse (B, Hq, Nq) float32)``; see the module docstring."""
    b, nq, hq, d = q.shape
    hk = k_cache.shape[2]
    group = hq // hk
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, nq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    capability = torch.cuda.get_device_capability(q.device) if q.device.type == "cuda" else (8, 0)
    block_m, block_n, block_d, num_warps = config(nq, group, d, q.dtype, capability)
    splits = choose_splits(num_splits, b, hk, capacity, block_n, sm_count(q.device))
    split_keys = triton.cdiv(triton.cdiv(max(capacity, 1), splits), block_n) * block_n
    if splits > 1:
        part_out = torch.empty((splits, b, nq, hq, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((splits, b, hq, nq), dtype=torch.float32, device=q.device)
    else:
        part_out, part_lse = out, lse
    table = block_table if paged else seqlens  # never read unless PAGED
    launch(_split_kernel)[(b * hk, splits)](
        q, k_cache, v_cache, seqlens,
        batch_idx if batch_idx is not None else seqlens,
        table,
        alibi_slopes if alibi_slopes is not None else q,
        part_out, part_lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        table.stride(0),
        b, nq, hq, hk, d,
        split_keys,
        scale,
        softcap,
        window_left,
        window_right,
        GROUP=group,
        PAGE_SIZE=k_cache.shape[1] if paged else 1,
        PAGED=paged,
        HAS_BATCH_IDX=batch_idx is not None,
        HAS_ALIBI=alibi_slopes is not None,
        SOFTCAP=softcap > 0,
        SPLIT=splits > 1,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )  # fmt: skip
    if splits > 1:
        launch(_combine_kernel)[(b * nq * hq,)](
            part_out, part_lse, out, lse, b, nq, hq, d, splits,
            BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return out, lse
