"""Public decode op: ``flash_attn_with_kvcache``, attention of a few new queries against a key/value cache.

The public function validates everything first, then does the in-place part once for every backend (rotary of the
new keys, their write into the cache at ``cache_seqlens``; rotary of the queries out of place), and asks the
registry for ``decode_attention``: pure attention of the queries against the (possibly paged) cache with
per-sequence lengths. So a bad argument never leaves a half-written cache, and a backend only reads the cache.

Inference only: there is no backward pass (flash-attn has none either). Inputs that require grad while grad mode is
on are refused rather than silently cut from the graph.

The value checks (lengths against the capacity, block table entries, batch indices, rotary positions) read the index
tensors once per call: a synchronisation on a GPU. Under ``torch.compile`` (and CUDA graphs) they are skipped, as
every value check of the package is while tracing.
"""

from __future__ import annotations

import math

import torch

from metagpt_fast import backends
from metagpt_fast.backends.registry import select_signed
from metagpt_fast.backends.signature import Memo, signature
from metagpt_fast.ops import validation as check
from metagpt_fast.ops.ranges import op_range
from metagpt_fast.ops.reference import kvcache as reference


def _reference(q, k_cache, v_cache, seqlens, batch_idx, block_table, scale, window_left, window_right, softcap,
               alibi_slopes, num_splits):  # fmt: skip
    # num_splits only schedules a kernel's work: the reference computes each row in one piece.
    return reference.decode_attention(
        q, k_cache, v_cache, seqlens, batch_idx, block_table, scale, False, window_left, window_right, softcap,
        alibi_slopes,
    )  # fmt: skip


OP = backends.declare_op(
    backends.OpSpec(
        "decode_attention",
        primary="q",
        head_dims=lambda inputs: (inputs["q"].shape[-1], inputs["v_cache"].shape[-1]),
    ),
    _reference,
)
# signature of a call -> what _check_signature returned for it (its checks read no tensor values).
_CHECKED = Memo()


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` against a key/value cache, after appending the new ``k`` / ``v`` to it in place
    (flash-attn's ``flash_attn_with_kvcache``: same arguments, layouts and semantics).

    If ``k`` and ``v`` are given, they are written into ``k_cache`` / ``v_cache`` in place, token ``i`` of sequence
    ``b`` at position ``cache_seqlens[b] + i``, and attention then runs over ``cache_seqlens[b] + seqlen_new`` keys
    (without them, over ``cache_seqlens[b]``). The cache must have room: nothing is written unless every argument
    is valid. With ``rotary_cos`` / ``rotary_sin``, the new keys are rotated at positions ``cache_seqlens + i``
    before they are stored, and the queries at ``cache_seqlens + i`` if ``causal`` or a window is set, else all at
    ``cache_seqlens``. Causal and window masks are aligned to the bottom right: query ``i`` of ``Nq`` sits at
    position ``i + seqlen_k - Nq`` and sees keys ``j`` in ``[pos - window_size[0], pos + window_size[1]]`` (a side
    of -1 is unbounded; ``causal`` caps the right side at 0). A query row with no visible key gives 0.

    Arguments:
        q: ``(B, Nq, Hq, D)`` float16 / bfloat16 / float32 / float64.
        k_cache: ``(B_c, N_max, Hk, D)`` without ``block_table`` (``B_c >= B``, or any with ``cache_batch_idx``),
            or ``(num_blocks, page_size, Hk, D)`` with it (a paged cache); ``q``'s dtype and device. ``Hk`` divides
            ``Hq`` (grouped-query attention: query head ``h`` reads key head ``h // (Hq / Hk)``).
        v_cache: same shape as ``k_cache``.
        k, v: optional ``(B, seqlen_new, Hk, D)`` new keys and values, appended in place (both or neither).
        rotary_cos, rotary_sin: optional ``(seqlen_ro, rotary_dim / 2)`` tables of ``q``'s dtype (only with ``k``):
            rotary embedding of ``q`` and the new ``k`` on their first ``rotary_dim`` features.
        cache_seqlens: int, or ``(B,)`` int32: tokens already in the cache per sequence. Required with ``k``;
            default: the whole cache (``N_max``, or ``max_blocks * page_size``).
        cache_batch_idx: optional ``(B,)`` int32: the cache row of each sequence (contiguous cache only). With
            repeated rows, which sequence's new tokens end up in the cache is unspecified (as in flash-attn).
        block_table: optional ``(B, max_blocks)`` int32: the pages of each sequence, in order. Only the entries of
            pages that hold tokens (``< seqlen_k``) are read, and must lie in ``[0, num_blocks)``.
        softmax_scale: factor on ``q @ k^T``; default ``1 / sqrt(D)``.
        causal: mask keys after each query's position.
        window_size: ``(left, right)`` sliding window, each ``>= -1``; ``(-1, -1)``: none.
        softcap: ``> 0`` caps the scaled scores: ``softcap * tanh(score / softcap)``.
        rotary_interleaved: GPT-J pairs ``(2i, 2i+1)`` if True (flash-attn's default), else GPT-NeoX halves.
        alibi_slopes: optional ``(Hq,)`` or ``(B, Hq)`` float32: adds ``-slope * |pos_i - j|`` to the scores.
        num_splits: how many pieces a kernel splits each sequence's keys into (flash-decoding); 0 picks from the
            batch, heads, cache length and the GPU's SM count. Scheduling only: the result does not depend on it.
        return_softmax_lse: also return the log-sum-exp of each row's scores.
        backend: see :func:`metagpt_fast.scaled_dot_product_attention`.

    Returns:
        ``out`` ``(B, Nq, Hq, D)`` of ``q``'s dtype; with ``return_softmax_lse``, also ``lse`` ``(B, Hq, Nq)``
        float32 (float64 for float64 inputs), ``-inf`` on rows with no visible key (flash-attn gives ``+inf``).
    """
    args = (
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, block_table,
        softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes, num_splits, return_softmax_lse,
    )  # fmt: skip
    key = signature(*args)
    checked = _CHECKED.get(key) if key is not None else None
    if checked is None:
        checked = _check_signature(*args)
        if key is not None:
            _CHECKED.put(key, checked)
    capacity, rows, per_row, new, window_left, window_right, rotary_local = checked
    b, nq, hq, d = q.shape
    if cache_seqlens is None:
        seqlens = torch.full((b,), capacity, dtype=torch.int32, device=q.device)
    elif isinstance(cache_seqlens, torch.Tensor):
        seqlens = cache_seqlens
    else:
        seqlens = torch.full((b,), cache_seqlens, dtype=torch.int32, device=q.device)
    # Value checks (one read of each index tensor; skipped while tracing for torch.compile, where they cannot run).
    bounds = None
    real = type(q) is torch.Tensor and q.device.type != "meta" and not torch.compiler.is_compiling()
    if real or not check._is_fake(q):  # a plain tensor skips is_fake's walk of tensor subclasses
        bounds = _check_values(seqlens, new, nq, capacity, rows, per_row, cache_batch_idx, block_table, rotary_cos,
                               rotary_local)  # fmt: skip

    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.expand(b, hq).contiguous()
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    # The implementation is chosen before anything is written: a backend request that cannot be served raises with the
    # caches untouched. Its reasons read only what the signature holds, which the rotation and the append keep.
    impl = select_signed("decode_attention", backend, key, _inputs(q, k_cache, v_cache, seqlens, cache_batch_idx,
                         block_table, scale, window_left, window_right, softcap, alibi_slopes, num_splits))  # fmt: skip
    if q.numel() == 0:  # nothing to compute: no kernel launch
        impl = backends.lookup("decode_attention", "reference")

    if rotary_cos is not None:
        offsets = seqlens[:, None].long()
        local = causal or window_size[0] >= 0 or window_size[1] >= 0
        k_pos = offsets + torch.arange(new, device=q.device)
        if nq == new and (local or nq == 1):  # q and k at the same positions (decode): one rotation of both
            qk = reference.rotate_at(torch.cat((q, k), dim=2), rotary_cos, rotary_sin, k_pos, rotary_interleaved)
            q, k = qk[:, :, :hq], qk[:, :, hq:]
        else:
            q_pos = offsets + (torch.arange(nq, device=q.device) if local else 0)
            q = reference.rotate_at(q, rotary_cos, rotary_sin, q_pos.expand(b, nq), rotary_interleaved)
            k = reference.rotate_at(k, rotary_cos, rotary_sin, k_pos, rotary_interleaved)
    if k is not None:
        if bounds is not None and bounds[0] == bounds[1] and cache_batch_idx is None and block_table is None:
            # Every row appends at the same position (decode of equal-length rows): one strided copy per cache,
            # the index arithmetic of the general write skipped.
            k_cache[:b, bounds[0] : bounds[0] + new].copy_(k)
            v_cache[:b, bounds[0] : bounds[0] + new].copy_(v)
        else:
            reference.write_cache(k_cache, v_cache, k, v, seqlens, cache_batch_idx, block_table)
        seqlens = seqlens + new
    inputs = _inputs(q, k_cache, v_cache, seqlens, cache_batch_idx, block_table, scale, window_left, window_right,
                     softcap, alibi_slopes, num_splits)  # fmt: skip
    with op_range("decode_attention", impl.backend):
        out, lse = impl.fn(**inputs)
    return (out, lse) if return_softmax_lse else out


def _inputs(q, k_cache, v_cache, seqlens, batch_idx, block_table, scale, window_left, window_right, softcap,
            alibi_slopes, num_splits) -> dict:  # fmt: skip
    """The decode_attention op's inputs, by name."""
    return dict(
        q=q, k_cache=k_cache, v_cache=v_cache, seqlens=seqlens, batch_idx=batch_idx, block_table=block_table,
        scale=scale, window_left=window_left, window_right=window_right, softcap=softcap, alibi_slopes=alibi_slopes,
        num_splits=num_splits,
    )  # fmt: skip


def _int32(name: str, t, dims: int) -> torch.Tensor:
    check.tensor(name, t, dims=(dims,))
    if t.dtype != torch.int32:
        raise check.ArgumentTypeError(f"{name} must be an int32 tensor, got {t.dtype}")
    return t


def _check_signature(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, block_table,
                     softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes, num_splits,
                     return_softmax_lse):  # fmt: skip
    """Every check of :func:`flash_attn_with_kvcache` that reads no tensor values (types, shapes, dtypes, devices,
    strides, requires_grad, the grad mode, the scalar arguments: what a signature holds), before anything is written.
    Returns ``(capacity, cache rows, tokens per row or page, seqlen_new, window_left, window_right with causal folded
    in, whether rotary positions are local)``."""
    check.tensor("q", q, dims=(4,), floating=True)
    check.tensor("k_cache", k_cache, dims=(4,), floating=True)
    check.tensor("v_cache", v_cache, dims=(4,), floating=True)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if t is not None:
            check.plain_tensor(name, t)
    if (k is None) != (v is None):
        raise check.ArgumentError("k and v must be given together (new keys and values), got only one of them")
    if k is not None:
        check.tensor("k", k, dims=(4,), floating=True)
        check.tensor("v", v, dims=(4,), floating=True)
    check.same_dtype(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    check.same_device(
        q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        cache_seqlens=cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None,
        cache_batch_idx=cache_batch_idx, block_table=block_table, alibi_slopes=alibi_slopes,
    )  # fmt: skip
    for name, value in (("causal", causal), ("rotary_interleaved", rotary_interleaved),
                        ("return_softmax_lse", return_softmax_lse)):  # fmt: skip
        check.flag(name, value)
    if torch.is_grad_enabled():
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
            if t is not None and t.requires_grad:
                raise check.ArgumentError(
                    f"flash_attn_with_kvcache is for inference and has no backward pass, but {name} requires grad: "
                    "call it under torch.no_grad() / torch.inference_mode(), or pass detached tensors"
                )

    b, nq, hq, d = q.shape
    paged = block_table is not None
    if k_cache.shape != v_cache.shape:
        raise check.ArgumentError(
            f"v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )
    rows, per_row, hk, dk = k_cache.shape
    if dk != d:
        raise check.ArgumentError(f"k_cache's head dim must equal q's ({d}), got {dk}")
    if d == 0:
        raise check.ArgumentError("q's head dim must be >= 1, got 0")
    if hk == 0 or hq % hk:
        raise check.ArgumentError(f"k_cache's heads ({hk}) must divide q's heads ({hq})")
    new = 0
    if k is not None:
        if k.shape[0] != b or k.shape[2:] != (hk, d):
            raise check.ArgumentError(
                f"k must have shape ({b}, seqlen_new, {hk}, {d}) (q's batch, the cache's heads and head dim), "
                f"got {tuple(k.shape)}"
            )
        if v.shape != k.shape:
            raise check.ArgumentError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
        new = k.shape[1]
        check.writable("k_cache", k_cache)
        check.writable("v_cache", v_cache)

    if paged:
        _int32("block_table", block_table, 2)
        if block_table.shape[0] != b:
            raise check.ArgumentError(
                f"block_table must have one row per sequence ({b}), got shape {tuple(block_table.shape)}"
            )
        if cache_batch_idx is not None:
            raise check.ArgumentError("cache_batch_idx cannot be combined with block_table (the table maps sequences)")
        if per_row == 0:
            raise check.ArgumentError("k_cache's page size (dim 1 of a paged cache) must be >= 1, got 0")
        capacity = block_table.shape[1] * per_row
    else:
        capacity = per_row
        if cache_batch_idx is not None:
            _int32("cache_batch_idx", cache_batch_idx, 1)
            if cache_batch_idx.shape[0] != b:
                raise check.ArgumentError(
                    f"cache_batch_idx must have one entry per sequence ({b}), got shape {tuple(cache_batch_idx.shape)}"
                )
        elif rows < b:
            raise check.ArgumentError(
                f"k_cache must have a row per sequence ({b}) without cache_batch_idx, got {rows} rows"
            )

    if cache_seqlens is None:
        if k is not None:
            raise check.ArgumentError("cache_seqlens is required with k and v: it says where the new tokens go")
    elif isinstance(cache_seqlens, torch.Tensor):
        _int32("cache_seqlens", cache_seqlens, 1)
        if cache_seqlens.shape[0] != b:
            raise check.ArgumentError(f"cache_seqlens must have shape ({b},), got {tuple(cache_seqlens.shape)}")
    else:
        value = check.integer("cache_seqlens", cache_seqlens, minimum=0)
        if value + new > capacity:
            raise check.ArgumentError(
                f"cache_seqlens ({value}) + seqlen_new ({new}) exceeds the cache's capacity of {capacity} tokens"
            )

    rotary_dim = 0
    if (rotary_cos is None) != (rotary_sin is None):
        raise check.ArgumentError("rotary_cos and rotary_sin must be given together, got only one of them")
    if rotary_cos is not None:
        if k is None:
            raise check.ArgumentError("rotary_cos / rotary_sin apply to the new k and q: pass k and v with them")
        check.tensor("rotary_cos", rotary_cos, dims=(2,), floating=True)
        check.tensor("rotary_sin", rotary_sin, dims=(2,), floating=True)
        if rotary_cos.dtype != q.dtype or rotary_sin.dtype != q.dtype:
            raise check.ArgumentTypeError(
                f"rotary_cos and rotary_sin must have q's dtype {q.dtype}, got {rotary_cos.dtype}, {rotary_sin.dtype}"
            )
        if rotary_sin.shape != rotary_cos.shape:
            raise check.ArgumentError(
                f"rotary_sin must have rotary_cos's shape {tuple(rotary_cos.shape)}, got {tuple(rotary_sin.shape)}"
            )
        rotary_dim = 2 * rotary_cos.shape[1]
        if not 0 < rotary_dim <= d:
            raise check.ArgumentError(
                f"rotary_cos must have shape (seqlen_ro, rotary_dim / 2) with 0 < rotary_dim <= {d}, "
                f"got {tuple(rotary_cos.shape)}"
            )

    if alibi_slopes is not None:
        check.tensor("alibi_slopes", alibi_slopes, dims=(1, 2))
        if alibi_slopes.dtype != torch.float32:
            raise check.ArgumentTypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
        if alibi_slopes.shape not in ((hq,), (b, hq)):
            raise check.ArgumentError(
                f"alibi_slopes must have shape ({hq},) or ({b}, {hq}), got {tuple(alibi_slopes.shape)}"
            )
    if softmax_scale is not None:
        check.finite_float("softmax_scale", softmax_scale)
    softcap = check.finite_float("softcap", softcap)
    if softcap < 0:
        raise check.ArgumentError(f"softcap must be >= 0 (0: off), got {softcap}")
    check.integer("num_splits", num_splits, minimum=0)
    if not isinstance(window_size, tuple | list) or len(window_size) != 2:
        raise check.ArgumentTypeError(f"window_size must be a pair (left, right), got {window_size!r}")
    window_left = check.integer("window_size[0]", window_size[0], minimum=-1)
    window_right = check.integer("window_size[1]", window_size[1], minimum=-1)
    if causal:  # causal is the right side of the window at 0
        window_right = 0 if window_right < 0 else min(window_right, 0)

    rotary_local = bool(rotary_dim) and (causal or window_size[0] >= 0 or window_size[1] >= 0)
    return capacity, rows, per_row, new, window_left, window_right, rotary_local


def _check_values(seqlens, new, nq, capacity, rows, page_size, cache_batch_idx, block_table, rotary_cos, local):
    """The checks that read the index tensors; returns ``(min, max)`` of ``seqlens`` (None when it is empty)."""
    bounds = None
    if seqlens.numel():
        if seqlens.numel() <= 64:  # one read of a few values beats a reduction and two reads (one sync on a GPU)
            values = seqlens.tolist()
            lo, hi = bounds = min(values), max(values)
        else:
            lo, hi = torch.aminmax(seqlens)
            lo, hi = bounds = int(lo), int(hi)
        if lo < 0:
            raise check.ArgumentError(f"cache_seqlens must be >= 0, found {lo}")
        if hi + new > capacity:
            raise check.ArgumentError(
                f"cache_seqlens ({hi}) + seqlen_new ({new}) exceeds the cache's capacity of {capacity} tokens: "
                "the cache is too small for the new tokens"
            )
        if rotary_cos is not None:
            last = hi + max(new, nq if local else 1) - 1
            if last >= rotary_cos.shape[0]:
                raise check.ArgumentError(
                    f"rotary_cos has {rotary_cos.shape[0]} positions, the new tokens need position {last}"
                )
    if cache_batch_idx is not None and cache_batch_idx.numel():
        lo, hi = int(cache_batch_idx.min()), int(cache_batch_idx.max())
        if lo < 0 or hi >= rows:
            raise check.ArgumentError(
                f"cache_batch_idx must lie in [0, {rows}) (k_cache's rows), found {lo if lo < 0 else hi}"
            )
    if block_table is not None and block_table.numel():
        used = torch.arange(block_table.shape[1], device=block_table.device) * page_size < (seqlens[:, None] + new)
        entries = block_table[used]
        if entries.numel():
            lo, hi = int(entries.min()), int(entries.max())
            if lo < 0 or hi >= rows:
                raise check.ArgumentError(
                    f"block_table entries of pages in use must lie in [0, {rows}) (k_cache's pages), found "
                    f"{lo if lo < 0 else hi}"
                )
    return bounds
