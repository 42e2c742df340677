"""Reference bias-add + GELU (Hendrycks & Gimpel 2016), the MLP activation of GPT-2 and BERT:

    y = gelu(x + bias)
    gelu(z) = z * Phi(z) = z / 2 * (1 + erf(z / sqrt(2)))                            (approximate="none")
    gelu(z) ~ z / 2 * (1 + tanh(sqrt(2 / pi) * (z + 0.044715 z^3)))                    (approximate="tanh")

Computed in float32 (float64 for float64 inputs) and rounded once to ``x``'s dtype; ``x + bias`` is not rounded in
between (a fused kernel keeps it in registers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metagpt_fast.ops.reference.norms import compute_dtype


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None = None, approximate: str = "none") -> torch.Tensor:
    """``gelu(x + bias)`` with ``bias`` ``(N,)`` broadcast over ``x`` ``(..., N)``; ``bias`` None: ``gelu(x)``."""
    z = x.to(compute_dtype(x.dtype))
    if bias is not None:
        z = z + bias.to(z.dtype)
    return F.gelu(z, approximate=approximate).to(x.dtype)
