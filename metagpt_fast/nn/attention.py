"""Causal self-attention and the pre-LayerNorm transformer block (GPT-2 layout)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from metagpt_fast.nn.norm import LayerNorm
from metagpt_fast.nn.positional import RotaryEmbedding
from metagpt_fast.ops import bias_gelu, flash_attn_varlen_func, scaled_dot_product_attention


@dataclasses.dataclass(frozen=True)
class PackedSequences:
    """Documents packed back to back in the rows of a ``(B, T)`` batch: attention never crosses their boundaries.

    ``cu_seqlens`` int32 ``(N + 1,)``: the documents' starts in the flattened ``B * T`` tokens (every row start
    among them, so no document spans two rows), ending at ``B * T``; ``max_seqlen``: the longest document;
    ``position_ids`` ``(B, T)``: each token's position in its document (restarting at 0)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    position_ids: torch.Tensor


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention over ``(B, T, embed_size)``; parameters ``c_attn`` and ``c_proj`` as GPT-2."""

    def __init__(
        self,
        embed_size: int,
        num_heads: int,
        dropout: float = 0.0,
        *,
        bias: bool = True,
        rotary: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        if num_heads < 1 or embed_size % num_heads:
            raise ValueError(f"embed_size ({embed_size}) must be divisible by num_heads ({num_heads})")
        self.embed_size, self.num_heads, self.dropout, self.backend = embed_size, num_heads, dropout, backend
        self.c_attn = nn.Linear(embed_size, 3 * embed_size, bias=bias)
        self.c_proj = nn.Linear(embed_size, embed_size, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.rotary = RotaryEmbedding(embed_size // num_heads, backend=backend) if rotary else None

    def forward(self, x: torch.Tensor, kv_cache=None, packed: PackedSequences | None = None) -> torch.Tensor:
        """``kv_cache``: a layer of a :class:`metagpt_fast.generation.KVCache` (generation: it stores K/V, places the
        tokens and attends). ``packed``: the rows hold several documents (:class:`PackedSequences`), attended one by
        one through :func:`metagpt_fast.flash_attn_varlen_func`."""
        b, t, c = x.shape
        # (B, T, 3C) -> three (B, H, T, C/H) views; the ops take strided inputs, no copy needed.
        q, k, v = self.c_attn(x).view(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if kv_cache is not None:
            y = kv_cache.attend(q, k, v, self.rotary, self.backend)
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))
        p = self.dropout if self.training else 0.0
        if packed is not None:
            if kv_cache is not None:
                raise ValueError("packed sequences are for training: they cannot be combined with a kv_cache")
            if self.rotary is not None:
                q, k = self.rotary(q, k, position_ids=packed.position_ids)
            q, k, v = (u.transpose(1, 2).reshape(b * t, self.num_heads, -1) for u in (q, k, v))
            cu, n = packed.cu_seqlens, packed.max_seqlen
            y = flash_attn_varlen_func(q, k, v, cu, cu, n, n, dropout_p=p, causal=True, backend=self.backend)
            return self.resid_dropout(self.c_proj(y.reshape(b, t, c)))
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        y = scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, backend=self.backend)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))


class MLP(nn.Module):
    """``c_proj(gelu(c_fc(x)))`` (GPT-2's tanh GELU); ``fused=True`` runs ``c_fc`` without its bias and adds the bias
    inside :func:`metagpt_fast.bias_gelu` (one pass over the 4x-wide activation instead of two)."""

    def __init__(
        self,
        embed_size: int,
        dropout: float = 0.0,
        bias: bool = True,
        *,
        fused: bool = False,
        backend: str | None = None,
    ):
        super().__init__()
        self.c_fc = nn.Linear(embed_size, 4 * embed_size, bias=bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * embed_size, embed_size, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.fused, self.backend = fused, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))
        h = F.linear(x, self.c_fc.weight)
        bias = self.c_fc.bias
        # Under autocast the product is in the autocast dtype: the bias follows it, as in autocast's own addmm.
        bias = bias.to(h.dtype) if bias is not None else None
        return self.dropout(self.c_proj(bias_gelu(h, bias, self.gelu.approximate, backend=self.backend)))


class TransformerBlock(nn.Module):
    """``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``.

    ``fused=True``: the norms are :class:`metagpt_fast.nn.LayerNorm` (same parameters and state_dict keys), ``ln_2``
    adds the attention branch to the residual stream in the same pass (``metagpt_fast.layer_norm(..., residual=)``),
    and the MLP's bias and GELU are one op.
    """

    def __init__(
        self,
        embed_size: int,
        num_heads: int,
        dropout: float = 0.0,
        *,
        bias: bool = True,
        rotary: bool = False,
        backend: str | None = None,
        fused: bool = False,
    ):
        super().__init__()
        norm = {"backend": backend} if fused else {}
        self.ln_1 = (LayerNorm if fused else nn.LayerNorm)(embed_size, bias=bias, **norm)
        self.attn = CausalSelfAttention(embed_size, num_heads, dropout, bias=bias, rotary=rotary, backend=backend)
        self.ln_2 = (LayerNorm if fused else nn.LayerNorm)(embed_size, bias=bias, **norm)
        self.mlp = MLP(embed_size, dropout, bias, fused=fused, backend=backend)
        self.fused = fused

    def forward(self, x: torch.Tensor, kv_cache=None, packed: PackedSequences | None = None) -> torch.Tensor:
        if self.fused:
            # x + attn(...) is written once and normalised in the same pass; the branch is cast to the stream's dtype
            # first (what the unfused sum's type promotion does under autocast).
            h, x = self.ln_2(self.attn(self.ln_1(x), kv_cache, packed).to(x.dtype), x)
            return x + self.mlp(h)
        x = x + self.attn(self.ln_1(x), kv_cache, packed)
        return x + self.mlp(self.ln_2(x))
