"""Compiled bias + GELU: ``metagpt_fast::bias_gelu`` and ``bias_gelu_backward`` on CPU (csrc/cpu/bias_gelu_cpu.cpp)."""

from __future__ import annotations

import torch

from metagpt_fast.backends import autograd, compiled, rows


@torch.library.register_fake("metagpt_fast::bias_gelu")
def _(x, bias, tanh):
    return x.new_empty(x.shape)


@torch.library.register_fake("metagpt_fast::bias_gelu_backward")
def _(grad_out, x, bias, tanh, bias_grad):
    return x.new_empty(x.shape), x.new_empty((x.shape[1],) if bias_grad else (0,))


autograd.bias_gelu("metagpt_fast::bias_gelu", torch.ops.metagpt_fast.bias_gelu_backward)

compiled.register("bias_gelu", rows.bias_gelu(torch.ops.metagpt_fast.bias_gelu), rows.bias_gelu_reasons, cpu=(10, {}))
