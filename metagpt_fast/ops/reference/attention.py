"""Reference scaled-dot-product attention: the readable oracle every fast backend is tested against.

    S = scale * Q @ K^T + mask            # (B, H, Nq, Nk); boolean masks turn False into -inf
    P = softmax(S) with fully-masked rows set to 0
    O = dropout(P) @ V                    # (B, H, Nq, D)

Semantics follow ``torch.nn.functional.scaled_dot_product_attention``, including its causal alignment when
``Nq != Nk`` (top-left: query ``i`` sees keys ``j <= i``), with one documented difference: a query row whose every
key is masked gives an output of 0 and finite gradients, where torch's math path gives NaN. That is what a fused
kernel naturally computes (its running sum stays 0), and it keeps padded rows from poisoning a training step.
"""

from __future__ import annotations

import math

import torch


def causal_mask(nq: int, nk: int, device: torch.device) -> torch.Tensor:
    """Boolean (Nq, Nk) mask, True where query ``i`` may attend to key ``j`` (``j <= i``, torch's alignment)."""
    return torch.ones(nq, nk, dtype=torch.bool, device=device).tril()


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over ``(B, H, N, D)`` tensors, computed explicitly.

    ``dropout_mask``: optional boolean keep-mask broadcastable to ``(B, H, Nq, Nk)``; when given (and
    ``dropout_p > 0``) it replaces torch's random dropout, so a fast kernel's Philox mask can be replayed exactly.
    Matmuls run in the input dtype; the softmax in float32 (float64 for float64 inputs).
    """
    nq, nk = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        group = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(group, dim=-3)
        value = value.repeat_interleave(group, dim=-3)

    acc = torch.promote_types(query.dtype, torch.float32)  # float32, or float64 for float64 inputs
    scores = (query @ key.transpose(-2, -1)).to(acc) * scale
    if is_causal:
        scores = scores.masked_fill(~causal_mask(nq, nk, scores.device), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(acc)

    # Softmax that maps a fully-masked row to zeros instead of NaN, with finite gradients: the row maximum of such
    # a row is -inf, replaced by 0 so exp(-inf - 0) = 0 and the normaliser is guarded.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom > 0, denom, torch.ones_like(denom))

    if dropout_p > 0.0:
        if dropout_mask is not None:
            probs = probs * dropout_mask / (1.0 - dropout_p)
        else:
            probs = torch.nn.functional.dropout(probs, dropout_p, training=True)
    return probs.to(value.dtype) @ value
