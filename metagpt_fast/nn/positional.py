"""Positional modules: the article's PositionalEncoding, a fused token+position embedding, and rotary."""

from __future__ import annotations

import math

import torch
from torch import nn

from metagpt_fast.ops import add_positional_encoding, apply_rotary, embed_positions
from metagpt_fast.ops.reference.positional import DEFAULT_BASE


class PositionalEncoding(nn.Module):
    """``dropout(x + PE)`` for ``x`` ``(B, T, d_model)``, with the correct sinusoidal table computed in the kernel.

    Same constructor as the original article's module (plus ``dropout`` and ``backend``); it holds no parameters or
    buffers, so it swaps in for the article's module without touching a state_dict.
    """

    def __init__(self, d_model: int, max_seq_length: int, dropout: float = 0.0, *, backend: str | None = None):
        super().__init__()
        if d_model < 1 or max_seq_length < 1:
            raise ValueError(f"d_model and max_seq_length must be >= 1, got {d_model}, {max_seq_length}")
        self.d_model, self.max_seq_length, self.dropout, self.backend = d_model, max_seq_length, dropout, backend

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() == 3:
            _check_length("x", x.shape[1] + offset, self.max_seq_length)
            if x.shape[-1] != self.d_model:
                raise ValueError(f"x must have d_model={self.d_model} features, got {x.shape[-1]}")
        p = self.dropout if self.training else 0.0
        return add_positional_encoding(x, offset, p, backend=self.backend)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_seq_length={self.max_seq_length}, dropout={self.dropout}"


class TokenPositionalEmbedding(nn.Module):
    """Token embedding ``× scale`` + sinusoidal encoding + dropout in one fused op.

    Its one parameter is named ``weight`` like ``nn.Embedding``'s, so state_dicts interchange.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        max_seq_length: int,
        dropout: float = 0.0,
        *,
        scale: float | None = None,
        sinusoidal: bool = True,
        backend: str | None = None,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))
        nn.init.normal_(self.weight, std=0.02)
        self.max_seq_length, self.dropout, self.sinusoidal, self.backend = max_seq_length, dropout, sinusoidal, backend
        self.scale = math.sqrt(embedding_dim) if scale is None else scale

    def forward(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if isinstance(tokens, torch.Tensor) and tokens.dim() == 2:
            _check_length("tokens", tokens.shape[1] + offset, self.max_seq_length)
        p = self.dropout if self.training else 0.0
        return embed_positions(tokens, self.weight, self.scale, offset, p, self.sinusoidal, backend=self.backend)

    def extra_repr(self) -> str:
        v, d = self.weight.shape
        return f"{v}, {d}, scale={self.scale:.4g}, sinusoidal={self.sinusoidal}, dropout={self.dropout}"


class RotaryEmbedding(nn.Module):
    """Rotates queries and keys ``(B, H, T, head_dim)`` by their positions (no parameters)."""

    def __init__(
        self,
        head_dim: int,
        rotary_dim: int | None = None,
        base: float = DEFAULT_BASE,
        interleaved: bool = False,
        *,
        backend: str | None = None,
    ):
        super().__init__()
        self.head_dim, self.rotary_dim = head_dim, head_dim if rotary_dim is None else rotary_dim
        if self.rotary_dim > head_dim or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even and <= head_dim={head_dim}, got {self.rotary_dim}")
        self.base, self.interleaved, self.backend = base, interleaved, backend

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, offset: int = 0, position_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(
            q, k, position_ids, offset, self.rotary_dim, self.base, self.interleaved, backend=self.backend
        )

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, interleaved={self.interleaved}"
        )


def _check_length(name: str, length: int, limit: int) -> None:
    if length > limit:
        raise ValueError(f"{name}: positions up to {length} exceed max_seq_length={limit}")
