"""Public positional ops: fused token embedding + sinusoidal encoding, and the positional-encoding add."""

from __future__ import annotations

import torch

from metagpt_fast import backends
from metagpt_fast.ops import reference
from metagpt_fast.ops import validation as check
from metagpt_fast.ops.ranges import op_range
from metagpt_fast.ops.reference.random import new_seed

_DROPOUT = {"dropout": ("dropout_p > 0", lambda inputs: inputs["dropout_p"] > 0.0)}


def _reference_embed_positions(tokens, weight, scale, offset, dropout_p, sinusoidal, seed):
    return reference.embed_positions(tokens, weight, scale, offset, dropout_p, sinusoidal)


def _reference_add_positional_encoding(x, offset, dropout_p, seed):
    return reference.add_positional_encoding(x, offset, dropout_p)


EMBED_POSITIONS = backends.declare_op(
    backends.OpSpec("embed_positions", primary="weight", features=_DROPOUT), _reference_embed_positions
)
ADD_POSITIONAL_ENCODING = backends.declare_op(
    backends.OpSpec("add_positional_encoding", primary="x", features=_DROPOUT), _reference_add_positional_encoding
)


def embed_positions(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    scale: float = 1.0,
    offset: int = 0,
    dropout_p: float = 0.0,
    sinusoidal: bool = True,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``dropout(weight[tokens] * scale + PE[offset : offset + T])`` as one op.

    Arguments:
        tokens: ``(B, T)`` integer token ids in ``[0, vocab)``.
        weight: ``(vocab, d)`` embedding table, float16 / bfloat16 / float32 / float64.
        scale: factor applied to the embedding rows (``sqrt(d)`` in the original Transformer).
        offset: position of the first token (incremental decoding).
        dropout_p: dropout probability in ``[0, 1)``; pass 0 at evaluation.
        sinusoidal: add the sinusoidal encoding (False for rotary models: embedding + dropout only).
        backend: see :func:`metagpt_fast.scaled_dot_product_attention`.

    Returns:
        ``(B, T, d)`` tensor of ``weight``'s dtype. Gradients flow to ``weight`` only.

    Autocast does not apply: like ``F.embedding``, the op computes in ``weight``'s dtype under ``torch.autocast``
    too. The encoding is within ~3e-7 of the exact (float64) table at any position on every backend.
    """
    check.tensor("tokens", tokens, dims=(2,))
    check.tensor("weight", weight, dims=(2,), floating=True)
    check.same_device(tokens=tokens, weight=weight)
    check.token_ids("tokens", tokens, weight.shape[0])
    inputs = dict(
        tokens=tokens,
        weight=weight,
        scale=check.finite_float("scale", scale),
        offset=check.integer("offset", offset, minimum=0),
        dropout_p=check.probability("dropout_p", dropout_p),
        sinusoidal=check.flag("sinusoidal", sinusoidal),
    )
    impl = backends.select("embed_positions", backend, **inputs)
    if tokens.numel() == 0 or weight.shape[1] == 0:  # nothing to compute: no kernel launch
        impl = backends.select("embed_positions", "reference", **inputs)
    seed = new_seed(weight.device) if inputs["dropout_p"] > 0.0 else None
    with op_range("embed_positions", impl.backend):
        return impl.fn(**inputs, seed=seed)


def add_positional_encoding(
    x: torch.Tensor,
    offset: int = 0,
    dropout_p: float = 0.0,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """``dropout(x + PE[offset : offset + T])`` for ``x`` of shape ``(B, T, d)`` (the article's PositionalEncoding).

    Arguments:
        x: ``(B, T, d)`` float16 / bfloat16 / float32 / float64, any strides.
        offset: position of the first row (incremental decoding).
        dropout_p: dropout probability in ``[0, 1)``; pass 0 at evaluation.
        backend: see :func:`metagpt_fast.scaled_dot_product_attention`.

    Returns:
        ``(B, T, d)`` tensor of ``x``'s dtype.

    Autocast does not apply: like torch's elementwise addition, the op computes in ``x``'s dtype under
    ``torch.autocast`` too. The encoding is within ~3e-7 of the exact (float64) table at any position on every
    backend.
    """
    check.tensor("x", x, dims=(3,), floating=True)
    inputs = dict(
        x=x,
        offset=check.integer("offset", offset, minimum=0),
        dropout_p=check.probability("dropout_p", dropout_p),
    )
    impl = backends.select("add_positional_encoding", backend, **inputs)
    if x.numel() == 0:  # nothing to compute: no kernel launch
        impl = backends.select("add_positional_encoding", "reference", **inputs)
    seed = new_seed(x.device) if inputs["dropout_p"] > 0.0 else None
    with op_range("add_positional_encoding", impl.backend):
        return impl.fn(**inputs, seed=seed)
