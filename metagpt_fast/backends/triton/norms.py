"""Triton LayerNorm / RMSNorm: ``metagpt_fast::triton_norm_forward`` and ``triton_norm_backward`` (one pair for both
norms, ``rms`` flag), joined by the norm autograd formula."""

import math
from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from metagpt_fast.backends import autograd, rows
from metagpt_fast.backends import triton as triton_backend
from metagpt_fast.kernels.triton import norms as kernels


@triton_op("metagpt_fast::triton_norm_forward", mutates_args=())
def norm_forward(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    eps: float, rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(out, sum, mean, rstd)`` of rows ``x`` (M, N) (``sum`` empty without a residual, ``mean`` for RMSNorm)."""
    return kernels.norm_forward(x, residual, weight, bias, eps, rms, launch=wrap_triton)


@triton_op("metagpt_fast::triton_norm_backward", mutates_args=())
def norm_backward(
    grad_out: torch.Tensor, grad_sum: Optional[torch.Tensor], x: torch.Tensor, weight: Optional[torch.Tensor],
    mean: torch.Tensor, rstd: torch.Tensor, rms: bool, weight_grad: bool, bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dx, dweight, dbias)``; the parameter gradients are empty unless asked for."""
    return kernels.norm_backward(
        grad_out, grad_sum, x, weight, mean, rstd, rms, weight_grad, bias_grad, launch=wrap_triton
    )


autograd.norm("metagpt_fast::triton_norm_forward", norm_backward)


def _width_reasons(input, normalized_shape) -> list[str]:
    width = math.prod(normalized_shape)
    if width > kernels.MAX_FEATURES:
        return [f"normalized width up to {kernels.MAX_FEATURES} (one row per program), got {width}"]
    return triton_backend.bfloat16_reasons(input)


def layer_norm_reasons(input, normalized_shape, weight, bias, eps, residual) -> list[str]:
    return _width_reasons(input, normalized_shape) + rows.layer_norm_reasons(
        input, normalized_shape, weight, bias, eps, residual
    )


def rms_norm_reasons(input, normalized_shape, weight, eps, residual) -> list[str]:
    return _width_reasons(input, normalized_shape) + rows.rms_norm_reasons(
        input, normalized_shape, weight, eps, residual
    )


# Priority 30 on CUDA: the only GPU kernel of these ops (the reference is 0).
triton_backend.register(
    "layer_norm", rows.layer_norm(norm_forward), triton_backend.capabilities(), layer_norm_reasons, priority=30
)
triton_backend.register(
    "rms_norm", rows.rms_norm(norm_forward), triton_backend.capabilities(), rms_norm_reasons, priority=30
)
