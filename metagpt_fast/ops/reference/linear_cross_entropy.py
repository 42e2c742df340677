"""Reference linear + cross-entropy: the LM head's logits and their cross-entropy loss, written out.

For rows ``h_i`` of ``hidden`` ``(N, d)``, ``weight`` ``(V, d)``, ``bias`` ``(V,)`` and targets ``t_i``:

    z_i    = h_i W^T + b                               (the logits, V per row)
    z_i    = c * tanh(z_i / c)                         (only with a softcap c, Gemma-2's final_logit_softcapping)
    loss_i = (1 - eps) * (lse(z_i) - z_i[t_i]) + eps * (lse(z_i) - mean(z_i))

with ``eps`` the label smoothing: torch's ``F.cross_entropy``, whose smoothed term is the mean over the V classes
of ``-log p``. Rows whose target is ``ignore_index`` have loss 0 and no gradient; ``"mean"`` divides the sum by the
number of the other rows (NaN when there are none, as torch does).

This is the test oracle: it materialises the ``(N, V)`` logits, and computes the softmax in float32 (float64 for
float64 inputs) after the product in the inputs' precision, as Hugging Face's ``logits.float()`` does. The chunked
backends never hold more than one chunk of logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(softcap(F.linear(hidden, weight, bias)), targets)`` over rows ``hidden.reshape(-1, d)``;
    the loss is float32 (float64 for float64 inputs), of ``targets``' shape with ``reduction="none"``."""
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(
        logits, targets.reshape(-1).long(), ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing,
    )  # fmt: skip
    if reduction == "none":
        loss = loss.reshape(targets.shape)
    return loss
