"""Public linear + cross-entropy op: the LM head's loss without materialising its logits."""

from __future__ import annotations

import torch

from metagpt_fast import backends
from metagpt_fast.ops import reference
from metagpt_fast.ops import validation as check
from metagpt_fast.ops.ranges import op_range

REDUCTIONS = ("mean", "sum", "none")


def _reference(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, softcap, chunk_size):
    # The reference materialises every logit: chunk_size bounds the memory of the chunked backends only.
    return reference.linear_cross_entropy(
        hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, softcap
    )


OP = backends.declare_op(backends.OpSpec("linear_cross_entropy", primary="hidden"), _reference)


def check_options(
    ignore_index: int, reduction: str, label_smoothing: float, softcap: float | None, chunk_size: int | None
) -> tuple[int, str, float, float | None, int | None]:
    """The loss's options, checked (errors name the argument) and normalised; shared with ``nn.LinearCrossEntropy``,
    which checks them when it is built."""
    ignore_index = check.integer("ignore_index", ignore_index)
    if reduction not in REDUCTIONS:
        raise check.ArgumentError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    label_smoothing = check.finite_float("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise check.ArgumentError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None:
        softcap = check.finite_float("softcap", softcap, positive=True)
    if chunk_size is not None:
        chunk_size = check.integer("chunk_size", chunk_size, minimum=1)
    return ignore_index, reduction, label_smoothing, softcap, chunk_size


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(softcap(F.linear(hidden, weight, bias)), targets, ...)`` without the ``(N, V)`` logits.

    The chunked backends (``cpu``, ``triton``) take ``chunk_size`` rows at a time: one chunk of logits, its softmax,
    loss and logit gradient in one pass in place, and the gradient products with ``hidden`` and ``weight``. They
    compute the gradients of ``hidden``, ``weight`` and ``bias`` during the forward pass when the loss is reduced
    (``"mean"`` / ``"sum"``) and a gradient is needed, and keep only those (the backward scales them by the loss's
    gradient, as Liger-Kernel does); with ``reduction="none"`` the backward recomputes each chunk's logits, since the
    gradient of each row's loss is known only then. Row statistics, the loss and the weight and bias gradients are
    accumulated in float32; the products run in the inputs' dtype.

    Arguments:
        hidden: ``(..., d)`` rows (the last hidden state), float16 / bfloat16 / float32 / float64.
        weight: ``(V, d)`` the output projection (LM head), same dtype and device as ``hidden``.
        targets: integer class ids (int64 or int32), shape ``hidden.shape[:-1]`` or ``(N,)`` with ``N`` the number
            of rows; each in ``[0, V)`` or equal to ``ignore_index``.
        bias: optional ``(V,)`` bias of the projection, same dtype.
        ignore_index: rows with this target have loss 0, no gradient and do not count in the mean (torch's).
        reduction: ``"mean"`` over the rows not ignored (NaN when every row is), ``"sum"``, or ``"none"``.
        label_smoothing: in ``[0, 1]``; torch's definition (the smoothed term is the mean of ``-log p`` over the
            classes, and ignored rows contribute nothing to either term).
        softcap: optional positive ``c``: the logits become ``c * tanh(z / c)`` before the softmax (Gemma-2's
            ``final_logit_softcapping``).
        chunk_size: rows per chunk of the chunked backends; default: chosen from ``V`` and the device (see the
            backend). The reference materialises every logit whatever ``chunk_size`` says.
        backend: see :func:`metagpt_fast.scaled_dot_product_attention`.

    Returns:
        The loss in float32 (float64 for float64 inputs), as Hugging Face's and Liger-Kernel's losses are: a
        scalar, or ``targets``' shape with ``reduction="none"``. (``F.cross_entropy`` of bfloat16 logits would be
        bfloat16, ~3 significant digits; under autocast it is float32 too.)
    """
    check.tensor("hidden", hidden, floating=True)
    check.plain_tensor("hidden", hidden)
    check.tensor("weight", weight, dims=(2,), floating=True)
    check.plain_tensor("weight", weight)
    check.tensor("targets", targets)
    if bias is not None:
        check.tensor("bias", bias, dims=(1,), floating=True)
    check.same_dtype(hidden=hidden, weight=weight, bias=bias)
    check.same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    if hidden.dim() < 1:
        raise check.ArgumentError("hidden must have at least 1 dimension (..., d), got a scalar")
    vocab, d = weight.shape
    if hidden.shape[-1] != d:
        raise check.ArgumentError(f"hidden's last dimension must match weight's {d} (weight is (V, d)), got "
                                  f"{hidden.shape[-1]}")  # fmt: skip
    if bias is not None and bias.shape[0] != vocab:
        raise check.ArgumentError(f"bias must have shape ({vocab},) like weight's rows, got {tuple(bias.shape)}")
    rows = hidden.numel() // d if d else int(torch.Size(hidden.shape[:-1]).numel())
    if targets.shape != hidden.shape[:-1] and tuple(targets.shape) != (rows,):
        raise check.ArgumentError(
            f"targets must have shape {tuple(hidden.shape[:-1])} or ({rows},), got {tuple(targets.shape)}"
        )
    if targets.dtype not in (torch.int64, torch.int32):
        raise check.ArgumentTypeError(f"targets must hold integer class ids (int64 or int32), got {targets.dtype}")
    ignore_index, reduction, label_smoothing, softcap, chunk_size = check_options(
        ignore_index, reduction, label_smoothing, softcap, chunk_size
    )
    flat_targets = targets.reshape(rows).long()
    if rows and not check._is_fake(targets):
        bad = (flat_targets != ignore_index) & ((flat_targets < 0) | (flat_targets >= vocab))
        if bool(bad.any()):
            value = int(flat_targets[bad][0])
            raise check.ArgumentError(
                f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}, found {value}"
            )
    inputs = dict(
        hidden=hidden.reshape(rows, d),
        weight=weight,
        targets=flat_targets,
        bias=bias,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        softcap=softcap,
        chunk_size=chunk_size,
    )
    impl = backends.select("linear_cross_entropy", backend, **inputs)
    if rows == 0 or vocab == 0:  # nothing to chunk: the reference gives torch's empty results (NaN mean)
        impl = backends.select("linear_cross_entropy", "reference", **inputs)
    with op_range("linear_cross_entropy", impl.backend):
        loss = impl.fn(**inputs)
    return loss.reshape(targets.shape) if reduction == "none" else loss
