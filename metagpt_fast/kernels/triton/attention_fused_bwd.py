"""Fused attention backward in Triton: dK, dV and dQ from one pass over the score tiles (5 GEMMs per tile).

The split backward of ``kernels/triton/attention.py`` computes S and dP twice, once in the dK/dV kernel and once in
the dQ kernel: 7 products per (query tile, key tile). Here one program per key block computes, for each query tile,

    S^T = K Q^T     dP^T = V dO^T     dV += P^T dO     dK += dS^T Q     dQ_j = dS K      (5 products)

and dQ, a sum over key blocks, is accumulated across programs in float32 in one of two ways:

- **Deterministic (the fused kernel's default).** The key blocks of a (batch, kv head) are dealt to ``n_splits``
  programs (program ``s`` takes blocks ``s, s + n_splits, ...`` in increasing order), each of which owns a float32
  slice ``DQAcc[s]`` (B, Hq, Nq, D) that only it reads and writes, in a fixed order. A second kernel
  (:func:`_attn_bwd_fused_dq_reduce`) sums the slices in order 0, 1, ..., scales and casts: every addition happens
  in the same order on every run, so dQ is bitwise repeatable. ``n_splits`` bounds the scratch (``n_splits`` x
  dQ in float32) while giving the GPU enough programs (:func:`plan`); with one key block per split the kernel is
  compiled without its loop over key blocks (``SINGLE_BLOCK``: fewer registers).
- **Atomic (opt-in, non-deterministic).** Every key block is its own program and adds its dS K into one float32
  accumulator with ``tl.atomic_add``; the order of the additions follows the hardware's scheduling, so dQ may differ
  in its last bits from run to run (dK and dV stay deterministic: each is written by one program). No scratch
  beyond one float32 dQ.

Conventions are those of the split kernels, whose helpers this module calls: base-2 scores (``log2(e)`` folded into
``qk_scale``), the forward's row statistics (``Lse``, split in max and log2 sum with an additive mask),
``Delta = rowsum(dO * O)`` from the split backward's preprocess kernel, the same masking (causal top-left, bool and
additive masks through broadcast strides) and the same Philox dropout offsets ``((b * Hq + h) * Nq + i) * Nk + j``.
Keys past ``Nk`` are masked (their scores ``-inf``) because here they would reach dQ.

Which backward runs is chosen by :func:`backward_mode` (``METAGPT_FAST_ATTENTION_BACKWARD``: the split kernels by
default, the fused one on request) and :func:`plan` (the fused one only where it has a spill-free tile); see
docs/triton-attention.md, "Fused backward".
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from metagpt_fast.kernels.triton import attention as split
from metagpt_fast.kernels.triton.attention import (
    _load_block,
    _load_lse,
    _mask_scores,
    _probabilities,
    _store_tile,
)
from metagpt_fast.kernels.triton.dropout import dropout_keep

INTERPRETED = split.INTERPRETED
MAX_HEAD_DIM = split.MAX_HEAD_DIM

# ----------------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _accumulate_dq(
    acc_base, part, start_m, Nq, stride_am, first,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ATOMIC: tl.constexpr,
):  # fmt: skip
    """Adds the (BLOCK_M, BLOCK_D) float32 tile ``part`` to rows ``[start_m, start_m + BLOCK_M)`` of an
    (Nq, HEAD_DIM) accumulator: with ``tl.atomic_add`` (ATOMIC), or by the slice's only program through a block
    pointer (a tile of 64-bit pointers held across the step made the kernel spill): stored as it is when ``first``
    (the slice's first key block: the scratch is not zeroed), else read, added and written back."""
    if ATOMIC:
        rows = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = acc_base + rows[:, None] * stride_am + offs_d[None, :]
        if BLOCK_D == HEAD_DIM:
            inside = rows[:, None] < Nq
        else:
            inside = (rows[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM)
        tl.atomic_add(ptrs, part, mask=inside, sem="relaxed")
    else:
        ptr = tl.make_block_ptr(acc_base, (Nq, HEAD_DIM), (stride_am, 1), (start_m, 0), (BLOCK_M, BLOCK_D), (1, 0))
        if not first:
            if BLOCK_D == HEAD_DIM:
                part += tl.load(ptr, boundary_check=(0,), padding_option="zero")
            else:
                part += tl.load(ptr, boundary_check=(0, 1), padding_option="zero")
        if BLOCK_D == HEAD_DIM:
            tl.store(ptr, part, boundary_check=(0,))
        else:
            tl.store(ptr, part, boundary_check=(0, 1))


@triton.jit
def _attn_bwd_fused_inner(
    dk, dv, k, v, q_base, do_base, lse_ptr, lse_split, delta_ptr, mask_base, acc_base, first, seed, drop_base, cols,
    col_start, lo, hi,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, stride_am, Nq, Nk,
    qk_scale, dropout_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr, ATOMIC: tl.constexpr,
):  # fmt: skip
    """One key block against the query blocks ``[lo, hi)`` of one query head: accumulates dK, dV (keys by head dim,
    in registers) and adds each query block's dS K to the dQ accumulator. Products in the transposed (keys by
    queries) layout as in the split dK/dV kernel."""
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        q = _load_block(q_base, start_m, Nq, stride_qm, stride_qd, HEAD_DIM, BLOCK_M, BLOCK_D, True)
        # Rows past Nq read LSE = +inf: their P, hence dS, is 0.
        m, log_l = _load_lse(lse_ptr, rows, Nq, lse_split, MASK_KIND == 2)
        s_t = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale  # (BLOCK_N, BLOCK_M)
        # Keys past Nk are masked: their K rows read 0, but exp2(0 - m) can overflow for a row of very negative
        # scores, and dS K would then be inf * 0 in dQ.
        s_t = _mask_scores(
            s_t, rows, cols, start_m, col_start, mask_base, stride_mm, stride_mn, Nq, Nk, BLOCK_M, BLOCK_N,
            CAUSAL, True, MASK_KIND, MASK_ROW_BCAST, True,
        )  # fmt: skip
        p_t = _probabilities(s_t, m, log_l, MASK_KIND == 2, True)
        do = _load_block(do_base, start_m, Nq, stride_dom, stride_dod, HEAD_DIM_V, BLOCK_M, BLOCK_DV, True)
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")  # (BLOCK_N, BLOCK_M)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, drop_base + rows.to(tl.int64)[None, :] * Nk + cols[:, None], dropout_threshold)
            dv = tl.dot(tl.where(keep, p_t * dropout_scale, 0.0).to(do.dtype), do, dv, input_precision="ieee")
            dp_t = tl.where(keep, dp_t * dropout_scale, 0.0)
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision="ieee")
        delta = tl.load(delta_ptr + rows, mask=rows < Nq, other=0.0)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision="ieee")
        dq = tl.dot(tl.trans(ds_t), k, input_precision="ieee")  # (BLOCK_M, BLOCK_D), unscaled
        _accumulate_dq(acc_base, dq, start_m, Nq, stride_am, first, HEAD_DIM, BLOCK_M, BLOCK_D, ATOMIC)
    return dk, dv


@triton.jit
def _attn_bwd_fused_key_block(
    Q, DOut, Lse, Delta, Mask, DK, DV, k_head, v_head, acc_split, seed, b, hk, start_n, first,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_ah, stride_am, Hq, Nq, Nk, GROUP, lse_split, sm_scale, qk_scale, dropout_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_ROW_BCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dK and dV of the key block at ``start_n`` (written) and its dQ contributions (added to ``acc_split``; ``first``:
    the split's first key block, which stores its rows instead)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = start_n + tl.arange(0, BLOCK_N)
    k = _load_block(k_head, start_n, Nk, stride_kn, stride_kd, HEAD_DIM, BLOCK_N, BLOCK_D, True)
    v = _load_block(v_head, start_n, Nk, stride_vn, stride_vd, HEAD_DIM_V, BLOCK_N, BLOCK_DV, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
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
        row_base = (b * Hq + h) * Nq
        mask_base = Mask + b * stride_mb + h * stride_mh
        acc_base = acc_split + h * stride_ah
        if IS_CAUSAL:
            dk, dv = _attn_bwd_fused_inner(
                dk, dv, k, v, q_base, do_base, Lse + row_base, lse_split, Delta + row_base, mask_base, acc_base,
                first, seed, row_base * Nk, cols, start_n, lo, tl.minimum(full_start, Nq),
                stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, stride_am, Nq, Nk,
                qk_scale, dropout_threshold, dropout_scale,
                HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N,
                True, MASK_KIND, MASK_ROW_BCAST, HAS_DROPOUT, ATOMIC,
            )  # fmt: skip
        dk, dv = _attn_bwd_fused_inner(
            dk, dv, k, v, q_base, do_base, Lse + row_base, lse_split, Delta + row_base, mask_base, acc_base,
            first, seed, row_base * Nk, cols, start_n, full_start, Nq,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_mm, stride_mn, stride_am, Nq, Nk,
            qk_scale, dropout_threshold, dropout_scale,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_M, BLOCK_N,
            False, MASK_KIND, MASK_ROW_BCAST, HAS_DROPOUT, ATOMIC,
        )  # fmt: skip
    dk_ptrs = DK + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd
    _store_tile(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), cols, Nk, offs_d, HEAD_DIM, BLOCK_D)
    _store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), cols, Nk, offs_dv, HEAD_DIM_V, BLOCK_DV)


@triton.jit
def _attn_bwd_fused(
    Q, K, V, Mask, DOut, Lse, Delta, DK, DV, DQAcc, Seed,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_as, stride_ab, stride_ah, stride_am,
    Hq, Nq, Nk, GROUP, lse_split, n_splits,
    sm_scale, qk_scale, dropout_threshold, dropout_scale,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_ROW_BCAST: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    ATOMIC: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (n_splits, Hk, B). Program ``s`` takes key blocks ``s, s + n_splits, ...`` of its (batch, kv head), in
    increasing order, and for each writes dK (B, Hk, Nk, D) and dV (B, Hk, Nk, Dv) of the block (summed over the
    GROUP query heads of the kv head) and adds dS K (unscaled, float32) into ``DQAcc[s]`` (ATOMIC: ``DQAcc[0]``
    with atomics; then ``n_splits`` is the number of key blocks). DQAcc is (S, B, Hq, Nq, D) float32 with a last
    stride of 1, zeroed for ATOMIC; else not: a split's first key block writes the rows it reaches (all rows, or
    with IS_CAUSAL those from its first query block on, which hold every row its later blocks reach), and the
    reduction reads only rows a split has written."""
    split_id = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    if HAS_DROPOUT:
        seed = tl.load(Seed)
    else:
        seed = 0
    k_head = K + b * stride_kb + hk * stride_kh
    v_head = V + b * stride_vb + hk * stride_vh
    if ATOMIC:
        acc_split = DQAcc + b * stride_ab
    else:
        acc_split = DQAcc + split_id.to(tl.int64) * stride_as + b * stride_ab

    if SINGLE_BLOCK:  # one key block per program (n_splits is the number of key blocks): no loop to carry state
        start_n = tl.multiple_of(split_id * BLOCK_N, BLOCK_N)
        _attn_bwd_fused_key_block(
            Q, DOut, Lse, Delta, Mask, DK, DV, k_head, v_head, acc_split, seed, b, hk, start_n, True,
            stride_qb, stride_qh, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
            stride_mb, stride_mh, stride_mm, stride_mn, stride_dob, stride_doh, stride_dom, stride_dod,
            stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
            stride_ah, stride_am, Hq, Nq, Nk, GROUP, lse_split, sm_scale, qk_scale, dropout_threshold, dropout_scale,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, IS_CAUSAL, MASK_KIND, MASK_ROW_BCAST, HAS_DROPOUT, ATOMIC,
            BLOCK_M, BLOCK_N,
        )  # fmt: skip
    else:
        for start_n in range(split_id * BLOCK_N, Nk, n_splits * BLOCK_N):
            start_n = tl.multiple_of(start_n, BLOCK_N)
            first = start_n < n_splits * BLOCK_N  # the split's first key block: it writes its rows of DQAcc[s] first
            _attn_bwd_fused_key_block(
                Q, DOut, Lse, Delta, Mask, DK, DV, k_head, v_head, acc_split, seed, b, hk, start_n, first,
                stride_qb, stride_qh, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                stride_mb, stride_mh, stride_mm, stride_mn, stride_dob, stride_doh, stride_dom, stride_dod,
                stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                stride_ah, stride_am, Hq, Nq, Nk, GROUP, lse_split, sm_scale, qk_scale, dropout_threshold,
                dropout_scale, HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, IS_CAUSAL, MASK_KIND, MASK_ROW_BCAST,
                HAS_DROPOUT, ATOMIC, BLOCK_M, BLOCK_N,
            )  # fmt: skip


@triton.jit
def _attn_bwd_fused_dq_reduce(
    DQAcc, DQ,
    stride_as, stride_ab, stride_ah, stride_am,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    Nq, n_splits, sm_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    KEY_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(Nq, BLOCK_M), Hq, B): dQ = sm_scale * (DQAcc[0] + DQAcc[1] + ... + DQAcc[n_splits - 1]), summed
    in that order (the deterministic mode's fixed reduction; one slice in the atomic mode), cast to dQ's dtype.

    With IS_CAUSAL, row ``i`` reads slice ``s`` only where ``s * KEY_BLOCK <= i`` (KEY_BLOCK: the fused kernel's key
    tile): split ``s`` holds key blocks ``s, s + n_splits, ...``, none of which row ``i`` sees otherwise, and the
    rows it has not written hold no data."""
    start_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if BLOCK_D == HEAD_DIM:
        inside = rows[:, None] < Nq
    else:
        inside = (rows[:, None] < Nq) & (offs_d[None, :] < HEAD_DIM)
    ptrs = DQAcc + b * stride_ab + h * stride_ah + rows[:, None] * stride_am + offs_d[None, :]
    total = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if IS_CAUSAL:
        hi = tl.minimum(n_splits, tl.cdiv(start_m * BLOCK_M + BLOCK_M, KEY_BLOCK))
        for s in range(0, hi):
            total += tl.load(ptrs, mask=inside & (s * KEY_BLOCK <= rows[:, None]), other=0.0)
            ptrs += stride_as
    else:
        for _ in range(0, n_splits):
            total += tl.load(ptrs, mask=inside, other=0.0)
            ptrs += stride_as
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    _store_tile(dq_ptrs, (total * sm_scale).to(DQ.dtype.element_ty), rows, Nq, offs_d, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------------------------------------------
# configurations
#
# One tile (BLOCK_M queries, BLOCK_N keys, num_warps, num_stages) per (operand bits, head-dim bucket, heavy) and
# architecture, no autotuning: the deterministic mode's scratch has one slice per split, and the number of splits
# follows from BLOCK_N, so the tile must be known before the launch; and an autotuner's trial runs would add into
# the atomic accumulator. Only families whose tile compiles without spills on the architecture are listed (figures
# from the AOT compile, docs/triton-attention.md); the others run the split kernels (:func:`plan`).

FUSED_TILES: dict[int, dict[tuple[int, int, bool], tuple[int, int, int, int]]] = {
    80: {},
    90: {
        # 212 registers, 0 B (causal, one key block per program; 234 with the loop over several; 64x128 on 8 warps
        # spilled 192 B, 4-warp tiles 192-360 B)
        (16, 64, False): (32, 128, 8, 1),
        (16, 64, True): (16, 128, 8, 1),  # mask + dropout: 236 / 248 registers (one key block / loop), 0 B
        # One key block per program only (SINGLE_BLOCK_ONLY): 247 registers, 0 B (the loop over key blocks: 24 B)
        (16, 128, False): (16, 128, 8, 1),
        (16, 128, True): (16, 128, 8, 2),  # 255 registers, 0 B (1 stage: 72 B)
    },
}
# Families whose tile spills with the loop over several key blocks per program but not with one key block per
# program: there the deterministic form runs only when the scratch budget allows a slice per key block, and the
# atomic form always (one key block per program).
SINGLE_BLOCK_ONLY = frozenset({(16, 128, False), (16, 128, True)})
# Under TRITON_INTERPRET=1 (CPU tests): BLOCK_M != BLOCK_N so both orders of the causal bookkeeping run, and at most
# INTERPRETER_SPLITS splits so a program takes several key blocks in turn.
INTERPRETER_TILE = (16, 32, 4, 1)
INTERPRETER_SPLITS = 2
REDUCE_BLOCK_M = 32  # rows of the reduction kernel: 32 x 256 float32 over 128 threads is 64 registers a thread
# The deterministic scratch holds n_splits float32 copies of dQ; past this many bytes the splits shrink, and when
# they would leave over half the streaming multiprocessors without a program the split kernels run instead. (B=1,
# Hq=32, Hk=8, Nq=Nk=8192, D=64: dQ in float32 is 64 MiB, 16 splits of 4 key blocks, 128 programs.)
SCRATCH_BUDGET_BYTES = 1 << 30

KERNELS = {"fused": _attn_bwd_fused, "dq_reduce": _attn_bwd_fused_dq_reduce}

MODES = ("split", "fused", "fused_atomic")
ENV_VAR = "METAGPT_FAST_ATTENTION_BACKWARD"


def backward_mode() -> str:
    """The Triton attention backward asked for by ``METAGPT_FAST_ATTENTION_BACKWARD``:

    - unset or ``split`` (the default): the split kernels (dK/dV and dQ apart, 7 products per tile, deterministic).
      The fused kernel is not the default until a GPU measurement shows it faster: its static figures do not settle
      it (docs/triton-attention.md, "Fused backward"), and its deterministic scratch takes up to
      ``SCRATCH_BUDGET_BYTES`` more memory;
    - ``fused``: the fused kernel with the deterministic dQ reduction where :func:`plan` has a tile for the inputs,
      else the split kernels (deterministic either way);
    - ``fused_atomic``: the fused kernel with dQ added by atomics (non-deterministic in dQ's last bits) where
      :func:`plan` has a tile, else split; under ``torch.use_deterministic_algorithms(True)`` the deterministic
      reduction instead.
    """
    value = os.environ.get(ENV_VAR, "").strip().lower() or "split"
    if value not in MODES:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(MODES)}, got {value!r}")
    return value


def select(q, k, v, attn_mask, dropout_p, mode: str | None = None):
    """``(tile, n_splits, atomic)`` for the fused backward under ``mode`` (default :func:`backward_mode`), or None
    for the split kernels."""
    mode = backward_mode() if mode is None else mode
    if mode == "split":
        return None
    atomic = mode == "fused_atomic" and not torch.are_deterministic_algorithms_enabled()
    planned = plan(q, k, v, attn_mask, dropout_p, atomic)
    return None if planned is None else (*planned, atomic)


def _capability(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def tile_for(itemsize: int, head_dim: int, head_dim_v: int, heavy: bool, device: torch.device):
    """The fused tile for these inputs, or None where the fused kernel has none (it would spill: the split kernels
    run). Architectures newer than sm_90 take sm_90's table (unchecked there), sm_8x sm_80's."""
    if INTERPRETED:
        return INTERPRETER_TILE
    if max(head_dim, head_dim_v) > MAX_HEAD_DIM:
        return None
    capability = _capability(device)
    if capability < 80:
        return None
    table = FUSED_TILES[90 if capability >= 90 else 80]
    return table.get(split.tile_family(itemsize, head_dim, head_dim_v, heavy))


def plan(q, k, v, attn_mask, dropout_p, atomic: bool):
    """``(tile, n_splits)`` of the fused backward for these inputs, or None for the split kernels: no tile for the
    family (:func:`tile_for`), or a deterministic reduction whose scratch budget would leave over half the GPU's
    multiprocessors idle, or would need several key blocks per program where the tile only fits one
    (:data:`SINGLE_BLOCK_ONLY`). ``n_splits`` is the number of key blocks in the atomic mode."""
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    _, _, mask_kind, row_bcast = split._mask_arguments(attn_mask, (B, Hq, Nq, Nk), None)
    heavy = dropout_p > 0 or (mask_kind != split.MASK_NONE and not row_bcast)
    family = split.tile_family(q.element_size(), D, Dv, heavy)
    tile = tile_for(q.element_size(), D, Dv, heavy, q.device)
    if tile is None:
        return None
    n_blocks = max(1, triton.cdiv(Nk, tile[1]))
    if atomic:
        return tile, n_blocks
    if INTERPRETED:
        return tile, min(n_blocks, INTERPRETER_SPLITS)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    slice_bytes = B * Hq * Nq * D * 4
    budget = max(1, SCRATCH_BUDGET_BYTES // max(1, slice_bytes))
    n_splits = min(n_blocks, triton.cdiv(2 * sms, max(1, B * Hk)), budget)
    if n_splits < n_blocks and (family in SINGLE_BLOCK_ONLY or 2 * n_splits * B * Hk < sms):
        return None
    return tile, n_splits


def _scratch(shape, device):
    """The deterministic mode's dQ slices, uninitialised (the tests fill them with NaN to show no unwritten row is
    read)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def _identity(kernel):
    return kernel


def attention_backward(
    grad_out, q, k, v, out, lse, attn_mask, seed, dropout_p, is_causal, scale, dq, dk, dv, delta, tile, n_splits,
    atomic=False, launch=_identity,
):  # fmt: skip
    """Fills ``dq``, ``dk``, ``dv`` as ``attention.attention_backward`` does, with the fused kernel (``tile``,
    ``n_splits`` from :func:`plan`); ``atomic``: dQ added with atomics (non-deterministic). ``delta`` (B, Hq, Nq)
    float32 is scratch."""
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    if B * Hq == 0:
        return
    if Nk == 0 or Nq == 0:  # no key or no query: every gradient is 0 (or has no rows)
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return
    mask, mask_strides, mask_kind, row_bcast = split._mask_arguments(attn_mask, (B, Hq, Nq, Nk), lse)
    seed, threshold, dropout_scale, has_dropout = split._dropout_arguments(dropout_p, seed, lse)
    block_m, block_n, num_warps, num_stages = tile
    slices = 1 if atomic else n_splits
    # Only the atomic accumulator is zeroed (see _attn_bwd_fused: every slice row read has been written).
    shape = (slices, B, Hq, Nq, D)
    acc = torch.zeros(shape, dtype=torch.float32, device=q.device) if atomic else _scratch(shape, q.device)

    block_pre = split.preprocess_block_m(Dv)
    launch(split._attn_bwd_preprocess)[(triton.cdiv(Nq, block_pre), Hq, B)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), Hq, Nq,
        HEAD_DIM_V=Dv, BLOCK_DV=split.block_dim(Dv), BLOCK_M=block_pre, num_warps=4,
    )  # fmt: skip
    launch(_attn_bwd_fused)[(n_splits, Hk, B)](
        q, k, v, mask, grad_out, lse, delta, dk, dv, acc, seed,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, *grad_out.stride(), *dk.stride(), *dv.stride(),
        *acc.stride()[:4],
        Hq, Nq, Nk, Hq // Hk, B * Hq * Nq, n_splits, scale, scale * math.log2(math.e), threshold, dropout_scale,
        HEAD_DIM=D, HEAD_DIM_V=Dv, BLOCK_D=split.block_dim(D), BLOCK_DV=split.block_dim(Dv), IS_CAUSAL=is_causal,
        MASK_KIND=mask_kind, MASK_ROW_BCAST=row_bcast, HAS_DROPOUT=has_dropout, ATOMIC=atomic,
        SINGLE_BLOCK=n_splits == triton.cdiv(Nk, block_n), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    launch(_attn_bwd_fused_dq_reduce)[(triton.cdiv(Nq, REDUCE_BLOCK_M), Hq, B)](
        acc, dq, *acc.stride()[:4], *dq.stride(), Nq, slices, scale,
        HEAD_DIM=D, BLOCK_D=split.block_dim(D), IS_CAUSAL=is_causal and not atomic, KEY_BLOCK=block_n,
        BLOCK_M=REDUCE_BLOCK_M, num_warps=4,
    )  # fmt: skip
