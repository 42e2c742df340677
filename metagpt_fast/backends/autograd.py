"""One autograd formula per op, shared by every backend whose forward is a custom op.

Each backend hands in its forward custom op and the backward pieces it has (its own kernels); the formula (what is
saved, which inputs get a gradient, how dropout is replayed from the saved seed) is written once here:

- attention: ``forward(q, k, v, attn_mask, dropout_p, is_causal, scale, seed) -> (out, lse)``; the backward kernel
  takes the saved ``out`` and ``lse``. ``lse`` is an auxiliary output and never differentiable; ``attn_mask`` is a
  constant (implementations refuse masks that need a gradient).
- embed_positions: ``forward(tokens, weight, scale, offset, dropout_p, sinusoidal, seed) -> out``; gradient to the
  weight only.
- add_positional_encoding: ``forward(x, offset, dropout_p, seed) -> out``; the gradient is the output gradient with
  the same dropout mask (nothing stored but the seed).
- rotary: ``forward(q, k, position_ids, offset, rotary_dim, base, interleaved, conjugate) -> (q_out, k_out)``; the
  rotation is orthogonal, so its backward is the same op with ``conjugate`` flipped.
- flash_attention: ``forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
  window_left, window_right, softcap, alibi_slopes, dropout_p, seed) -> (out, lse)`` over packed varlen tensors;
  gradients to q, k and v only (alibi_slopes and cu_seqlens are constants); ``lse`` is never differentiable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def attention(forward: str, backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """``backward(grad_out, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, seed) -> (dq, dk, dv)``."""

    def setup_context(ctx, inputs, output):
        q, k, v, attn_mask, dropout_p, is_causal, scale, seed = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, seed)
        ctx.dropout_p, ctx.is_causal, ctx.scale = dropout_p, is_causal, scale
        ctx.mark_non_differentiable(lse)

    def grad(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, attn_mask, seed = ctx.saved_tensors
        dq, dk, dv = backward(grad_out, q, k, v, out, lse, attn_mask, ctx.dropout_p, ctx.is_causal, ctx.scale, seed)
        return dq, dk, dv, None, None, None, None, None

    torch.library.register_autograd(forward, grad, setup_context=setup_context)


def embed_positions(forward: str, backward: Callable[..., torch.Tensor]) -> None:
    """``backward(grad_out, tokens, num_embeddings, weight_dtype, scale, dropout_p, seed) -> grad_weight``."""

    def setup_context(ctx, inputs, output):
        tokens, weight, scale, _offset, dropout_p, _sinusoidal, seed = inputs
        ctx.save_for_backward(tokens, seed)
        ctx.num_embeddings, ctx.weight_dtype, ctx.scale, ctx.dropout_p = weight.shape[0], weight.dtype, scale, dropout_p

    def grad(ctx, grad_out):
        tokens, seed = ctx.saved_tensors
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = backward(
                grad_out, tokens, ctx.num_embeddings, ctx.weight_dtype, ctx.scale, ctx.dropout_p, seed
            )
        return None, grad_weight, None, None, None, None, None

    torch.library.register_autograd(forward, grad, setup_context=setup_context)


def add_positional_encoding(forward: str, dropout: Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor]) -> None:
    """``dropout(grad_out, dropout_p, seed)``: ``grad_out * keep / (1 - p)`` with the forward's mask."""

    def setup_context(ctx, inputs, output):
        _x, _offset, dropout_p, seed = inputs
        ctx.save_for_backward(seed)
        ctx.dropout_p = dropout_p

    def grad(ctx, grad_out):
        (seed,) = ctx.saved_tensors
        grad_x = dropout(grad_out, ctx.dropout_p, seed) if ctx.dropout_p > 0.0 else grad_out
        return grad_x, None, None, None

    torch.library.register_autograd(forward, grad, setup_context=setup_context)


def rotary(forward: str, rotate: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``rotate`` is the forward op itself: the backward rotates the gradients by the opposite angle."""

    def setup_context(ctx, inputs, output):
        _q, _k, position_ids, offset, rotary_dim, base, interleaved, conjugate = inputs
        ctx.save_for_backward(position_ids)
        ctx.args = (offset, rotary_dim, base, interleaved, not conjugate)

    def grad(ctx, grad_q, grad_k):
        (position_ids,) = ctx.saved_tensors
        grad_q, grad_k = rotate(grad_q, grad_k, position_ids, *ctx.args)
        return grad_q, grad_k, None, None, None, None, None, None

    torch.library.register_autograd(forward, grad, setup_context=setup_context)


def flash_attention(forward: str, backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """``backward(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
    causal, window_left, window_right, softcap, alibi_slopes, dropout_p, seed) -> (dq, dk, dv)``."""

    def setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, left, right, softcap, alibi, dropout_p, seed = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi, seed)
        ctx.args = (max_q, max_k, scale, causal, left, right, softcap)
        ctx.dropout_p = dropout_p
        ctx.mark_non_differentiable(lse)

    def grad(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, cu_q, cu_k, alibi, seed = ctx.saved_tensors
        max_q, max_k, scale, causal, left, right, softcap = ctx.args
        dq, dk, dv = backward(
            grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, left, right, softcap, alibi,
            ctx.dropout_p, seed,
        )  # fmt: skip
        return (dq, dk, dv) + (None,) * 12

    torch.library.register_autograd(forward, grad, setup_context=setup_context)
