"""LayerNorm and RMSNorm modules: torch's classes (same constructor, parameters and state_dict keys; ``isinstance``
holds) whose forward runs :func:`metagpt_fast.layer_norm` / :func:`metagpt_fast.rms_norm`, with a ``backend`` choice
and the fused residual add (``forward(input, residual)`` returns ``(normed, input + residual)``)."""

from __future__ import annotations

import torch
from torch import nn

from metagpt_fast.ops.norms import layer_norm, rms_norm


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm`` over the package's op; state_dicts load both ways with torch's.

    ``forward(input)`` is torch's; ``forward(input, residual)`` normalises ``input + residual`` and returns
    ``(normed, input + residual)`` in one pass. Under CUDA autocast the input is normalised in float32, as torch's
    autocast does for ``layer_norm``.
    """

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(
        self, input: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if input.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            input = input.float()
            residual = residual.float() if residual is not None else None
        return layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps, residual=residual, backend=self.backend
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", backend={self.backend!r}" if self.backend is not None else "")


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm`` over the package's op (``eps=None``: ``torch.finfo(input.dtype).eps``, as torch's);
    ``forward(input, residual)`` as :class:`LayerNorm`'s."""

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(
        self, input: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return rms_norm(input, self.normalized_shape, self.weight, self.eps, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", backend={self.backend!r}" if self.backend is not None else "")
