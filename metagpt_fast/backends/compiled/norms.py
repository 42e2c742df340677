"""Compiled LayerNorm / RMSNorm: ``metagpt_fast::norm_forward`` and ``norm_backward`` on CPU
(csrc/cpu/norms_cpu.cpp), one pair of ops for both norms (``rms`` flag) with the optional residual add."""

from __future__ import annotations

import torch

from metagpt_fast.backends import autograd, compiled, rows


@torch.library.register_fake("metagpt_fast::norm_forward")
def _(x, residual, weight, bias, eps, rms):
    m, n = x.shape
    total = x.new_empty((m, n) if residual is not None else (0,))
    mean = x.new_empty((0,) if rms else (m,), dtype=torch.float32)
    return x.new_empty((m, n)), total, mean, x.new_empty((m,), dtype=torch.float32)


@torch.library.register_fake("metagpt_fast::norm_backward")
def _(grad_out, grad_sum, x, weight, mean, rstd, rms, weight_grad, bias_grad):
    n = x.shape[1]
    param = weight if weight is not None else x
    return (
        x.new_empty(x.shape),
        param.new_empty((n,) if weight_grad else (0,)),
        param.new_empty((n,) if bias_grad else (0,)),
    )


autograd.norm("metagpt_fast::norm_forward", torch.ops.metagpt_fast.norm_backward)

_forward = torch.ops.metagpt_fast.norm_forward
# Priority 10 on CPU: above the reference's several passes over memory (LayerNorm fwd+bwd measured against torch's
# own kernel in metagpt_fast/bench/norms.py).
compiled.register("layer_norm", rows.layer_norm(_forward), rows.layer_norm_reasons, cpu=(10, {}))
compiled.register("rms_norm", rows.rms_norm(_forward), rows.rms_norm_reasons, cpu=(10, {}))
