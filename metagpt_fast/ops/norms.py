"""Public LayerNorm and RMSNorm ops, with torch's functional signatures and a fused residual add."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metagpt_fast import backends
from metagpt_fast.backends.registry import select_signed
from metagpt_fast.backends.signature import Memo, signature
from metagpt_fast.ops import validation as check
from metagpt_fast.ops.ranges import op_range
from metagpt_fast.ops.reference import norms as reference_norms

LAYER_NORM = backends.declare_op(backends.OpSpec("layer_norm", primary="input"), reference_norms.layer_norm)
RMS_NORM = backends.declare_op(backends.OpSpec("rms_norm", primary="input"), reference_norms.rms_norm)

# Every check of these ops reads only the signature of the call (no tensor values): a signature that passed once
# passes again. signature -> the normalized shape and eps it checked (what the op hands to its implementation).
_CHECKED = {"layer_norm": Memo(), "rms_norm": Memo()}


def _normalized_shape(normalized_shape, input: torch.Tensor) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    if not isinstance(shape, Sequence | torch.Size) or isinstance(shape, str):
        raise check.ArgumentTypeError(
            f"normalized_shape must be an int or a sequence of ints, got {type(normalized_shape).__name__}"
        )
    shape = tuple(check.integer("normalized_shape", s, minimum=1) for s in shape)
    if not shape or len(shape) > input.dim() or tuple(input.shape[input.dim() - len(shape) :]) != shape:
        raise check.ArgumentError(
            f"normalized_shape {shape} must be non-empty and match input's trailing dims, input has shape "
            f"{tuple(input.shape)}"
        )
    return shape


def _parameter(name: str, value: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if value is None:
        return
    check.tensor(name, value, floating=True)
    check.plain_tensor(name, value)
    if tuple(value.shape) != shape:
        raise check.ArgumentError(f"{name} must have normalized_shape {shape}, got {tuple(value.shape)}")


def _validate(input, normalized_shape, weight, bias, residual) -> tuple[int, ...]:
    check.tensor("input", input, floating=True)
    check.plain_tensor("input", input)
    shape = _normalized_shape(normalized_shape, input)
    _parameter("weight", weight, shape)
    _parameter("bias", bias, shape)
    if residual is not None:
        check.tensor("residual", residual, floating=True)
        check.plain_tensor("residual", residual)
        check.same_dtype(input=input, residual=residual)
        if residual.shape != input.shape:
            raise check.ArgumentError(
                f"residual must have input's shape {tuple(input.shape)}, got {tuple(residual.shape)}"
            )
    check.same_device(input=input, weight=weight, bias=bias, residual=residual)
    return shape


def _eps(eps) -> float:
    eps = check.finite_float("eps", eps)
    if eps < 0:
        raise check.ArgumentError(f"eps must be >= 0, got {eps}")
    return eps


def _run(op: str, backend: str | None, key: tuple | None, inputs: dict):
    impl = select_signed(op, backend, key, inputs)
    if inputs["input"].numel() == 0:  # nothing to normalise: no kernel launch
        impl = backends.select(op, "reference", **inputs)
    with op_range(op, impl.backend):
        return impl.fn(**inputs)


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Layer normalisation over the trailing ``normalized_shape`` dims, as ``torch.nn.functional.layer_norm``.

    Arguments:
        input: ``(..., *normalized_shape)``, float16 / bfloat16 / float32 / float64, any strides.
        normalized_shape: an int or a sequence of ints, ``input``'s trailing dims.
        weight, bias: optional ``normalized_shape`` tensors (any floating dtype; the kernels take ``input``'s own,
            other dtypes run on the reference).
        eps: added to the variance (biased, as torch's), ``>= 0``.
        residual: optional tensor of ``input``'s shape and dtype: the op normalises ``x = input + residual`` and
            returns ``(normed, x)``, the sum a pre-LN block's next residual add needs, in one pass over memory.
        backend: see :func:`metagpt_fast.scaled_dot_product_attention`.

    Returns:
        ``normed`` of ``input``'s shape and dtype, or ``(normed, input + residual)`` with ``residual``.

    Statistics are computed in float32 (float64 for float64 inputs). Autocast does not apply (the op computes in
    ``input``'s dtype); :class:`metagpt_fast.nn.LayerNorm` follows torch's autocast rule (float32).
    """
    key = signature(input, normalized_shape, weight, bias, eps, residual)
    checked = _CHECKED["layer_norm"].get(key) if key is not None else None
    if checked is None:
        shape = _validate(input, normalized_shape, weight, bias, residual)
        checked = (shape, _eps(eps))
        if key is not None:
            _CHECKED["layer_norm"].put(key, checked)
    shape, eps = checked
    inputs = dict(input=input, normalized_shape=shape, weight=weight, bias=bias, eps=eps, residual=residual)
    return _run("layer_norm", backend, key, inputs)


def rms_norm(
    input: torch.Tensor,
    normalized_shape: int | Sequence[int],
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    *,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Root-mean-square normalisation over the trailing ``normalized_shape`` dims, as
    ``torch.nn.functional.rms_norm``: ``x / sqrt(mean(x^2) + eps) * weight``.

    Arguments are those of :func:`layer_norm` without ``bias``; ``eps`` None is ``torch.finfo(input.dtype).eps``
    (torch's default).

    Returns:
        ``normed``, or ``(normed, input + residual)`` with ``residual``.
    """
    key = signature(input, normalized_shape, weight, eps, residual)
    checked = _CHECKED["rms_norm"].get(key) if key is not None else None
    if checked is None:
        shape = _validate(input, normalized_shape, weight, None, residual)
        checked = (shape, _eps(torch.finfo(input.dtype).eps if eps is None else eps))
        if key is not None:
            _CHECKED["rms_norm"].put(key, checked)
    shape, eps = checked
    inputs = dict(input=input, normalized_shape=shape, weight=weight, eps=eps, residual=residual)
    return _run("rms_norm", backend, key, inputs)
