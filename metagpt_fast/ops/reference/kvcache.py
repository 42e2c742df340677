"""Reference attention of a few new queries against a key/value cache (flash-attn's ``flash_attn_with_kvcache``).

Layouts are flash-attn's, sequence before heads:

    q        (B, Nq, Hq, D)
    k_cache  (B_c, N_max, Hk, D)                 contiguous cache: row ``batch_idx[b]`` holds sequence ``b``
             (num_blocks, page_size, Hk, D)      paged cache: token ``t`` of sequence ``b`` sits in page
                                                 ``block_table[b, t // page_size]`` at slot ``t % page_size``
    seqlens  (B,) int32                          keys of sequence ``b`` in the cache (new tokens included)

Query ``i`` of sequence ``b`` sits at position ``p_i = i + seqlens[b] - Nq`` (the queries are the last ``Nq``
tokens: causal and window masks are aligned to the bottom right). Its score against key ``j < seqlens[b]``:

    s_ij = scale * q_i . k_j                      (softcap > 0: softcap * tanh(scale * q_i . k_j / softcap))
           - slope[b, h] * |p_i - j|              (ALiBi, when slopes are given)

masked to ``-inf`` where ``j > p_i`` (causal), ``j < p_i - window_left`` or ``j > p_i + window_right`` (a window
side of -1 is unbounded). ``out_i = softmax(s_i) @ V``; a row with no visible key gives 0, and its log-sum-exp is
``-inf`` (flash-attn stores ``+inf`` there; ``-inf`` is the log of an empty sum, so merging LSEs stays a plain
``logaddexp``). The GQA group of query head ``h`` is key head ``h // (Hq / Hk)``.

:func:`write_cache` is the in-place append of new keys and values the public op does before attending, and
:func:`rotate_at` the rotary embedding from a cos/sin table at per-sequence positions.
"""

from __future__ import annotations

import torch

from metagpt_fast.ops.reference.rotary import rotate


def gather_cache(
    cache: torch.Tensor, seqlens: torch.Tensor, batch_idx: torch.Tensor | None, block_table: torch.Tensor | None
) -> torch.Tensor:
    """The cache as one ``(B, N, Hk, D)`` tensor per sequence (``N``: the capacity per sequence). Pages past a
    sequence's length may hold any entry: they are clamped into range (the keys there are masked anyway)."""
    b = seqlens.shape[0]
    if block_table is None:
        rows = torch.arange(b, device=cache.device) if batch_idx is None else batch_idx.long()
        return cache[rows]
    page_size = cache.shape[1]
    t = torch.arange(block_table.shape[1] * page_size, device=cache.device).expand(b, -1)
    pages = block_table.long().gather(1, t // page_size).clamp(0, max(cache.shape[0] - 1, 0))
    rows, slots = pages, t % page_size
    return cache[rows, slots]


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqlens: torch.Tensor,
    batch_idx: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    scale: float = 1.0,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B, Nq, Hq, D) in q's dtype, lse (B, Hq, Nq) float32 / float64)``; see the module docstring.

    ``alibi_slopes``: ``(B, Hq)`` float32 or None. Computed in float32 (float64 for float64 inputs)."""
    b, nq, hq, _ = q.shape
    acc = torch.promote_types(q.dtype, torch.float32)
    keys = gather_cache(k_cache, seqlens, batch_idx, block_table)  # (B, N, Hk, D)
    values = gather_cache(v_cache, seqlens, batch_idx, block_table)
    n, hk = keys.shape[1], keys.shape[2]
    keys = keys.repeat_interleave(hq // hk, dim=2).transpose(1, 2).to(acc)  # (B, Hq, N, D)
    values = values.repeat_interleave(hq // hk, dim=2).transpose(1, 2).to(acc)

    scores = (q.transpose(1, 2).to(acc) @ keys.transpose(-2, -1)) * scale  # (B, Hq, Nq, N)
    if softcap > 0.0:
        scores = softcap * torch.tanh(scores / softcap)
    lengths = seqlens.long()[:, None, None, None]  # (B, 1, 1, 1)
    j = torch.arange(n, device=q.device)
    p = torch.arange(nq, device=q.device)[:, None] + lengths - nq  # (B, 1, Nq, 1): each query's position
    if alibi_slopes is not None:
        scores = scores - alibi_slopes.to(acc)[:, :, None, None] * (p - j).abs().to(acc)
    visible = j < lengths
    if causal:
        visible = visible & (j <= p)
    if window_left >= 0:
        visible = visible & (j >= p - window_left)
    if window_right >= 0:
        visible = visible & (j <= p + window_right)
    scores = scores.masked_fill(~visible, float("-inf"))

    lse = torch.logsumexp(scores, dim=-1)  # -inf on rows with no visible key
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    out = (probs @ values).transpose(1, 2)  # (B, Nq, Hq, D)
    return out.to(q.dtype), lse


def rotate_at(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """Rotary embedding of ``x`` ``(B, T, H, D)`` by rows ``positions`` ``(B, T)`` of the tables ``cos`` / ``sin``
    ``(seqlen_ro, rotary_dim / 2)``, computed in float32 (float64 for float64 inputs); features past
    ``rotary_dim`` pass through."""
    acc = torch.promote_types(x.dtype, torch.float32)
    cos_t, sin_t = cos.to(acc)[positions], sin.to(acc)[positions]  # (B, T, r/2)
    rotated = rotate(x.transpose(1, 2), cos_t, sin_t, 2 * cos.shape[-1], interleaved)
    return rotated.transpose(1, 2)


def write_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_seqlens: torch.Tensor,
    batch_idx: torch.Tensor | None,
    block_table: torch.Tensor | None,
) -> None:
    """Writes ``k``, ``v`` ``(B, T, Hk, D)`` (the caches' dtype) into the caches in place, token ``i`` of sequence
    ``b`` at position ``cache_seqlens[b] + i`` (row ``batch_idx[b]`` of a contiguous cache, or its page of
    ``block_table``)."""
    b, t = k.shape[:2]
    if t == 0 or b == 0:
        return
    pos = cache_seqlens.long()[:, None]  # (B, 1), then (B, T)
    if t > 1:
        pos = pos + torch.arange(t, device=k.device)
    if block_table is None:
        rows = torch.arange(b, device=k.device) if batch_idx is None else batch_idx.long()
        rows = rows[:, None]
    else:
        page_size = k_cache.shape[1]
        rows, pos = block_table.long().gather(1, pos // page_size), pos % page_size
    k, v = k.reshape(b * t, *k.shape[2:]), v.reshape(b * t, *v.shape[2:])
    slots = k_cache.shape[1]
    if all(c.stride(0) == slots * c.stride(1) for c in (k_cache, v_cache)):  # (row, slot) flattens to one index
        flat = (rows * slots + pos).reshape(-1)
        k_cache.flatten(0, 1).index_copy_(0, flat, k)
        v_cache.flatten(0, 1).index_copy_(0, flat, v)
    else:
        index = (rows.expand(b, t).reshape(-1), pos.expand(b, t).reshape(-1))
        k_cache.index_put_(index, k)
        v_cache.index_put_(index, v)
