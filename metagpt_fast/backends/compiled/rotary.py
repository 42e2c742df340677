"""Compiled rotary embedding: ``metagpt_fast::rotary`` (its backward is itself with ``conjugate`` flipped) and the
in-place ``metagpt_fast::rotary_``, on CPU (csrc/cpu/rotary_cpu.cpp) and CUDA (csrc/positional/rotary_kernels.cu)."""

from __future__ import annotations

import torch

from metagpt_fast.backends import autograd, compiled


@torch.library.register_fake("metagpt_fast::rotary")
def _(q, k, position_ids, offset, rotary_dim, base, interleaved, conjugate):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.register_fake("metagpt_fast::rotary_")
def _(q, k, position_ids, offset, rotary_dim, base, interleaved):
    return None


autograd.rotary("metagpt_fast::rotary", torch.ops.metagpt_fast.rotary)


def rotary(q, k, position_ids, offset, rotary_dim, base, interleaved, inplace):
    if inplace:
        torch.ops.metagpt_fast.rotary_(q, k, position_ids, offset, rotary_dim, base, interleaved)
        return q, k
    return torch.ops.metagpt_fast.rotary(q, k, position_ids, offset, rotary_dim, base, interleaved, False)


# CUDA at 25: below Triton's kernel (30), see backends/triton/positional.py.
compiled.register("rotary", rotary, cpu=(10, {}), cuda=(25, {}))
