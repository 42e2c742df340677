"""Compiled positional ops: ``embed_positions_fwd/bwd`` and ``add_positional_encoding_fwd/bwd`` on CPU
(csrc/cpu/positional_cpu.cpp) and CUDA (csrc/positional/, 128-bit vectorised, deterministic embedding backward)."""

from __future__ import annotations

import torch

from metagpt_fast.backends import autograd, compiled


@torch.library.register_fake("metagpt_fast::embed_positions_fwd")
def _(tokens, weight, scale, offset, dropout_p, sinusoidal, seed):
    return weight.new_empty((tokens.shape[0], tokens.shape[1], weight.shape[1]))


@torch.library.register_fake("metagpt_fast::embed_positions_bwd")
def _(grad_out, tokens, num_embeddings, scale, dropout_p, seed):
    return grad_out.new_empty((num_embeddings, grad_out.shape[-1]))


@torch.library.register_fake("metagpt_fast::add_positional_encoding_fwd")
def _(x, offset, dropout_p, seed):
    return x.new_empty(x.shape)


@torch.library.register_fake("metagpt_fast::add_positional_encoding_bwd")
def _(grad_out, dropout_p, seed):
    return grad_out.new_empty(grad_out.shape)


def _embed_weight_grad(grad_out, tokens, num_embeddings, weight_dtype, scale, dropout_p, seed):
    # The kernels sum in float32 in token order and return the gradient in grad_out's (the weight's) dtype.
    return torch.ops.metagpt_fast.embed_positions_bwd(grad_out, tokens, num_embeddings, scale, dropout_p, seed)


autograd.embed_positions("metagpt_fast::embed_positions_fwd", _embed_weight_grad)
autograd.add_positional_encoding(
    "metagpt_fast::add_positional_encoding_fwd", torch.ops.metagpt_fast.add_positional_encoding_bwd
)


# The ops' arguments are the registry's contract: registered as they are.
embed_positions = torch.ops.metagpt_fast.embed_positions_fwd
add_positional_encoding = torch.ops.metagpt_fast.add_positional_encoding_fwd


# Without dropout the op is one add, memory-bound either way, and the kernel's only edge (computing the table in
# registers) fades once the reference's table is a small part of the traffic. Interleaved, 1 thread, x (8, T, 128)
# float32, kernel speed-up over the reference (median of 31 rounds): without dropout, forward+backward 1.11x at
# T=512, 0.47x at 1024, 0.70x at 2048, 1.00x at 4096; forward 1.29x, 1.22x, 0.94x, 1.01x. With dropout 0.1 the
# kernel wins everywhere (forward 2.1x-4.0x, forward+backward 1.3x-1.5x): it fuses the mask that the reference
# draws and applies in separate passes.
ADD_PE_CPU_MAX_T = 1024


def add_positional_encoding_cpu_priority(inputs) -> int:
    if inputs["dropout_p"] == 0.0 and inputs["x"].shape[1] >= ADD_PE_CPU_MAX_T:
        return -10  # below the reference (0): auto takes the reference
    return 10


_DROPOUT = dict(features=frozenset({"dropout"}))
# CUDA at 25: below Triton's one-pass kernels (30), see backends/triton/positional.py.
compiled.register("embed_positions", embed_positions, cpu=(10, _DROPOUT), cuda=(25, _DROPOUT))
compiled.register(
    "add_positional_encoding", add_positional_encoding,
    cpu=(add_positional_encoding_cpu_priority, _DROPOUT), cuda=(25, _DROPOUT),
)  # fmt: skip
