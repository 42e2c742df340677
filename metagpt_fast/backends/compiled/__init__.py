"""The ``cpu`` and ``cuda`` backends: the compiled ``torch.library`` ops of ``metagpt_fast._C`` (csrc/).

Schemas are declared once in csrc/ops.cpp (namespace ``metagpt_fast``); C++ registers CPU kernels for all four ops
and CUDA kernels for the positional ones (the CUDA attention kernel registers itself from csrc/attention/). This
module adds what torch needs on the Python side, for every device:

- ``register_fake``: output shapes, so ``torch.compile`` traces the ops without running them;
- ``register_autograd``: each forward op's backward in terms of the ``*_bwd`` ops (dropout replays the same Philox
  stream from the saved seed, nothing else is stored);

and registers the backend implementations with :mod:`metagpt_fast.backends`, or marks the backends unavailable with
the reason (no compiler, no CUDA, ...). csrc/ops.cpp names this module with ``set_python_module``.
"""

from __future__ import annotations

import torch

from metagpt_fast import _extension, backends

ops = None  # torch.ops.metagpt_fast once the extension is loaded

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_FLOAT64 = "float64 inputs are served by the reference backend (the compiled kernels compute in float32)"


# ------------------------------------------------------------------------------------------------ fake kernels


def _fake_attention_fwd(q, k, v, attn_mask, dropout_p, is_causal, scale, seed):
    b, h, n, _ = q.shape
    return q.new_empty((b, h, n, v.shape[-1])), q.new_empty((b, h, n), dtype=torch.float32)


def _fake_attention_bwd(grad_out, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, seed):
    # Gradients come back contiguous (the kernels write them densely).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fake_embed_positions_fwd(tokens, weight, scale, offset, dropout_p, sinusoidal, seed):
    return weight.new_empty((tokens.shape[0], tokens.shape[1], weight.shape[1]))


def _fake_embed_positions_bwd(grad_out, tokens, num_embeddings, scale, dropout_p, seed):
    return grad_out.new_empty((num_embeddings, grad_out.shape[-1]))


def _fake_add_positional_encoding_fwd(x, offset, dropout_p, seed):
    return x.new_empty(x.shape)


def _fake_add_positional_encoding_bwd(grad_out, dropout_p, seed):
    return grad_out.new_empty(grad_out.shape)


def _fake_rotary(q, k, position_ids, offset, rotary_dim, base, interleaved, conjugate):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _fake_rotary_(q, k, position_ids, offset, rotary_dim, base, interleaved):
    return None


# ---------------------------------------------------------------------------------------------------- autograd


def _attention_setup(ctx, inputs, output):
    q, k, v, attn_mask, dropout_p, is_causal, scale, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, seed)
    ctx.dropout_p, ctx.is_causal, ctx.scale = dropout_p, is_causal, scale


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, attn_mask, seed = ctx.saved_tensors
    # lse is an auxiliary output for the backward pass: its gradient is ignored.
    grad_q, grad_k, grad_v = ops.attention_bwd(
        grad_out, q, k, v, out, lse, attn_mask, ctx.dropout_p, ctx.is_causal, ctx.scale, seed
    )
    return grad_q, grad_k, grad_v, None, None, None, None, None


def _embed_setup(ctx, inputs, output):
    tokens, weight, scale, _offset, dropout_p, _sinusoidal, seed = inputs
    ctx.save_for_backward(tokens, seed)
    ctx.num_embeddings, ctx.scale, ctx.dropout_p = weight.shape[0], scale, dropout_p


def _embed_backward(ctx, grad_out):
    tokens, seed = ctx.saved_tensors
    grad_weight = ops.embed_positions_bwd(grad_out, tokens, ctx.num_embeddings, ctx.scale, ctx.dropout_p, seed)
    return None, grad_weight, None, None, None, None, None


def _add_pe_setup(ctx, inputs, output):
    _x, _offset, dropout_p, seed = inputs
    ctx.save_for_backward(seed)
    ctx.dropout_p = dropout_p


def _add_pe_backward(ctx, grad_out):
    (seed,) = ctx.saved_tensors
    grad_x = grad_out if ctx.dropout_p == 0.0 else ops.add_positional_encoding_bwd(grad_out, ctx.dropout_p, seed)
    return grad_x, None, None, None


def _rotary_setup(ctx, inputs, output):
    _q, _k, position_ids, offset, rotary_dim, base, interleaved, conjugate = inputs
    ctx.save_for_backward(position_ids)
    ctx.args = (offset, rotary_dim, base, interleaved, conjugate)


def _rotary_backward(ctx, grad_q, grad_k):
    (position_ids,) = ctx.saved_tensors
    offset, rotary_dim, base, interleaved, conjugate = ctx.args
    # The rotation is orthogonal: its backward is the rotation by the opposite angle.
    grad_q, grad_k = ops.rotary(grad_q, grad_k, position_ids, offset, rotary_dim, base, interleaved, not conjugate)
    return grad_q, grad_k, None, None, None, None, None, None


def _register_python_parts() -> None:
    lib = "metagpt_fast::"
    fakes = {
        "attention_fwd": _fake_attention_fwd,
        "attention_bwd": _fake_attention_bwd,
        "embed_positions_fwd": _fake_embed_positions_fwd,
        "embed_positions_bwd": _fake_embed_positions_bwd,
        "add_positional_encoding_fwd": _fake_add_positional_encoding_fwd,
        "add_positional_encoding_bwd": _fake_add_positional_encoding_bwd,
        "rotary": _fake_rotary,
        "rotary_": _fake_rotary_,
    }
    for name, fake in fakes.items():
        torch.library.register_fake(lib + name, fake)
    torch.library.register_autograd(lib + "attention_fwd", _attention_backward, setup_context=_attention_setup)
    torch.library.register_autograd(lib + "embed_positions_fwd", _embed_backward, setup_context=_embed_setup)
    torch.library.register_autograd(lib + "add_positional_encoding_fwd", _add_pe_backward, setup_context=_add_pe_setup)
    torch.library.register_autograd(lib + "rotary", _rotary_backward, setup_context=_rotary_setup)


# ------------------------------------------------------------------------------------ backend implementations


def attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed):
    return ops.attention_fwd(query, key, value, attn_mask, dropout_p, is_causal, scale, seed)[0]


def embed_positions(tokens, weight, scale, offset, dropout_p, sinusoidal, seed):
    return ops.embed_positions_fwd(tokens, weight, scale, offset, dropout_p, sinusoidal, seed)


def add_positional_encoding(x, offset, dropout_p, seed):
    return ops.add_positional_encoding_fwd(x, offset, dropout_p, seed)


def rotary(q, k, position_ids, offset, rotary_dim, base, interleaved, inplace):
    if inplace:
        ops.rotary_(q, k, position_ids, offset, rotary_dim, base, interleaved)
        return q, k
    return ops.rotary(q, k, position_ids, offset, rotary_dim, base, interleaved, False)


def _reasons(device_type: str, name: str, tensor: torch.Tensor) -> list[str]:
    reasons = []
    if tensor.device.type != device_type:
        reasons.append(f"{name} is on {tensor.device}, the {device_type} backend needs {device_type} tensors")
    if tensor.dtype == torch.float64:
        reasons.append(_FLOAT64)
    elif tensor.dtype not in SUPPORTED_DTYPES:
        reasons.append(f"{name} has dtype {tensor.dtype}; supported: float32, bfloat16, float16")
    return reasons


def _why_not(device_type: str, op: str):
    def attention_reasons(query, attn_mask=None, **_):
        reasons = _reasons(device_type, "query", query)
        if attn_mask is not None and attn_mask.requires_grad:
            reasons.append("attn_mask requires grad: the fused kernels give no mask gradient (the reference does)")
        return reasons

    def embed_reasons(weight, **_):
        return _reasons(device_type, "weight", weight)

    def add_pe_reasons(x, **_):
        return _reasons(device_type, "x", x)

    def rotary_reasons(q, **_):
        return _reasons(device_type, "q", q)

    return {
        "attention": attention_reasons,
        "embed_positions": embed_reasons,
        "add_positional_encoding": add_pe_reasons,
        "rotary": rotary_reasons,
    }[op]


IMPLEMENTATIONS = {
    "attention": attention,
    "embed_positions": embed_positions,
    "add_positional_encoding": add_positional_encoding,
    "rotary": rotary,
}
# Positional CUDA kernels are here; the CUDA attention kernel is registered by metagpt_fast.ops.cuda_attention.
CUDA_OPS = ("embed_positions", "add_positional_encoding", "rotary")


def _cuda_unavailable_reason() -> str | None:
    if not _extension.has_cuda_kernels():
        return "the compiled extension has no CUDA kernels (built without CUDA: torch without CUDA or no nvcc)"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    return None


def _setup() -> None:
    global ops
    if _extension.load() is None:
        reason = f"compiled extension unavailable: {_extension.unavailable_reason()}"
        backends.mark_unavailable("cpu", reason)
        backends.mark_unavailable("cuda", reason)
        return
    ops = torch.ops.metagpt_fast
    _register_python_parts()
    # The CPU kernels are fast compiled code: above the reference, below a GPU backend (which never serves CPU).
    for op, fn in IMPLEMENTATIONS.items():
        backends.register(op, "cpu", fn, _why_not("cpu", op), priority=10)
    cuda_reason = _cuda_unavailable_reason()
    if cuda_reason is not None:
        backends.mark_unavailable("cuda", cuda_reason)
        return
    for op in CUDA_OPS:
        backends.register(op, "cuda", IMPLEMENTATIONS[op], _why_not("cuda", op), priority=20)


_setup()
