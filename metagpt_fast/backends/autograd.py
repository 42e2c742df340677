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
- linear_cross_entropy: ``forward(hidden, weight, targets, bias, grad_rows, ..., grad_hidden, grad_weight,
  grad_bias) -> (loss, dhidden, dweight, dbias)``; a reduced loss's gradients come from the forward (scaled by the
  loss's gradient), reduction none's from a second call with the rows' gradients.
- norm (layer_norm, rms_norm): ``forward(x, residual, weight, bias, eps, rms) -> (out, sum, mean, rstd)`` over rows;
  the backward kernel takes the saved float32 row statistics, and ``input`` and ``residual`` share one gradient.
- bias_gelu: ``forward(x, bias, tanh) -> out``; the backward recomputes ``x + bias`` (nothing saved but the inputs).
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


def norm(forward: str, backward: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """LayerNorm / RMSNorm over the rows of ``x`` (M, N): ``forward(x, residual, weight, bias, eps, rms) -> (out,
    sum, mean, rstd)`` (``sum = x + residual``, empty without a residual; ``mean`` empty for RMSNorm; float32 row
    statistics, never differentiable). ``backward(grad_out, grad_sum, x, weight, mean, rstd, rms, weight_grad,
    bias_grad) -> (dx, dweight, dbias)``, ``x`` the normalised tensor (the saved sum with a residual), ``grad_sum``
    None without one; the gradient of ``input`` and ``residual`` is the same ``dx``."""

    def setup_context(ctx, inputs, output):
        x, residual, weight, bias, _eps, rms = inputs
        _out, total, mean, rstd = output
        ctx.save_for_backward(x if residual is None else total, weight, mean, rstd)
        ctx.rms, ctx.has_residual, ctx.has_bias = rms, residual is not None, bias is not None
        ctx.mark_non_differentiable(mean, rstd)

    def grad(ctx, grad_out, grad_sum, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        dx, dweight, dbias = backward(
            grad_out, grad_sum if ctx.has_residual else None, x, weight, mean, rstd, ctx.rms,
            weight is not None and needs[2], ctx.has_bias and needs[3],
        )  # fmt: skip
        return (
            dx if needs[0] else None,
            dx if ctx.has_residual and needs[1] else None,
            dweight if weight is not None and needs[2] else None,
            dbias if ctx.has_bias and needs[3] else None,
            None,
            None,
        )

    torch.library.register_autograd(forward, grad, setup_context=setup_context)


def bias_gelu(forward: str, backward: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``forward(x, bias, tanh) -> gelu(x + bias)`` over the rows of ``x`` (M, N); ``backward(grad_out, x, bias, tanh,
    bias_grad) -> (dx, dbias)`` recomputes ``x + bias`` (nothing saved but the inputs)."""

    def setup_context(ctx, inputs, output):
        x, bias, tanh = inputs
        ctx.save_for_backward(x, bias)
        ctx.tanh = tanh

    def grad(ctx, grad_out):
        x, bias = ctx.saved_tensors
        needs_bias = bias is not None and ctx.needs_input_grad[1]
        dx, dbias = backward(grad_out, x, bias, ctx.tanh, needs_bias)
        return dx, dbias if needs_bias else None, None

    torch.library.register_autograd(forward, grad, setup_context=setup_context)


LINEAR_CROSS_ENTROPY_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def linear_cross_entropy(forward: str, op: Callable[..., tuple[torch.Tensor, ...]]) -> Callable[..., torch.Tensor]:
    """``op`` is the forward op itself, ``op(hidden, weight, targets, bias, grad_rows, ignore_index, reduction,
    label_smoothing, softcap, chunk_size, grad_hidden, grad_weight, grad_bias) -> (loss, dhidden, dweight, dbias)``.

    A reduced loss (mean / sum) has a scalar gradient: the forward computes the gradients it will need with the
    logits at hand, and the backward scales them by the loss's gradient (nothing else is saved). With reduction
    none the gradient of each row is known only in the backward, which calls ``op`` again with it as
    ``grad_rows`` (the logits are recomputed chunk by chunk). Returns the call ``(hidden, weight, targets, bias,
    ignore_index, reduction, label_smoothing, softcap, chunk_size) -> loss`` (float32) that asks the
    forward for the gradients autograd will want.
    """

    def setup_context(ctx, inputs, output):
        hidden, weight, targets, bias, _rows, ignore_index, reduction, smoothing, softcap, chunk, *wanted = inputs
        _loss, dhidden, dweight, dbias = output
        ctx.mark_non_differentiable(dhidden, dweight, dbias)
        ctx.set_materialize_grads(False)  # no (V, d) zeros for the gradients' own (absent) gradients
        ctx.eager = any(wanted)
        ctx.has_bias = bias is not None
        if ctx.eager:
            ctx.save_for_backward(dhidden, dweight, dbias)
        else:
            ctx.save_for_backward(hidden, weight, targets, bias)
            ctx.args = (ignore_index, reduction, smoothing, softcap, chunk)

    def grad(ctx, grad_loss, *_unused):
        needs = ctx.needs_input_grad
        wanted = (needs[0], needs[1], ctx.has_bias and needs[3])
        if ctx.eager:
            grads = ctx.saved_tensors
            if any(w and g.numel() == 0 for w, g in zip(wanted, grads, strict=True)):
                raise RuntimeError("linear_cross_entropy: a gradient the forward did not compute is needed")
            # A loss gradient of exactly 1 (loss.backward()) leaves the gradients as they are, with no copy. Only
            # read on plain tensors: traces (fake, functional tensors) have no value to read.
            one = type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling() and bool(grad_loss == 1)
            dh, dw, db = (g if not w else g if one else g * grad_loss for w, g in zip(wanted, grads, strict=True))
        else:
            hidden, weight, targets, bias = ctx.saved_tensors
            rows = grad_loss.float().expand(hidden.shape[0]) if grad_loss.dim() == 0 else grad_loss.float()
            _, dh, dw, db = op(hidden, weight, targets, bias, rows, *ctx.args, *wanted)
        return (
            dh if wanted[0] else None,
            dw if wanted[1] else None,
            None,
            db if wanted[2] else None,
            *([None] * 9),
        )

    torch.library.register_autograd(forward, grad, setup_context=setup_context)

    def call(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, softcap, chunk_size):
        code = LINEAR_CROSS_ENTROPY_REDUCTIONS[reduction]
        eager = code != 0 and torch.is_grad_enabled()
        wanted = [eager and t is not None and t.requires_grad for t in (hidden, weight, bias)]
        loss = op(hidden, weight, targets, bias, None, ignore_index, code, label_smoothing, softcap or 0.0,
                  chunk_size, *wanted)[0]  # fmt: skip
        return loss

    return call
