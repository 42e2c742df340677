"""Public attention op: validate once, pick a backend, run it."""

from __future__ import annotations

import math

import torch
from torch.nn.attention.bias import CausalBias, CausalVariant

from metagpt_fast import backends
from metagpt_fast.ops import reference
from metagpt_fast.ops import validation as check
from metagpt_fast.ops.ranges import op_range
from metagpt_fast.ops.reference.random import new_seed


def _reference(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed):
    # The reference draws dropout from torch's generator: replaying a kernel's Philox mask is a test-only path
    # (``dropout_mask=``), too slow for training.
    return reference.attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _is_mask(kind):
    def used(inputs):
        mask = inputs["attn_mask"]
        return mask is not None and (mask.dtype == torch.bool) == (kind == "bool")

    return used


OP = backends.declare_op(
    backends.OpSpec(
        "attention",
        primary="query",
        head_dims=lambda inputs: (inputs["query"].shape[-1], inputs["value"].shape[-1]),
        features={
            "dropout": ("dropout_p > 0", lambda inputs: inputs["dropout_p"] > 0.0),
            "bool_mask": ("a boolean attn_mask", _is_mask("bool")),
            "additive_mask": ("an additive attn_mask", _is_mask("additive")),
            "mask_grad": (
                "attn_mask requires grad (the fused kernels give no mask gradient; the reference does)",
                lambda inputs: inputs["attn_mask"] is not None and inputs["attn_mask"].requires_grad,
            ),
            "gqa": ("grouped-query attention", lambda inputs: inputs["key"].shape[1] != inputs["query"].shape[1]),
        },
    ),
    _reference,
)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` that runs the fastest available backend.

    Arguments:
        query: ``(B, Hq, Nq, D)`` (or ``(B, Nq, D)``), float16 / bfloat16 / float32 / float64.
        key: ``(B, Hk, Nk, D)``, same dtype and device as ``query``. ``Hk == Hq``, or ``Hq % Hk == 0`` with
            ``enable_gqa=True``.
        value: ``(B, Hk, Nk, Dv)``.
        attn_mask: boolean (True = attend) or additive mask of ``query``'s dtype, broadcastable to
            ``(B, Hq, Nq, Nk)``. Key-padding masks ``(B, 1, 1, Nk)`` are served without materialising a dense mask.
        dropout_p: probability of dropping an attention weight, in ``[0, 1)``. Pass 0 at evaluation.
        is_causal: mask keys after the query, aligned top-left when ``Nq != Nk`` (torch's convention).
            Not combinable with ``attn_mask``.
        scale: factor applied to ``Q @ K^T``; default ``1 / sqrt(D)``.
        enable_gqa: allow grouped-query attention (``Hk`` divides ``Hq``).
        backend: ``"reference"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"auto"``; ``None`` follows
            :func:`metagpt_fast.use_backend` / ``METAGPT_FAST_BACKEND``.

    Returns:
        ``(B, Hq, Nq, Dv)`` tensor of ``query``'s dtype. Rows whose every key is masked are 0 (torch gives NaN).
    """
    check.tensor("query", query, dims=(3, 4), floating=True)
    check.tensor("key", key, dims=(query.dim(),), floating=True)
    check.tensor("value", value, dims=(query.dim(),), floating=True)
    for name, t in (("query", query), ("key", key), ("value", value)):
        check.plain_tensor(name, t)
    attn_mask, is_causal = resolve_causal_bias(attn_mask, is_causal, query.shape[-2], key.shape[-2], query.device)
    if torch.is_autocast_enabled(query.device.type):  # like torch's SDPA, which autocast runs in low precision
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(dtype)
    check.same_dtype(query=query, key=key, value=value)
    check.same_device(query=query, key=key, value=value, attn_mask=attn_mask)
    dropout_p = check.probability("dropout_p", dropout_p)
    check.flag("is_causal", is_causal)
    check.flag("enable_gqa", enable_gqa)
    if scale is not None:
        scale = check.finite_float("scale", scale)

    squeeze = query.dim() == 3
    if squeeze:  # (B, N, D) -> (B, 1, N, D)
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
    _check_shapes(query, key, value, enable_gqa)
    if attn_mask is not None:
        check.tensor("attn_mask", attn_mask, dims=(0, 1, 2, 3, 4))
        if is_causal:
            raise check.ArgumentError(
                "attn_mask and is_causal=True cannot be combined: fold the causal mask into attn_mask"
            )
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise check.ArgumentTypeError(
                f"attn_mask must be bool or {query.dtype} (query's dtype), got {attn_mask.dtype}"
            )
        b, h, nq, _ = query.shape
        check.broadcastable("attn_mask", attn_mask.shape, (b, h, nq, key.shape[-2]))

    inputs = dict(
        query=query,
        key=key,
        value=value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=1.0 / math.sqrt(query.shape[-1]) if scale is None else scale,
        enable_gqa=enable_gqa,
    )
    impl = backends.select("attention", backend, **inputs)
    if query.numel() == 0 or key.shape[-2] == 0 or value.shape[-1] == 0:
        # Nothing to attend to (no keys: every row fully masked) or nothing to compute: no kernel launch (a
        # zero-size grid is a launch error on CUDA); the output is 0 like torch's.
        out = _zero_attention(query, key, value)
    else:
        seed = new_seed(query.device) if dropout_p > 0.0 else None
        with op_range("attention", impl.backend):
            out = impl.fn(**inputs, seed=seed)
    return out.squeeze(1) if squeeze else out


def resolve_causal_bias(attn_mask, is_causal, n_q: int, n_k: int, device: torch.device):
    """torch's causal masks (``torch.nn.attention.bias.causal_upper_left`` / ``causal_lower_right``, a tensor subclass
    that torch's SDPA dispatches specially) as ``(attn_mask, is_causal)`` with the same semantics: upper-left (or
    either, when ``n_q == n_k``) is ``is_causal=True``; lower-right becomes a boolean mask aligned to the bottom right.
    Any other tensor subclass is refused rather than read as a plain mask."""
    if attn_mask is None or not isinstance(attn_mask, torch.Tensor):
        return attn_mask, is_causal
    if not isinstance(attn_mask, CausalBias):
        check.plain_tensor("attn_mask", attn_mask)
        return attn_mask, is_causal
    if is_causal:
        raise check.ArgumentError(
            "a CausalBias attn_mask cannot be combined with is_causal=True (it is the causal mask)"
        )
    if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (n_q, n_k):
        raise check.ArgumentError(
            f"attn_mask is a CausalBias for {attn_mask.seq_len_q} queries and {attn_mask.seq_len_kv} keys, "
            f"got {n_q} queries and {n_k} keys"
        )
    if attn_mask.variant == CausalVariant.UPPER_LEFT or n_q == n_k:
        return None, True
    if attn_mask.variant == CausalVariant.LOWER_RIGHT:
        # Query i sees keys up to i + (n_k - n_q). Rows with no key (n_q > n_k) give 0 here, NaN in torch.
        return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(n_k - n_q), False
    raise check.ArgumentError(f"attn_mask is a CausalBias of unknown variant {attn_mask.variant!r}")


def _zero_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``(B, Hq, Nq, Dv)`` zeros that carry zero gradients to query, key and value."""
    b, hq, nq, _ = query.shape
    # The sum over an empty slice is an exact 0 with a (zero) gradient, whatever NaN/Inf the inputs hold.
    zero = sum(t.narrow(-1, 0, 0).sum() for t in (query, key, value))
    return query.new_zeros(b, hq, nq, value.shape[-1]) + zero


def _check_shapes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool) -> None:
    (b, hq, _, d), (bk, hk, nk, dk), (bv, hv, nv, _) = query.shape, key.shape, value.shape
    if bk != b or bv != b:
        raise check.ArgumentError(f"query, key and value must share the batch size, got {b}, {bk}, {bv}")
    if dk != d:
        raise check.ArgumentError(f"key's head dim must equal query's ({d}), got {dk}")
    if d == 0:
        raise check.ArgumentError("query's head dim must be >= 1, got 0")
    if nv != nk:
        raise check.ArgumentError(f"value must have key's sequence length ({nk}), got {nv}")
    if enable_gqa:
        if hk == 0 or hq % hk:
            raise check.ArgumentError(f"with enable_gqa, key's heads ({hk}) must divide query's heads ({hq})")
    elif hk != hq:
        raise check.ArgumentError(
            f"key must have query's number of heads ({hq}), got {hk}; set enable_gqa=True for GQA"
        )
    if hv != hk:
        raise check.ArgumentError(f"value must have key's number of heads ({hk}), got {hv}")
