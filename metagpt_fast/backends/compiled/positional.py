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


def embed_positions(tokens, weight, scale, offset, dropout_p, sinusoidal, seed):
    return torch.ops.metagpt_fast.embed_positions_fwd(tokens, weight, scale, offset, dropout_p, sinusoidal, seed)


def add_positional_encoding(x, offset, dropout_p, seed):
    return torch.ops.metagpt_fast.add_positional_encoding_fwd(x, offset, dropout_p, seed)


# Sequence length from which the cpu add_positional_encoding loses to the reference in forward+backward: the
# reference's backward is free (autograd passes the gradient through an add) while the kernel's replays dropout
# in its own pass (metagpt-fast bench, 1 thread: 0.84x at T=4096).
ADD_PE_CPU_MAX_T = 1024


def add_positional_encoding_cpu_priority(inputs) -> int:
    x = inputs["x"]
    if x.shape[1] >= ADD_PE_CPU_MAX_T and x.requires_grad and torch.is_grad_enabled():
        return -10  # below the reference (0): auto takes the reference
    return 10


_DROPOUT = dict(features=frozenset({"dropout"}))
# CUDA at 25: below Triton's one-pass kernels (30), see backends/triton/positional.py.
compiled.register("embed_positions", embed_positions, cpu=(10, _DROPOUT), cuda=(25, _DROPOUT))
compiled.register(
    "add_positional_encoding", add_positional_encoding,
    cpu=(add_positional_encoding_cpu_priority, _DROPOUT), cuda=(25, _DROPOUT),
)  # fmt: skip
