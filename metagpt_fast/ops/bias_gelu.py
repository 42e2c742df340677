"""Public fused bias-add + GELU op (the MLP activation of GPT-2), both GELU forms."""

from __future__ import annotations

import torch

from metagpt_fast import backends
from metagpt_fast.backends.registry import select_signed
from metagpt_fast.backends.signature import Memo, signature
from metagpt_fast.ops import validation as check
from metagpt_fast.ops.ranges import op_range
from metagpt_fast.ops.reference.bias_gelu import bias_gelu as reference_bias_gelu

OP = backends.declare_op(backends.OpSpec("bias_gelu", primary="x"), reference_bias_gelu)

APPROXIMATIONS = ("none", "tanh")
# Signatures of calls that passed the checks (they read no tensor values, so the same signature passes again).
_CHECKED = Memo()


def bias_gelu(
    x: torch.Tensor, bias: torch.Tensor | None, approximate: str = "none", *, backend: str | None = None
) -> torch.Tensor:
    """``gelu(x + bias)`` in one pass over memory, forward and backward (the backward recomputes ``x + bias``).

    Arguments:
        x: ``(..., N)``, float16 / bfloat16 / float32 / float64, any strides (the output of a linear layer run
            without its bias).
        bias: ``(N,)``, or None for a plain GELU. Any floating dtype; the kernels take ``x``'s own, other dtypes run
            on the reference.
        approximate: ``"none"`` (exact, ``z * Phi(z)`` with erf) or ``"tanh"`` (GPT-2's), as
            ``torch.nn.functional.gelu``.
        backend: see :func:`metagpt_fast.scaled_dot_product_attention`.

    Returns:
        ``gelu(x + bias)`` of ``x``'s shape and dtype, computed in float32 (float64 for float64 inputs).
    """
    key = signature(x, bias, approximate)
    if key is None or key not in _CHECKED:
        _check(x, bias, approximate)
        if key is not None:
            _CHECKED.put(key, True)
    inputs = dict(x=x, bias=bias, approximate=approximate)
    impl = select_signed("bias_gelu", backend, key, inputs)
    if x.numel() == 0:
        impl = backends.select("bias_gelu", "reference", **inputs)
    with op_range("bias_gelu", impl.backend):
        return impl.fn(**inputs)


def _check(x, bias, approximate) -> None:
    check.tensor("x", x, floating=True)
    check.plain_tensor("x", x)
    if x.dim() == 0:
        raise check.ArgumentError("x must have at least 1 dimension, got a scalar")
    if bias is not None:
        check.tensor("bias", bias, dims=(1,), floating=True)
        check.plain_tensor("bias", bias)
        if bias.shape[0] != x.shape[-1]:
            raise check.ArgumentError(f"bias must have x's last dim ({x.shape[-1]},), got {tuple(bias.shape)}")
        check.same_device(x=x, bias=bias)
    if not isinstance(approximate, str):
        raise check.ArgumentTypeError(f"approximate must be a str, got {type(approximate).__name__}")
    if approximate not in APPROXIMATIONS:
        raise check.ArgumentError(f"approximate must be one of {APPROXIMATIONS}, got {approximate!r}")
