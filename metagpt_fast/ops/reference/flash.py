"""Reference flash-attention (flash-attn 2's semantics) over packed variable-length batches: the oracle every fast
implementation of the ``flash_attention`` op is tested against.

Queries ``q (Tq, Hq, D)`` and keys / values ``k (Tk, Hk, D)``, ``v (Tk, Hk, Dv)`` hold ``B`` sequences back to back;
sequence ``b`` is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of ``q`` and ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of
``k`` and ``v``. Each sequence is computed on its own, with dense masks, written from the definitions:

    Lq, Lk = its query and key lengths;  shift = Lk - Lq          (masks aligned to the bottom right)
    allowed(i, j) = (right < 0 or j <= i + shift + right) and (left < 0 or j >= i + shift - left)
    s_ij = scale * q_i . k_j
    s_ij = softcap * tanh(s_ij / softcap)                        if softcap > 0
    s_ij = s_ij - slope[b, h] * |i + shift - j|                    with ALiBi
    P_i  = softmax of s_i over the allowed j;  out_i = sum_j P_ij v_j
    lse_i = log sum_j exp(s_ij) over the allowed j

``causal`` is ``right = 0``. Query head ``h`` reads key/value head ``h // (Hq // Hk)`` (MQA / GQA). Everything is
computed in float32 (float64 for float64 inputs) and the output rounded once to the input dtype. A row with no allowed
key gives ``out = 0`` and ``lse = +inf`` (flash-attn's convention: ``exp(s - lse) = 0`` in a backward pass), with
finite (zero) gradients. Dropout (on ``P``, scaled by ``1 / (1 - p)``) draws from torch's generator.
"""

from __future__ import annotations

import math

import torch


def allowed_mask(
    len_q: int, len_k: int, window_left: int = -1, window_right: int = -1, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean ``(len_q, len_k)`` mask, True where local query ``i`` may attend to key ``j`` (bottom-right aligned)."""
    i = torch.arange(len_q, device=device)[:, None]
    j = torch.arange(len_k, device=device)[None, :]
    diagonal = i + (len_k - len_q)  # the key aligned with query i
    allowed = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if window_right >= 0:
        allowed &= j <= diagonal + window_right
    if window_left >= 0:
        allowed &= j >= diagonal - window_left
    return allowed


def _sequence(q, k, v, scale, window_left, window_right, softcap, slopes, dropout_p):
    """One sequence: ``q (Lq, Hq, D)``, ``k (Lk, Hk, D)``, ``v (Lk, Hk, Dv)`` in the accumulation dtype;
    ``slopes (Hq,)`` or None. Returns ``out (Lq, Hq, Dv)``, ``lse (Hq, Lq)`` and the probabilities ``(Hq, Lq, Lk)``."""
    len_q, hq = q.shape[0], q.shape[1]
    len_k, hk = k.shape[0], k.shape[1]
    if len_k == 0:  # no key at all: every row is empty (out 0 with zero gradients, lse +inf)
        zero = (q.sum() + k.sum() + v.sum()) * 0
        out = q.new_zeros(len_q, hq, v.shape[-1]) + zero
        return out, q.new_full((hq, len_q), math.inf).detach(), q.new_zeros(hq, len_q, 0)
    if hk != hq:
        k = k.repeat_interleave(hq // hk, dim=1)
        v = v.repeat_interleave(hq // hk, dim=1)
    q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H, L, D)
    scores = (q @ k.transpose(-2, -1)) * scale
    if softcap > 0.0:
        scores = softcap * torch.tanh(scores / softcap)
    if slopes is not None:
        i = torch.arange(len_q, device=q.device)[:, None]
        j = torch.arange(len_k, device=q.device)[None, :]
        distance = (i + (len_k - len_q) - j).abs().to(scores.dtype)
        scores = scores - slopes.to(scores.dtype)[:, None, None] * distance
    allowed = allowed_mask(len_q, len_k, window_left, window_right, q.device)
    scores = scores.masked_fill(~allowed, -math.inf)

    # Softmax that maps a row without an allowed key to zeros with finite gradients: its maximum (-inf) is replaced
    # by 0, so exp(-inf - 0) = 0 and the guarded normaliser keeps 0 / 1.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))
    with torch.no_grad():
        lse = (row_max + torch.log(denom)).squeeze(-1)
        lse = torch.where(denom.squeeze(-1) > 0, lse, torch.full_like(lse, math.inf))
    kept = torch.nn.functional.dropout(probs, dropout_p, training=True) if dropout_p > 0.0 else probs
    return (kept @ v).transpose(0, 1), lse, probs.detach()


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    softmax_scale: float | None = None,
    window_left: int = -1,
    window_right: int = -1,
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    return_probs: bool = False,
):
    """Attention over packed sequences, computed explicitly, one sequence at a time.

    Arguments as in the module docstring; ``alibi_slopes``: ``(B, Hq)`` (or ``(Hq,)``, the same for every sequence).
    Returns ``(out (Tq, Hq, Dv) in q's dtype, lse float32 (Hq, Tq))``, plus, with ``return_probs``, the softmax
    probabilities (before dropout) as a float32 ``(B, Hq, max Lq, max Lk)`` tensor, zero outside each sequence.
    """
    acc = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    batch = len(starts_q) - 1
    if alibi_slopes is not None and alibi_slopes.dim() == 1:
        alibi_slopes = alibi_slopes.expand(batch, -1)
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    outs, lses, probs = [], [], []
    for b in range(batch):
        q0, q1, k0, k1 = starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]
        slopes = None if alibi_slopes is None else alibi_slopes[b]
        out, lse, p = _sequence(
            qa[q0:q1], ka[k0:k1], va[k0:k1], scale, window_left, window_right, softcap, slopes, dropout_p
        )
        outs.append(out)
        lses.append(lse)
        probs.append(p)
    if outs:
        out = torch.cat(outs, dim=0)
        lse = torch.cat(lses, dim=1)
    else:  # no sequence: empty results that still carry (zero) gradients
        out = qa.new_zeros(q.shape[0], q.shape[1], v.shape[-1]) + (qa.sum() + ka.sum() + va.sum()) * 0
        lse = qa.new_zeros(q.shape[1], q.shape[0])
    out, lse = out.to(q.dtype), lse.to(torch.float32)
    if not return_probs:
        return out, lse
    max_q = max((starts_q[b + 1] - starts_q[b] for b in range(batch)), default=0)
    max_k = max((starts_k[b + 1] - starts_k[b] for b in range(batch)), default=0)
    dense = torch.zeros(batch, q.shape[1], max_q, max_k, dtype=torch.float32, device=q.device)
    for b, p in enumerate(probs):
        dense[b, :, : p.shape[1], : p.shape[2]] = p.to(torch.float32)
    return out, lse, dense
