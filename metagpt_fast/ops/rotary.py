"""Public rotary op: rotate queries and keys together."""

from __future__ import annotations

import torch

from metagpt_fast import backends
from metagpt_fast._spec import DEFAULT_BASE
from metagpt_fast.ops import reference
from metagpt_fast.ops import validation as check
from metagpt_fast.ops.ranges import op_range


def _reference(q, k, position_ids, offset, rotary_dim, base, interleaved, inplace):
    q_out, k_out = reference.apply_rotary(q, k, position_ids, offset, rotary_dim, base, interleaved)
    if inplace:
        return q.copy_(q_out), k.copy_(k_out)
    return q_out, k_out


OP = backends.declare_op(backends.OpSpec("rotary", primary="q"), _reference)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    offset: int = 0,
    rotary_dim: int | None = None,
    base: float = DEFAULT_BASE,
    interleaved: bool = False,
    inplace: bool = False,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of ``q`` and ``k`` in one op.

    Arguments:
        q: ``(B, Hq, T, D)`` queries, float16 / bfloat16 / float32 / float64, any strides.
        k: ``(B, Hk, T, D)`` keys, same dtype, device, ``B``, ``T`` and ``D`` as ``q``.
        position_ids: optional integer positions ``(T,)`` or ``(B, T)``; default ``offset + arange(T)``.
        offset: position of the first token when ``position_ids`` is None.
        rotary_dim: number of leading features rotated (even, ``<= D``); default ``D``.
        base: frequency base (``rope_theta``).
        interleaved: GPT-J pairs ``(2i, 2i+1)`` instead of GPT-NeoX/Llama halves ``(i, i + rotary_dim/2)``.
        inplace: write the result into ``q`` and ``k`` (inference; not allowed on tensors that need grad).
        backend: see :func:`metagpt_fast.scaled_dot_product_attention`.

    Returns:
        ``(q_rotated, k_rotated)``, of ``q``'s dtype.

    Autocast does not apply: like torch's elementwise arithmetic, the op computes in ``q``'s dtype under
    ``torch.autocast`` too. Every backend forms and reduces the angles ``pos * base^(-2i/rotary_dim)`` in float64
    before taking cos/sin, so they are within ~3e-7 of the exact ones at any position.
    """
    check.tensor("q", q, dims=(4,), floating=True)
    check.tensor("k", k, dims=(4,), floating=True)
    check.same_dtype(q=q, k=k)
    check.same_device(q=q, k=k, position_ids=position_ids)
    (b, _, t, d), (bk, _, tk, dk) = q.shape, k.shape
    if (bk, tk, dk) != (b, t, d):
        raise check.ArgumentError(f"k must match q's batch, length and head dim {(b, t, d)}, got {(bk, tk, dk)}")
    rotary_dim = d if rotary_dim is None else check.integer("rotary_dim", rotary_dim, minimum=2)
    if rotary_dim > d or rotary_dim % 2:
        raise check.ArgumentError(f"rotary_dim must be even and <= head dim {d}, got {rotary_dim}")
    if position_ids is not None:
        check.tensor("position_ids", position_ids, dims=(1, 2))
        if position_ids.dtype.is_floating_point or position_ids.dtype == torch.bool:
            raise check.ArgumentTypeError(f"position_ids must be an integer tensor, got {position_ids.dtype}")
        if position_ids.shape[-1] != t or (position_ids.dim() == 2 and position_ids.shape[0] not in (1, b)):
            raise check.ArgumentError(
                f"position_ids must have shape ({t},) or ({b}, {t}), got {tuple(position_ids.shape)}"
            )
    if check.flag("inplace", inplace):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            raise check.ArgumentError("inplace=True is for inference: q or k requires grad")
        check.writable("q", q)
        check.writable("k", k)
        if q.numel() and k.numel() and not check._is_fake(q) and q.data_ptr() == k.data_ptr():
            raise check.ArgumentError("inplace=True needs q and k in separate memory, got two views of the same data")
    inputs = dict(
        q=q,
        k=k,
        position_ids=position_ids,
        offset=check.integer("offset", offset, minimum=0),
        rotary_dim=rotary_dim,
        base=check.finite_float("base", base, positive=True),
        interleaved=check.flag("interleaved", interleaved),
        inplace=inplace,
    )
    impl = backends.select("rotary", backend, **inputs)
    if q.numel() == 0 or k.numel() == 0:  # nothing to compute (for one of them): no kernel launch
        impl = backends.select("rotary", "reference", **inputs)
    with op_range("rotary", impl.backend):
        return impl.fn(**inputs)
