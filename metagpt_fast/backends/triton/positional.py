"""Triton backend of the positional ops: ``embed_positions``, ``add_positional_encoding`` and ``rotary``.

Each op is a ``torch.library.triton_op`` whose kernels launch through ``wrap_triton`` (so ``torch.compile`` traces
them without graph breaks), with its backward joined by ``register_autograd``:

- ``metagpt_fast::triton_embed_positions``: gradient to the weight only, through
  ``metagpt_fast::triton_embed_positions_backward`` — sort-and-segment (no float atomics, bitwise repeatable) when
  ``torch.are_deterministic_algorithms_enabled()``, float32 atomic scatter-add otherwise;
- ``metagpt_fast::triton_add_positional_encoding``: the gradient is the output gradient with the dropout mask
  replayed (``metagpt_fast::triton_positional_dropout``), or passes through unchanged without dropout;
- ``metagpt_fast::triton_rotary``: the backward is the same op with ``conjugate`` flipped (rotation by -theta);
  ``metagpt_fast::triton_rotary_`` rotates q and k in place (inference).
"""

import os
from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from metagpt_fast import backends
from metagpt_fast.kernels.triton import positional as pe_kernels
from metagpt_fast.kernels.triton import rotary as rotary_kernels

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_GRID_YZ = 65535  # CUDA's limit on the 2nd and 3rd grid dimensions (rotary's batch)
# Largest position whose float32 angle the kernels reduce exactly (k * pi/2 with k < 2**21 / (pi/2) exact in float32);
# beyond it the rounding of the angle itself (~pos * 2**-22 rad) makes any float32 encoding meaningless anyway.
MAX_POSITION = 2**21


# ----------------------------------------------------------------------------------------------------------------
# embed_positions
# ----------------------------------------------------------------------------------------------------------------


@triton_op("metagpt_fast::triton_embed_positions", mutates_args=())
def embed_positions_forward(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    scale: float,
    offset: int,
    dropout_p: float,
    sinusoidal: bool,
    seed: Optional[torch.Tensor],
) -> torch.Tensor:
    """``dropout(weight[tokens] * scale + PE[offset:offset+T])``, (B, T, d) of weight's dtype."""
    return pe_kernels.embed_positions_forward(
        tokens, weight, scale, offset, dropout_p, sinusoidal, seed, launch=wrap_triton
    )


@triton_op("metagpt_fast::triton_embed_positions_backward", mutates_args=())
def embed_positions_backward(
    grad: torch.Tensor,
    tokens: torch.Tensor,
    vocab_size: int,
    weight_dtype: torch.dtype,
    scale: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    deterministic: bool,
) -> torch.Tensor:
    """Gradient of the (vocab_size, d) embedding weight from the output gradient ``grad`` (B, T, d)."""
    return pe_kernels.embed_positions_backward(
        grad, tokens, vocab_size, weight_dtype, scale, dropout_p, seed, deterministic, launch=wrap_triton
    )


def _embed_setup_context(ctx, inputs, output):
    tokens, weight, scale, _, dropout_p, _, seed = inputs
    ctx.save_for_backward(tokens, seed)
    ctx.vocab_size, ctx.weight_dtype, ctx.scale, ctx.dropout_p = weight.shape[0], weight.dtype, scale, dropout_p


def _embed_backward(ctx, grad):
    tokens, seed = ctx.saved_tensors
    grad_weight = None
    if ctx.needs_input_grad[1]:
        grad_weight = embed_positions_backward(
            grad, tokens, ctx.vocab_size, ctx.weight_dtype, ctx.scale, ctx.dropout_p, seed,
            torch.are_deterministic_algorithms_enabled(),
        )  # fmt: skip
    return None, grad_weight, None, None, None, None, None


torch.library.register_autograd(
    "metagpt_fast::triton_embed_positions", _embed_backward, setup_context=_embed_setup_context
)


# ----------------------------------------------------------------------------------------------------------------
# add_positional_encoding
# ----------------------------------------------------------------------------------------------------------------


@triton_op("metagpt_fast::triton_add_positional_encoding", mutates_args=())
def add_positional_encoding_forward(
    x: torch.Tensor, offset: int, dropout_p: float, seed: Optional[torch.Tensor]
) -> torch.Tensor:
    """``dropout(x + PE[offset:offset+T])`` for x (B, T, d), contiguous output of x's dtype."""
    return pe_kernels.add_positional_encoding_forward(x, offset, dropout_p, seed, launch=wrap_triton)


@triton_op("metagpt_fast::triton_positional_dropout", mutates_args=())
def positional_dropout(x: torch.Tensor, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """``x * keep / (1 - p)`` with the positional ops' mask for ``seed``: the backward of the dropout they apply."""
    return pe_kernels.add_positional_encoding_forward(x, 0, dropout_p, seed, sinusoidal=False, launch=wrap_triton)


def _add_setup_context(ctx, inputs, output):
    _, _, dropout_p, seed = inputs
    ctx.save_for_backward(seed)
    ctx.dropout_p = dropout_p


def _add_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    grad_x = positional_dropout(grad, ctx.dropout_p, seed) if ctx.dropout_p > 0.0 else grad
    return grad_x, None, None, None


torch.library.register_autograd(
    "metagpt_fast::triton_add_positional_encoding", _add_backward, setup_context=_add_setup_context
)


# ----------------------------------------------------------------------------------------------------------------
# rotary
# ----------------------------------------------------------------------------------------------------------------


@triton_op("metagpt_fast::triton_rotary", mutates_args=())
def rotary_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: Optional[torch.Tensor],
    offset: int,
    rotary_dim: int,
    base: float,
    interleaved: bool,
    conjugate: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated copies of q (B, Hq, T, D) and k (B, Hk, T, D), contiguous; ``conjugate`` rotates by -theta."""
    return rotary_kernels.rotary_forward(
        q, k, position_ids, offset, rotary_dim, base, interleaved, conjugate, launch=wrap_triton
    )


@triton_op("metagpt_fast::triton_rotary_", mutates_args=("q", "k"))
def rotary_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: Optional[torch.Tensor],
    offset: int,
    rotary_dim: int,
    base: float,
    interleaved: bool,
) -> None:
    """Rotates q and k in place (features past ``rotary_dim`` are not touched)."""
    rotary_kernels.rotary_launch(
        q, k, q, k, position_ids, offset, rotary_dim, base, interleaved, False, True, launch=wrap_triton
    )


def _rotary_setup_context(ctx, inputs, output):
    _, _, position_ids, offset, rotary_dim, base, interleaved, conjugate = inputs
    ctx.save_for_backward(position_ids)
    ctx.args = (offset, rotary_dim, base, interleaved, not conjugate)


def _rotary_backward(ctx, grad_q, grad_k):
    (position_ids,) = ctx.saved_tensors
    grad_q, grad_k = rotary_forward(grad_q, grad_k, position_ids, *ctx.args)
    return grad_q, grad_k, None, None, None, None, None, None


torch.library.register_autograd("metagpt_fast::triton_rotary", _rotary_backward, setup_context=_rotary_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Implementations registered with the backend registry (the contracts of ops/positional.py and ops/rotary.py)
# ----------------------------------------------------------------------------------------------------------------


def embed_positions(tokens, weight, scale, offset, dropout_p, sinusoidal, seed):
    return embed_positions_forward(tokens, weight, scale, offset, dropout_p, sinusoidal, seed)


def add_positional_encoding(x, offset, dropout_p, seed):
    return add_positional_encoding_forward(x, offset, dropout_p, seed)


def rotary(q, k, position_ids, offset, rotary_dim, base, interleaved, inplace):
    if inplace:
        rotary_inplace(q, k, position_ids, offset, rotary_dim, base, interleaved)
        return q, k
    return rotary_forward(q, k, position_ids, offset, rotary_dim, base, interleaved, False)


def _device_dtype_reasons(t: torch.Tensor) -> list[str]:
    reasons = []
    device = t.device.type
    if _INTERPRETED:
        if device != "cpu":
            reasons.append(f"TRITON_INTERPRET=1 runs Triton on CPU tensors only, got {device}")
    elif device != "cuda":
        reasons.append(f"needs CUDA tensors, got {device}")
    elif t.dtype == torch.bfloat16 and torch.cuda.get_device_capability(t.device) < (8, 0):
        reasons.append(f"bfloat16 needs compute capability >= 8.0, got {torch.cuda.get_device_capability(t.device)}")
    if t.dtype not in _DTYPES:
        reasons.append(f"supports float16, bfloat16 and float32 (computing in float32), got {t.dtype}")
    return reasons


def _position_reasons(last_position: int) -> list[str]:
    if last_position >= MAX_POSITION:
        return [f"positions up to {MAX_POSITION - 1} (float32 angles), got {last_position}"]
    return []


def embed_positions_reasons(tokens, weight, scale, offset, dropout_p, sinusoidal) -> list[str]:
    reasons = _device_dtype_reasons(weight)
    if sinusoidal:
        reasons += _position_reasons(offset + tokens.shape[1] - 1)
    return reasons


def add_positional_encoding_reasons(x, offset, dropout_p) -> list[str]:
    return _device_dtype_reasons(x) + _position_reasons(offset + x.shape[1] - 1)


def rotary_reasons(q, k, position_ids, offset, rotary_dim, base, interleaved, inplace) -> list[str]:
    # Explicit position ids are not range-checked here: that would read them back from the device on every call.
    reasons = _device_dtype_reasons(q)
    if position_ids is None:
        reasons += _position_reasons(offset + q.shape[2] - 1)
    if q.shape[0] > _MAX_GRID_YZ:
        reasons.append(f"batch up to {_MAX_GRID_YZ} (CUDA grid limit), got {q.shape[0]}")
    if inplace and q is k:
        reasons.append("inplace=True with q and k the same tensor would rotate it twice")
    if inplace and max((t.shape[-1] - 1) * t.stride(-1) for t in (q, k)) >= 2**31:
        reasons.append("inplace=True needs (head_dim - 1) * feature stride < 2**31 (32-bit column offsets)")
    return reasons


backends.register(
    "embed_positions", "triton", embed_positions, embed_positions_reasons, priority=20, slow=_INTERPRETED
)
backends.register(
    "add_positional_encoding", "triton", add_positional_encoding, add_positional_encoding_reasons, priority=20,
    slow=_INTERPRETED,
)  # fmt: skip
backends.register("rotary", "triton", rotary, rotary_reasons, priority=20, slow=_INTERPRETED)
