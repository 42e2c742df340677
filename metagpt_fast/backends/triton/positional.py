"""Triton positional ops: ``embed_positions`` and ``add_positional_encoding`` as ``torch.library.triton_op``s.

- ``metagpt_fast::triton_embed_positions``: gradient to the weight only, through
  ``metagpt_fast::triton_embed_positions_backward``: sort-and-segment (no float atomics, bitwise repeatable) when
  ``torch.are_deterministic_algorithms_enabled()``, float32 atomic scatter-add otherwise;
- ``metagpt_fast::triton_add_positional_encoding``: the gradient is the output gradient with the dropout mask replayed
  (``metagpt_fast::triton_positional_dropout``).
"""

from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from metagpt_fast.backends import autograd
from metagpt_fast.backends import triton as triton_backend
from metagpt_fast.kernels.triton import positional as kernels

# Largest position whose float32 angle the kernels reduce exactly (k * pi/2 with k < 2**21 / (pi/2) exact in float32);
# beyond it the rounding of the angle itself (~pos * 2**-22 rad) makes any float32 encoding meaningless anyway.
MAX_POSITION = 2**21


def position_reasons(last_position: int) -> list[str]:
    if last_position >= MAX_POSITION:
        return [f"positions up to {MAX_POSITION - 1} (float32 angles), got {last_position}"]
    return []


# ------------------------------------------------------------------------------------------------ embed_positions


@triton_op("metagpt_fast::triton_embed_positions", mutates_args=())
def embed_positions_forward(
    tokens: torch.Tensor, weight: torch.Tensor, scale: float, offset: int, dropout_p: float, sinusoidal: bool,
    seed: Optional[torch.Tensor],
) -> torch.Tensor:  # fmt: skip
    """``dropout(weight[tokens] * scale + PE[offset:offset+T])``, (B, T, d) of weight's dtype."""
    return kernels.embed_positions_forward(
        tokens, weight, scale, offset, dropout_p, sinusoidal, seed, launch=wrap_triton
    )


@triton_op("metagpt_fast::triton_embed_positions_backward", mutates_args=())
def embed_positions_backward(
    grad: torch.Tensor, tokens: torch.Tensor, vocab_size: int, weight_dtype: torch.dtype, scale: float,
    dropout_p: float, seed: Optional[torch.Tensor], deterministic: bool,
) -> torch.Tensor:  # fmt: skip
    """Gradient of the (vocab_size, d) embedding weight from the output gradient ``grad`` (B, T, d)."""
    return kernels.embed_positions_backward(
        grad, tokens, vocab_size, weight_dtype, scale, dropout_p, seed, deterministic, launch=wrap_triton
    )


def _embed_weight_grad(grad, tokens, num_embeddings, weight_dtype, scale, dropout_p, seed):
    deterministic = torch.are_deterministic_algorithms_enabled()
    return embed_positions_backward(grad, tokens, num_embeddings, weight_dtype, scale, dropout_p, seed, deterministic)


autograd.embed_positions("metagpt_fast::triton_embed_positions", _embed_weight_grad)


embed_positions = embed_positions_forward  # the op's arguments are the registry's contract: registered as it is


def embed_positions_reasons(tokens, weight, scale, offset, dropout_p, sinusoidal) -> list[str]:
    reasons = triton_backend.bfloat16_reasons(weight)
    return reasons + position_reasons(offset + tokens.shape[1] - 1) if sinusoidal else reasons


# ---------------------------------------------------------------------------------------- add_positional_encoding


@triton_op("metagpt_fast::triton_add_positional_encoding", mutates_args=())
def add_positional_encoding_forward(
    x: torch.Tensor, offset: int, dropout_p: float, seed: Optional[torch.Tensor]
) -> torch.Tensor:
    """``dropout(x + PE[offset:offset+T])`` for x (B, T, d), contiguous output of x's dtype."""
    return kernels.add_positional_encoding_forward(x, offset, dropout_p, seed, launch=wrap_triton)


@triton_op("metagpt_fast::triton_positional_dropout", mutates_args=())
def positional_dropout(x: torch.Tensor, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """``x * keep / (1 - p)`` with the positional ops' mask for ``seed``: the backward of the dropout they apply."""
    return kernels.add_positional_encoding_forward(x, 0, dropout_p, seed, sinusoidal=False, launch=wrap_triton)


autograd.add_positional_encoding("metagpt_fast::triton_add_positional_encoding", positional_dropout)


add_positional_encoding = add_positional_encoding_forward


def add_positional_encoding_reasons(x, offset, dropout_p) -> list[str]:
    return triton_backend.bfloat16_reasons(x) + position_reasons(offset + x.shape[1] - 1)


# Priority 30 on CUDA: the one-pass Triton kernels above the compiled CUDA ones (25), which read the same bytes but
# vectorise only 128-bit-aligned rows; neither has a GPU measurement yet, the order only breaks the tie.
triton_backend.register(
    "embed_positions", embed_positions, triton_backend.capabilities(features=frozenset({"dropout"})),
    embed_positions_reasons, priority=30,
)  # fmt: skip
triton_backend.register(
    "add_positional_encoding", add_positional_encoding, triton_backend.capabilities(features=frozenset({"dropout"})),
    add_positional_encoding_reasons, priority=30,
)  # fmt: skip
