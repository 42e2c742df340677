"""Row-wise ops (LayerNorm, RMSNorm, bias+GELU) as the kernels see them: every backend's custom ops take rows of
features ``(M, N)``; these wrappers flatten the public op's ``(..., *normalized_shape)`` tensors into rows and back,
and list the reasons shared by every kernel backend."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def norm(forward: Callable, input, normalized_shape, weight, bias, eps, residual, rms: bool):
    """Runs ``forward(x, residual, weight, bias, eps, rms) -> (out, sum, mean, rstd)`` on rows of ``input``."""
    n = math.prod(normalized_shape)
    x = input.reshape(-1, n)
    res = residual.reshape(-1, n) if residual is not None else None
    w = weight.reshape(n) if weight is not None else None
    b = bias.reshape(n) if bias is not None else None
    out, total, _mean, _rstd = forward(x, res, w, b, eps, rms)
    out = out.view(input.shape)
    return out if residual is None else (out, total.view(input.shape))


def layer_norm(forward: Callable) -> Callable:
    """The ``layer_norm`` implementation over a backend's norm forward op."""

    def run(input, normalized_shape, weight, bias, eps, residual):
        return norm(forward, input, normalized_shape, weight, bias, eps, residual, rms=False)

    return run


def rms_norm(forward: Callable) -> Callable:
    """The ``rms_norm`` implementation over a backend's norm forward op."""

    def run(input, normalized_shape, weight, eps, residual):
        return norm(forward, input, normalized_shape, weight, None, eps, residual, rms=True)

    return run


def bias_gelu(forward: Callable) -> Callable:
    """The ``bias_gelu`` implementation over a backend's ``forward(x, bias, tanh)`` op on rows."""

    def run(x, bias, approximate):
        return forward(x.reshape(-1, x.shape[-1]), bias, approximate == "tanh").view(x.shape)

    return run


def dtype_reasons(primary: str, input: torch.Tensor, **params: torch.Tensor | None) -> list[str]:
    """The kernels take parameters in the input's dtype; mixed dtypes (float32 weights of a bfloat16 input) run on
    the reference, which computes in float32."""
    return [
        f"{name} has dtype {p.dtype}, {primary} {input.dtype}: the kernels take one dtype (the reference mixes them)"
        for name, p in params.items()
        if p is not None and p.dtype != input.dtype
    ]


def layer_norm_reasons(input, normalized_shape, weight, bias, eps, residual) -> list[str]:
    return dtype_reasons("input", input, weight=weight, bias=bias)


def rms_norm_reasons(input, normalized_shape, weight, eps, residual) -> list[str]:
    return dtype_reasons("input", input, weight=weight)


def bias_gelu_reasons(x, bias, approximate) -> list[str]:
    return dtype_reasons("x", x, bias=bias)
