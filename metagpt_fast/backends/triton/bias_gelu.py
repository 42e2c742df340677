"""Triton bias + GELU: ``metagpt_fast::triton_bias_gelu`` and ``triton_bias_gelu_backward``, joined by the bias_gelu
autograd formula."""

from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from metagpt_fast.backends import autograd, rows
from metagpt_fast.backends import triton as triton_backend
from metagpt_fast.kernels.triton import bias_gelu as kernels


@triton_op("metagpt_fast::triton_bias_gelu", mutates_args=())
def bias_gelu_forward(x: torch.Tensor, bias: Optional[torch.Tensor], tanh: bool) -> torch.Tensor:
    """``gelu(x + bias)`` of rows ``x`` (M, N)."""
    return kernels.bias_gelu_forward(x, bias, tanh, launch=wrap_triton)


@triton_op("metagpt_fast::triton_bias_gelu_backward", mutates_args=())
def bias_gelu_backward(
    grad_out: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], tanh: bool, bias_grad: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dbias)``; ``dbias`` is empty unless ``bias_grad``."""
    return kernels.bias_gelu_backward(grad_out, x, bias, tanh, bias_grad, launch=wrap_triton)


autograd.bias_gelu("metagpt_fast::triton_bias_gelu", bias_gelu_backward)


def bias_gelu_reasons(x, bias, approximate) -> list[str]:
    return triton_backend.bfloat16_reasons(x) + rows.bias_gelu_reasons(x, bias, approximate)


# Priority 30 on CUDA: the only GPU kernel of this op (the reference is 0).
triton_backend.register(
    "bias_gelu", rows.bias_gelu(bias_gelu_forward), triton_backend.capabilities(), bias_gelu_reasons, priority=30
)
