"""Fused token embedding + sinusoidal positional encoding + dropout, and the positional-encoding add, in Triton.

Forward, one pass over memory (each input byte read once, each output byte written once):

    out[b, t, j] = dropout(src[b, t, j] * scale + PE[offset + t, j])
    src          = W[tokens[b, t]]   (embed_positions)   or   x   (add_positional_encoding)
    PE[pos, 2i]  = sin(pos * base^(-2i/d)),   PE[pos, 2i+1] = cos(pos * base^(-2i/d))   (Vaswani et al. 2017, 3.5)

The sinusoid is computed in registers (no table in memory; ``sinusoid.py``: the angle reduced modulo 2*pi in float64,
sin/cos in float32 without stack memory, accuracy), once per (t, j) tile, and reused for every batch row a program
handles: each program loops over a slice of the batch, so the transcendental cost per element falls with the batch
size and the kernel stays memory-bound even for 2-byte dtypes. The encoding is within ~3e-7 of the exact (float64)
table at any position.

Backward:
    add_positional_encoding: dx = dropout replayed on dy (this same kernel with SINUSOIDAL=False).
    embed_positions:         dW[v] = scale / (1 - p) * sum over (b, t) with tokens[b, t] == v of keep * dy[b, t]
      - atomic: one float32 atomic add per element (fast; the summation order, hence the rounding, varies);
      - sorted (deterministic): token ids sorted (stable), the sorted rows cut into fixed chunks; each chunk sums its
        runs of equal ids in order; a run that crosses a chunk boundary is stored as a partial, and a second
        kernel finds the segment's first chunk (binary search) and adds its partials in chunk order. No float
        atomics, a fixed summation order: bitwise repeatable.

Dropout: element (b, t, j) is kept iff the shared Philox stream at linear index (b*T + t)*d + j says so
(``kernels/triton/dropout.py``); the backward regenerates the mask from the seed instead of storing it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from metagpt_fast._spec import DEFAULT_BASE, dropout_threshold, triton_interpreted
from metagpt_fast.kernels.triton.dropout import dropout_keep
from metagpt_fast.kernels.triton.sinusoid import inverse_frequency, reduced_angle, sincos, small_column_stride

# Tiles of 1024 elements, 8 per thread at 4 warps: the dropout variant (Philox state per element) takes 48-56
# registers as launched (AOT check), ~9 programs per SM; 2048-element tiles took 72-79, about the same bytes in
# flight per SM with fewer, longer programs.
TILE_ELEMENTS = 1024
NUM_WARPS = 4
# Programs to aim for when splitting the batch across programs: ~8 per SM on a 132-SM H200.
TARGET_PROGRAMS = 1024
# Sorted rows per chunk of the deterministic backward: short serial loops, many programs.
SORTED_CHUNK = 32
# Partials summed per step when the second kernel finishes a run that spans many chunks.
COMBINE_ROWS = 16


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _sinusoid(pos, j, base, D):
    """PE tile (len(pos), len(j)): sin for even features, cos for odd ones, of pos * base^(-2i/d), 2i = j - j % 2."""
    inv_freq = inverse_frequency(j - (j & 1), base, D)
    sin, cos = sincos(reduced_angle(pos, inv_freq))  # the angle reduced modulo 2*pi in float64
    return tl.where(((j & 1) != 0)[None, :], cos, sin)


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _positional_fwd_kernel(
    src_ptr,  # x (B, T, d), or the embedding weight (vocab, d) when GATHER
    tokens_ptr,  # (B, T) token ids when GATHER
    out_ptr,  # (B, T, d) contiguous
    seed_ptr,  # (1,) int64 when HAS_DROPOUT
    B,
    T,
    D,
    batches_per_program,
    stride_sb,
    stride_st,  # x: (b, t) strides; weight: stride_st is the vocab-row stride
    stride_sd,
    stride_kb,
    stride_kt,
    scale,
    offset,
    base,  # frequency base (10000)
    keep_scale,  # 1 / (1 - p)
    threshold,  # dropout threshold (24-bit integer)
    GATHER: tl.constexpr,
    SINUSOIDAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out = dropout(src * scale + PE) for a (BLOCK_T, BLOCK_D) tile of positions and features, over a batch slice."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    j = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    t_mask = t < T
    mask = t_mask[:, None] & (j < D)[None, :]
    t64 = t.to(tl.int64)
    # Addresses as per-row 64-bit pointers plus per-column 32-bit offsets (the launcher checks (d-1)*stride_sd fits):
    # per-element 64-bit offsets would be hoisted out of the batch loop and cost twice the registers.
    src_cols = j * stride_sd
    if SINUSOIDAL:
        pe = _sinusoid(offset + t, j, base, D)  # (BLOCK_T, BLOCK_D), reused for every batch row
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    b_start = pid_b * batches_per_program
    b_end = tl.minimum(b_start + batches_per_program, B)
    for b in range(b_start, b_end):
        b64 = tl.cast(b, tl.int64)
        if GATHER:
            token = tl.load(tokens_ptr + b64 * stride_kb + t64 * stride_kt, mask=t_mask, other=0).to(tl.int64)
            src_rows = src_ptr + token * stride_st
        else:
            src_rows = src_ptr + b64 * stride_sb + t64 * stride_st
        src = tl.load(src_rows[:, None] + src_cols[None, :], mask=mask, other=0.0)
        y = src.to(tl.float32) * scale
        if SINUSOIDAL:
            y += pe
        out_rows = (b64 * T + t64) * D  # row starts in the contiguous (B, T, d) output
        if HAS_DROPOUT:
            y = tl.where(dropout_keep(seed, out_rows[:, None] + j[None, :], threshold), y * keep_scale, 0.0)
        tl.store((out_ptr + out_rows)[:, None] + j[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _embed_grad_atomic_kernel(
    grad_ptr,  # (B, T, d) gradient of the output, any strides
    tokens_ptr,  # (B, T)
    acc_ptr,  # (vocab, d) float32, zeroed, contiguous
    seed_ptr,
    N,  # B * T
    T,
    D,
    stride_gb,
    stride_gt,
    stride_gd,
    stride_kb,
    stride_kt,
    grad_scale,  # scale / (1 - p)
    threshold,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """acc[tokens[row]] += grad_scale * keep * grad[row] for BLOCK_T flattened rows, with float32 atomics."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    j = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < N
    mask = row_mask[:, None] & (j < D)[None, :]
    rows64 = rows.to(tl.int64)
    b = rows64 // T
    t = rows64 - b * T
    token = tl.load(tokens_ptr + b * stride_kb + t * stride_kt, mask=row_mask, other=0).to(tl.int64)
    g = tl.load((grad_ptr + b * stride_gb + t * stride_gt)[:, None] + (j * stride_gd)[None, :], mask=mask, other=0.0)
    g = g.to(tl.float32) * grad_scale
    if HAS_DROPOUT:
        g = tl.where(dropout_keep(tl.load(seed_ptr), (rows64 * D)[:, None] + j[None, :], threshold), g, 0.0)
    tl.atomic_add((acc_ptr + token * D)[:, None] + j[None, :], g, mask=mask, sem="relaxed")


@triton.jit
def _embed_grad_sorted_kernel(
    grad_ptr,  # (B, T, d) gradient of the output, any strides
    sorted_ptr,  # (N,) token ids sorted ascending
    order_ptr,  # (N,) int64: flattened row (b*T + t) of each sorted id
    grad_weight_ptr,  # (vocab, d) contiguous, zeroed, weight's dtype
    partial_ptr,  # (2 * chunks, d) float32: slot 2c = chunk c's first run, 2c+1 = its last run
    seed_ptr,
    N,
    T,
    D,
    chunk,
    stride_gb,
    stride_gt,
    stride_gd,
    grad_scale,
    threshold,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """First pass of the deterministic backward: sums the runs of equal ids inside one chunk of sorted rows, in order.

    A run that is a whole segment (all rows of one id) is final and written to grad_weight; a run continued from the
    previous chunk goes to slot 2c, one continuing into the next chunk to slot 2c+1 (finished by the combine kernel).
    """
    c = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    j_mask = j < D
    j64 = j.to(tl.int64)
    start = c * chunk
    end = tl.minimum(start + chunk, N)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    # True when the chunk's first run begins a segment (no equal id just before the chunk).
    started_here = tl.load(sorted_ptr + tl.maximum(start - 1, 0)) != tl.load(sorted_ptr + start)
    started_here = started_here | (start == 0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r in range(start, end):
        token = tl.load(sorted_ptr + r)
        next_token = tl.load(sorted_ptr + tl.minimum(r + 1, N - 1))
        row = tl.load(order_ptr + r).to(tl.int64)
        b = row // T
        t = row - b * T
        g = tl.load(grad_ptr + b * stride_gb + t * stride_gt + j64 * stride_gd, mask=j_mask, other=0.0)
        g = g.to(tl.float32)
        if HAS_DROPOUT:
            g = tl.where(dropout_keep(seed, row * D + j64, threshold), g, 0.0)
        acc += g
        segment_end = (next_token != token) | (r == N - 1)
        run_end = segment_end | (r == end - 1)
        final = started_here & segment_end
        tl.store(
            grad_weight_ptr + token.to(tl.int64) * D + j64,
            (acc * grad_scale).to(grad_weight_ptr.dtype.element_ty),
            mask=j_mask & run_end & final,
        )
        slot = 2 * c + started_here.to(tl.int32)
        tl.store(partial_ptr + slot.to(tl.int64) * D + j64, acc, mask=j_mask & run_end & ~final)
        acc = tl.where(run_end, 0.0, acc)
        started_here = started_here | segment_end


@triton.jit
def _embed_grad_combine_kernel(
    sorted_ptr,
    grad_weight_ptr,
    partial_ptr,
    N,
    D,
    chunk,
    grad_scale,
    COMBINE_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Second pass: for each segment that ends in chunk c but began in an earlier chunk c0, grad_weight[id] =
    last-run partial of c0 + first-run partials of chunks c0+1 .. c, added in that fixed order."""
    c = tl.program_id(0) + 1  # chunk 0 never continues a segment
    j = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    j_mask = j < D
    j64 = j.to(tl.int64)
    start = c * chunk
    end = tl.minimum(start + chunk, N)
    token = tl.load(sorted_ptr + start)
    continues = tl.load(sorted_ptr + start - 1) == token
    ends_here = (tl.load(sorted_ptr + end - 1) != token) | (end == N)
    ends_here = ends_here | (tl.load(sorted_ptr + tl.minimum(end, N - 1)) != token)
    if continues & ends_here:
        # First row of the segment: binary search for the first position holding ``token`` in [0, start).
        lo = start * 0
        hi = start
        while lo < hi:
            mid = (lo + hi) // 2
            below = tl.load(sorted_ptr + mid) < token
            lo = tl.where(below, mid + 1, lo)
            hi = tl.where(below, hi, mid)
        first_chunk = lo // chunk
        acc = tl.load(partial_ptr + (2 * first_chunk + 1).to(tl.int64) * D + j64, mask=j_mask, other=0.0)
        rows = tl.arange(0, COMBINE_ROWS)
        for cc in range(first_chunk + 1, c + 1, COMBINE_ROWS):
            chunks = cc + rows
            tile = tl.load(
                partial_ptr + (2 * chunks.to(tl.int64))[:, None] * D + j64[None, :],
                mask=(chunks <= c)[:, None] & j_mask[None, :],
                other=0.0,
            )
            acc += tl.sum(tile, axis=0)
        tl.store(
            grad_weight_ptr + token.to(tl.int64) * D + j64,
            (acc * grad_scale).to(grad_weight_ptr.dtype.element_ty),
            mask=j_mask,
        )


# The kernels by role, for tooling that compiles them ahead of time (``metagpt_fast/devtools/aot.py``).
KERNELS = {
    "forward": _positional_fwd_kernel,
    "grad_atomic": _embed_grad_atomic_kernel,
    "grad_sorted": _embed_grad_sorted_kernel,
    "grad_combine": _embed_grad_combine_kernel,
}


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _identity(kernel):
    return kernel


def _tile(d: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_D): features per program capped at 128 (512-byte float32 rows), positions fill the tile."""
    if triton_interpreted():
        return 16, 32  # one small configuration: several tiles and masked edges at test shapes
    block_d = min(128, max(32, triton.next_power_of_2(d)))
    return TILE_ELEMENTS // block_d, block_d


# Every BLOCK_D that _tile (and embed_grad_sorted) picks on a GPU: the AOT check compiles each.
GPU_BLOCK_D = (32, 64, 128)


def sorted_warps(block_d: int) -> int:
    # The deterministic kernels work on one (BLOCK_D,) row at a time: one warp per 64 features keeps lanes busy.
    return max(1, block_d // 64)


def _dropout_args(dropout_p: float, seed: torch.Tensor | None, like: torch.Tensor):
    if dropout_p > 0.0:
        if seed is None:
            raise ValueError("dropout_p > 0 needs a seed tensor")
        return seed, 1.0 / (1.0 - dropout_p), dropout_threshold(dropout_p)
    return like, 1.0, 0  # the seed pointer is never read without dropout


def _launch_forward(
    src, tokens, gather, out, src_strides, token_strides, scale, offset, dropout_p, seed, sinusoidal, base, launch
):
    b, t, d = out.shape
    if out.numel() == 0:
        return out
    block_t, block_d = _tile(d)
    tiles = triton.cdiv(t, block_t) * triton.cdiv(d, block_d)
    # Split the batch so there are enough programs to fill the GPU; each program reuses its PE tile for its slice.
    batch_splits = 1 if triton_interpreted() else max(1, min(b, TARGET_PROGRAMS // tiles))
    batches_per_program = triton.cdiv(b, batch_splits)
    seed_arg, keep_scale, threshold = _dropout_args(dropout_p, seed, out)
    grid = (triton.cdiv(t, block_t), triton.cdiv(d, block_d), triton.cdiv(b, batches_per_program))
    launch(_positional_fwd_kernel)[grid](
        src,
        tokens,
        out,
        seed_arg,
        b,
        t,
        d,
        batches_per_program,
        *src_strides,
        *token_strides,
        scale,
        offset,
        base,
        keep_scale,
        threshold,
        GATHER=gather,
        SINUSOIDAL=sinusoidal,
        HAS_DROPOUT=dropout_p > 0.0,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
        num_warps=NUM_WARPS,
    )
    return out


def add_positional_encoding_forward(
    x: torch.Tensor,
    offset: int,
    dropout_p: float,
    seed: torch.Tensor | None,
    *,
    sinusoidal: bool = True,
    base: float = DEFAULT_BASE,
    launch=_identity,
) -> torch.Tensor:
    """``dropout(x + PE[offset:offset+T])`` for ``x`` (B, T, d) of any strides; contiguous output of x's dtype.

    With ``sinusoidal=False`` it is ``dropout(x)`` with the same mask: the backward of this op.
    """
    x = small_column_stride(x)
    b, t, d = x.shape
    out = torch.empty((b, t, d), dtype=x.dtype, device=x.device)
    # x stands in for the token pointer, which is never read without GATHER.
    return _launch_forward(x, x, False, out, x.stride(), (0, 0), 1.0, offset, dropout_p, seed, sinusoidal, base, launch)


def embed_positions_forward(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    scale: float,
    offset: int,
    dropout_p: float,
    sinusoidal: bool,
    seed: torch.Tensor | None,
    *,
    base: float = DEFAULT_BASE,
    launch=_identity,
) -> torch.Tensor:
    """``dropout(weight[tokens] * scale + PE)`` for ``tokens`` (B, T) and ``weight`` (vocab, d); (B, T, d) output."""
    weight = small_column_stride(weight)
    b, t = tokens.shape
    d = weight.shape[1]
    out = torch.empty((b, t, d), dtype=weight.dtype, device=weight.device)
    src_strides = (0, weight.stride(0), weight.stride(1))
    token_strides = tokens.stride()
    return _launch_forward(
        weight, tokens, True, out, src_strides, token_strides, scale, offset, dropout_p, seed, sinusoidal, base, launch
    )


def embed_positions_backward(
    grad: torch.Tensor,
    tokens: torch.Tensor,
    vocab_size: int,
    weight_dtype: torch.dtype,
    scale: float,
    dropout_p: float,
    seed: torch.Tensor | None,
    deterministic: bool,
    *,
    launch=_identity,
) -> torch.Tensor:
    """Gradient of the embedding weight (vocab, d) in ``weight_dtype`` from ``grad`` (B, T, d), any strides.

    ``deterministic=True`` sorts the token ids and reduces segments without float atomics (bitwise repeatable);
    otherwise float32 atomics scatter-add the rows.
    """
    grad = small_column_stride(grad)
    if deterministic:
        return embed_grad_sorted(grad, tokens, vocab_size, weight_dtype, scale, dropout_p, seed, launch=launch)
    return embed_grad_atomic(grad, tokens, vocab_size, weight_dtype, scale, dropout_p, seed, launch=launch)


def embed_grad_atomic(grad, tokens, vocab_size, weight_dtype, scale, dropout_p, seed, *, launch=_identity):
    """Embedding-weight gradient by float32 atomic scatter-add (summation order varies between runs)."""
    b, t, d = grad.shape
    acc_dtype = torch.float32
    acc = torch.zeros((vocab_size, d), dtype=acc_dtype, device=grad.device)
    n = b * t
    if n and d:
        block_t, block_d = _tile(d)
        seed_arg, keep_scale, threshold = _dropout_args(dropout_p, seed, acc)
        grid = (triton.cdiv(n, block_t), triton.cdiv(d, block_d))
        launch(_embed_grad_atomic_kernel)[grid](
            grad,
            tokens,
            acc,
            seed_arg,
            n,
            t,
            d,
            *grad.stride(),
            *tokens.stride(),
            scale * keep_scale,
            threshold,
            HAS_DROPOUT=dropout_p > 0.0,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
            num_warps=NUM_WARPS,
        )
    return acc if weight_dtype == acc_dtype else acc.to(weight_dtype)


def embed_grad_sorted(grad, tokens, vocab_size, weight_dtype, scale, dropout_p, seed, *, launch=_identity):
    """Embedding-weight gradient by sort and segment-reduce: no float atomics, bitwise repeatable."""
    b, t, d = grad.shape
    grad_weight = torch.zeros((vocab_size, d), dtype=weight_dtype, device=grad.device)
    n = b * t
    if n == 0 or d == 0:
        return grad_weight
    sorted_ids, order = torch.sort(tokens.reshape(-1), stable=True)
    chunk = 4 if triton_interpreted() else SORTED_CHUNK  # small under the interpreter: runs cross chunks at test sizes
    chunks = triton.cdiv(n, chunk)
    partial = torch.empty((2 * chunks, d), dtype=torch.float32, device=grad.device)
    block_d = 32 if triton_interpreted() else min(128, max(32, triton.next_power_of_2(d)))
    num_warps = sorted_warps(block_d)
    seed_arg, keep_scale, threshold = _dropout_args(dropout_p, seed, partial)
    launch(_embed_grad_sorted_kernel)[(chunks, triton.cdiv(d, block_d))](
        grad,
        sorted_ids,
        order,
        grad_weight,
        partial,
        seed_arg,
        n,
        t,
        d,
        chunk,
        *grad.stride(),
        scale * keep_scale,
        threshold,
        HAS_DROPOUT=dropout_p > 0.0,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    if chunks > 1:
        launch(_embed_grad_combine_kernel)[(chunks - 1, triton.cdiv(d, block_d))](
            sorted_ids,
            grad_weight,
            partial,
            n,
            d,
            chunk,
            scale * keep_scale,
            COMBINE_ROWS=COMBINE_ROWS,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
    return grad_weight
