"""Causal self-attention and the pre-LayerNorm transformer block (GPT-2 layout)."""

from __future__ import annotations

import torch
from torch import nn

from metagpt_fast.nn.positional import RotaryEmbedding
from metagpt_fast.ops import scaled_dot_product_attention


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

    def forward(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """``kv_cache``: a layer of a :class:`metagpt_fast.generation.KVCache` (generation: it stores K/V, places the
        tokens and attends)."""
        b, t, c = x.shape
        # (B, T, 3C) -> three (B, H, T, C/H) views; the ops take strided inputs, no copy needed.
        q, k, v = self.c_attn(x).view(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        if kv_cache is not None:
            y = kv_cache.attend(q, k, v, self.rotary, self.backend)
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        p = self.dropout if self.training else 0.0
        y = scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, backend=self.backend)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))


class MLP(nn.Module):
    def __init__(self, embed_size: int, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.c_fc = nn.Linear(embed_size, 4 * embed_size, bias=bias)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * embed_size, embed_size, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class TransformerBlock(nn.Module):
    """``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

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
        self.ln_1 = nn.LayerNorm(embed_size, bias=bias)
        self.attn = CausalSelfAttention(embed_size, num_heads, dropout, bias=bias, rotary=rotary, backend=backend)
        self.ln_2 = nn.LayerNorm(embed_size, bias=bias)
        self.mlp = MLP(embed_size, dropout, bias)

    def forward(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))
