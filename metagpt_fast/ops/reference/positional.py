"""Reference sinusoidal positional encoding and fused-embedding ops (step by step; fast backends fuse them).

    PE[pos, 2i]   = sin(pos / base^(2i / d))
    PE[pos, 2i+1] = cos(pos / base^(2i / d))        (Vaswani et al. 2017, section 3.5; base = 10000)

For odd ``d`` the last column is a sine. The table is computed in float64 and rounded once to the output dtype,
so it is the exact value that float32 kernels approximate (their error grows like ``pos * 2**-24``).
"""

from __future__ import annotations

import torch

from metagpt_fast._spec import DEFAULT_BASE  # re-exported: the kernels and this reference share one default

__all__ = ["DEFAULT_BASE", "add_positional_encoding", "embed_positions", "sinusoidal_table"]


def sinusoidal_table(
    seq_len: int,
    d_model: int,
    offset: int = 0,
    base: float = DEFAULT_BASE,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(seq_len, d_model)`` table of positions ``offset .. offset + seq_len - 1``."""
    pos = torch.arange(offset, offset + seq_len, dtype=torch.float64, device=device)
    two_i = torch.arange(0, d_model, 2, dtype=torch.float64, device=device)
    angle = pos[:, None] / base ** (two_i / d_model)[None, :]  # (seq_len, ceil(d/2))
    table = torch.empty(seq_len, d_model, dtype=torch.float64, device=device)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle[:, : d_model // 2])
    return table.to(dtype)


def _dropout(x: torch.Tensor, dropout_p: float, dropout_mask: torch.Tensor | None) -> torch.Tensor:
    if dropout_p == 0.0:
        return x
    if dropout_mask is not None:
        return x * dropout_mask / (1.0 - dropout_p)
    return torch.nn.functional.dropout(x, dropout_p, training=True)


def add_positional_encoding(
    x: torch.Tensor,
    offset: int = 0,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dropout(x + PE[offset : offset + T])`` for ``x`` of shape ``(B, T, d)``; the sum is taken in float32
    (float64 for float64 inputs)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    table = sinusoidal_table(x.shape[-2], x.shape[-1], offset, dtype=acc, device=x.device)
    return _dropout((x.to(acc) + table).to(x.dtype), dropout_p, dropout_mask)


def embed_positions(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    scale: float = 1.0,
    offset: int = 0,
    dropout_p: float = 0.0,
    sinusoidal: bool = True,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``dropout(weight[tokens] * scale + PE)`` for ``tokens`` ``(B, T)`` and ``weight`` ``(vocab, d)``."""
    acc = torch.promote_types(weight.dtype, torch.float32)
    x = torch.nn.functional.embedding(tokens, weight).to(acc) * scale
    if sinusoidal:
        x = x + sinusoidal_table(tokens.shape[-1], weight.shape[-1], offset, dtype=acc, device=weight.device)
    return _dropout(x.to(weight.dtype), dropout_p, dropout_mask)
