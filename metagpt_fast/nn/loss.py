"""Loss modules: the LM head's cross-entropy without its logits."""

from __future__ import annotations

import torch
from torch import nn

from metagpt_fast.ops import linear_cross_entropy
from metagpt_fast.ops.linear_cross_entropy import check_options


class LinearCrossEntropy(nn.Module):
    """``F.cross_entropy(softcap(F.linear(hidden, weight, bias)), targets)`` chunk by chunk of rows, never holding
    the ``(N, V)`` logits (:func:`metagpt_fast.linear_cross_entropy`).

    A loss like ``nn.CrossEntropyLoss``, without parameters: the head's ``weight`` (and ``bias``) come with each
    call, so a head tied to the token embedding stays tied and no state_dict changes. Liger-Kernel's
    ``LigerFusedLinearCrossEntropyLoss`` has the same role (it takes the weight first).

    Arguments: as :func:`metagpt_fast.linear_cross_entropy` (``ignore_index``, ``reduction``, ``label_smoothing``,
    ``softcap``, ``chunk_size``, ``backend``); checked here already, so a bad module fails when it is built.
    """

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | None = None,
        *,
        backend: str | None = None,
    ):
        super().__init__()
        options = check_options(ignore_index, reduction, label_smoothing, softcap, chunk_size)
        self.ignore_index, self.reduction, self.label_smoothing, self.softcap, self.chunk_size = options
        self.backend = backend

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``hidden`` ``(..., d)``, ``weight`` ``(V, d)``, ``targets`` ``hidden.shape[:-1]`` or ``(N,)``, ``bias``
        ``(V,)`` or None."""
        return linear_cross_entropy(
            hidden, weight, targets, bias, self.ignore_index, self.reduction, self.label_smoothing, self.softcap,
            self.chunk_size, backend=self.backend,
        )  # fmt: skip

    def extra_repr(self) -> str:
        parts = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        if self.chunk_size is not None:
            parts.append(f"chunk_size={self.chunk_size}")
        return ", ".join(parts)
