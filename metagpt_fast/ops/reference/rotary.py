"""Reference rotary position embedding (Su et al. 2021, "RoFormer"), applied to queries and keys.

For the first ``rotary_dim`` features of each head, pair ``(x1, x2)`` rotates by
``theta = pos * base^(-2i/rotary_dim)``:

    x1' = x1 cos(theta) - x2 sin(theta)
    x2' = x2 cos(theta) + x1 sin(theta)

Pairs are ``(i, i + rotary_dim/2)`` in the half-split GPT-NeoX / Llama layout and ``(2i, 2i+1)`` in the interleaved
GPT-J layout. Features past ``rotary_dim`` pass through. The backward pass is the rotation by ``-theta``.
"""

from __future__ import annotations

import torch

from metagpt_fast.ops.reference.positional import DEFAULT_BASE


def rotary_angles(
    positions: torch.Tensor, rotary_dim: int, base: float = DEFAULT_BASE, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``positions[..., None] * inv_freq``, shape ``positions.shape + (rotary_dim // 2,)``.

    Computed in float64 and rounded once to ``dtype``, like the sinusoidal table.
    """
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=positions.device) / rotary_dim)
    angle = positions.to(torch.float64)[..., None] * inv_freq
    return torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)


def positions_for(seq_len: int, offset: int = 0, position_ids: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Positions ``(T,)`` from an offset, or the given ``position_ids`` (``(T,)`` or ``(B, T)``)."""
    if position_ids is not None:
        return position_ids
    return torch.arange(offset, offset + seq_len, device=device)


def rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, interleaved: bool = False
) -> torch.Tensor:
    """Rotates the first ``rotary_dim`` features of ``x`` ``(B, H, T, D)``; ``cos``/``sin`` are ``(T | B,T, r/2)``."""
    if cos.dim() == 3:  # per-batch positions (B, T, r/2) -> broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    rot, rest = x[..., :rotary_dim].to(cos.dtype), x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :]
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    if interleaved:
        y = torch.stack((y1, y2), dim=-1).flatten(-2)
    else:
        y = torch.cat((y1, y2), dim=-1)
    return torch.cat((y.to(x.dtype), rest), dim=-1)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    offset: int = 0,
    rotary_dim: int | None = None,
    base: float = DEFAULT_BASE,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates ``q`` ``(B, Hq, T, D)`` and ``k`` ``(B, Hk, T, D)`` at positions ``offset + t`` or ``position_ids``."""
    rotary_dim = q.shape[-1] if rotary_dim is None else rotary_dim
    positions = positions_for(q.shape[-2], offset, position_ids, q.device)
    cos, sin = rotary_angles(positions, rotary_dim, base, torch.promote_types(q.dtype, torch.float32))
    return rotate(q, cos, sin, rotary_dim, interleaved), rotate(k, cos, sin, rotary_dim, interleaved)
