"""Compiled linear + cross-entropy: ``metagpt_fast::linear_cross_entropy`` on CPU
(csrc/cpu/linear_cross_entropy_cpu.cpp), chunked over rows with the gradients computed in the forward
(``backends/autograd.py``'s formula)."""

from __future__ import annotations

import torch

from metagpt_fast.backends import autograd, compiled

# Logits per chunk: 2**25 elements (128 MiB in float32), 512 rows at V = 50257. Measured on 2 cores at N = 4096,
# d = 768 (bench/linear_cross_entropy.py): 256-1024 rows run at the same speed within noise; fewer rows re-read the
# (V, d) weight gradient more often, more rows raise the peak memory without making the products faster.
CHUNK_ELEMENTS = 2**25


def default_chunk_size(rows: int, vocab: int) -> int:
    """Rows per chunk: a power of two with at most ``CHUNK_ELEMENTS`` logits, and no more than the rows there are."""
    chunk = 1
    while chunk * 2 * vocab <= CHUNK_ELEMENTS and chunk < rows:
        chunk *= 2
    return chunk


@torch.library.register_fake("metagpt_fast::linear_cross_entropy")
def _(hidden, weight, targets, bias, grad_rows, ignore_index, reduction, label_smoothing, softcap, chunk_size,
      grad_hidden, grad_weight, grad_bias):  # fmt: skip
    f32 = hidden.new_empty((), dtype=torch.float32)
    loss = hidden.new_empty((hidden.shape[0],), dtype=torch.float32) if reduction == 0 else f32
    return (
        loss,
        hidden.new_empty(hidden.shape if grad_hidden else (0,)),
        weight.new_empty(weight.shape if grad_weight else (0,)),
        hidden.new_empty((weight.shape[0],) if grad_bias else (0,)),
    )


_call = autograd.linear_cross_entropy("metagpt_fast::linear_cross_entropy", torch.ops.metagpt_fast.linear_cross_entropy)


def linear_cross_entropy(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, softcap, chunk_size):
    chunk = default_chunk_size(hidden.shape[0], weight.shape[0]) if chunk_size is None else chunk_size
    return _call(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, softcap, chunk)


compiled.register("linear_cross_entropy", linear_cross_entropy, cpu=(10, {}))
