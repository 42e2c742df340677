"""flash-attn 2's public API (``flash_attn_func``, ``flash_attn_varlen_func`` and their packed forms) on every device.

Each function validates its arguments, normalises them and calls one registry op, ``flash_attention``, in its
packed variable-length form: a dense ``(B, N, H, D)`` call becomes ``(B * N, H, D)`` with
``cu_seqlens = arange(B + 1) * N``, so every implementation serves one layout. The semantics are flash-attn's:

- causal masks and windows aligned to the bottom right when a sequence has fewer queries than keys (query ``i`` of
  ``Lq`` is aligned with key ``i + Lk - Lq``);
- ``window_size=(left, right)``: query ``i`` sees keys ``j`` with ``i + Lk - Lq - left <= j <= i + Lk - Lq + right``,
  ``-1`` meaning unbounded on that side; ``causal=True`` sets ``right = 0``;
- ``softcap > 0``: scores become ``softcap * tanh(s / softcap)`` before the softmax;
- ``alibi_slopes`` ``(H,)`` or ``(B, H)`` float32: ``-slope * |i + Lk - Lq - j|`` is added to the (capped) score;
- grouped-query / multi-query attention by head count (``Hq`` a multiple of ``Hk``);
- a query with no key to attend to gets ``out = 0`` and ``lse = +inf``;
- gradients for q, k and v (not for ``alibi_slopes``, as in flash-attn).

The reference (:mod:`metagpt_fast.ops.reference.flash`) is the oracle; see ``docs/architecture.md`` for the backends.
"""

from __future__ import annotations

import math

import torch

from metagpt_fast import backends
from metagpt_fast.ops import validation as check
from metagpt_fast.ops.ranges import op_range
from metagpt_fast.ops.reference import flash as reference_flash
from metagpt_fast.ops.reference.random import new_seed

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
]


def _reference(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_left,
    window_right, softcap, alibi_slopes, dropout_p, seed,
):  # fmt: skip
    # The reference draws dropout from torch's generator (``seed`` is for the kernels' counter-based stream).
    return reference_flash.flash_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, window_left, window_right, softcap, alibi_slopes, dropout_p
    )


def _uses_window(inputs) -> bool:
    return inputs["window_left"] >= 0 or (inputs["window_right"] >= 0 and not inputs["causal"])


OP = backends.declare_op(
    backends.OpSpec(
        "flash_attention",
        primary="q",
        head_dims=lambda inputs: (inputs["q"].shape[-1], inputs["v"].shape[-1]),
        features={
            "window": ("a sliding window (window_size other than (-1, -1) and causal)", _uses_window),
            "softcap": ("softcap > 0", lambda inputs: inputs["softcap"] > 0.0),
            "alibi": ("ALiBi slopes", lambda inputs: inputs["alibi_slopes"] is not None),
            "dropout": ("dropout_p > 0", lambda inputs: inputs["dropout_p"] > 0.0),
            "gqa": ("grouped-query attention", lambda inputs: inputs["k"].shape[1] != inputs["q"].shape[1]),
            # Never in the inputs: deterministic=True is checked by the public functions against the implementations
            # that list it (a backward pass whose result does not depend on thread scheduling, e.g. no float atomics).
            "deterministic": ("deterministic=True (a bitwise repeatable backward pass)", lambda inputs: False),
        },
    ),
    _reference,
)


# ------------------------------------------------------------------------------------------------------ validation


def _window(window_size) -> tuple[int, int]:
    if not isinstance(window_size, tuple | list) or len(window_size) != 2:
        raise check.ArgumentTypeError(f"window_size must be a (left, right) pair of ints, got {window_size!r}")
    left, right = window_size
    for value in (left, right):
        if isinstance(value, bool) or not isinstance(value, int):
            raise check.ArgumentTypeError(f"window_size must be a (left, right) pair of ints, got {window_size!r}")
    if left < -1 or right < -1:
        raise check.ArgumentError(f"window_size values must be >= -1 (-1 = unbounded), got {tuple(window_size)}")
    return left, right


def _softcap(softcap) -> float:
    softcap = check.finite_float("softcap", softcap)
    if softcap < 0:
        raise check.ArgumentError(f"softcap must be >= 0 (0 = off), got {softcap}")
    return softcap


def _alibi(alibi_slopes, batch: int, heads: int, device: torch.device) -> torch.Tensor | None:
    if alibi_slopes is None:
        return None
    check.tensor("alibi_slopes", alibi_slopes, dims=(1, 2))
    check.plain_tensor("alibi_slopes", alibi_slopes)
    if alibi_slopes.dtype != torch.float32:
        raise check.ArgumentTypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise check.ArgumentError(
            f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}), got {tuple(alibi_slopes.shape)}"
        )
    if alibi_slopes.device != device:
        raise check.ArgumentError(f"alibi_slopes must be on q's device {device}, got {alibi_slopes.device}")
    if alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise check.ArgumentError("alibi_slopes requires grad: flash attention gives no gradient to the slopes")
    return alibi_slopes.detach().expand(batch, heads).contiguous()


def _qkv(q, k, v, dims: int) -> None:
    layout = "(B, N, H, D)" if dims == 4 else "(total, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check.tensor(name, t, floating=True)
        if t.dim() != dims:
            raise check.ArgumentError(f"{name} must have the layout {layout}, got shape {tuple(t.shape)}")
        check.plain_tensor(name, t)
    check.same_dtype(q=q, k=k, v=v)
    check.same_device(q=q, k=k, v=v)
    (hq, d), (hk, dk), (hv, _) = q.shape[-2:], k.shape[-2:], v.shape[-2:]
    if d == 0:
        raise check.ArgumentError("q's head dim must be >= 1, got 0")
    if dk != d:
        raise check.ArgumentError(f"k's head dim must equal q's ({d}), got {dk}")
    if hv != hk:
        raise check.ArgumentError(f"v must have k's number of heads ({hk}), got {hv}")
    if hk == 0 or hq % hk:
        raise check.ArgumentError(f"k's number of heads ({hk}) must divide q's ({hq}) (MQA / GQA)")
    if v.shape[:-2] != k.shape[:-2]:
        raise check.ArgumentError(f"v must have k's leading dims {tuple(k.shape[:-2])}, got {tuple(v.shape[:-2])}")


def _cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device) -> list[int] | None:
    """Validates a ``cu_seqlens`` tensor; returns its values (None for tensors without data)."""
    check.tensor(name, cu, dims=(1,))
    check.plain_tensor(name, cu)
    if cu.dtype != torch.int32:
        raise check.ArgumentTypeError(f"{name} must be int32 (flash-attn's dtype), got {cu.dtype}")
    if cu.device != device:
        raise check.ArgumentError(f"{name} must be on q's device {device}, got {cu.device}")
    if cu.shape[0] < 1:
        raise check.ArgumentError(f"{name} must hold B + 1 >= 1 offsets, got an empty tensor")
    if check._is_fake(cu):
        return None
    values = cu.tolist()
    if values[0] != 0:
        raise check.ArgumentError(f"{name} must start at 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:], strict=False)):
        raise check.ArgumentError(f"{name} must be non-decreasing, got {values}")
    if values[-1] != total:
        raise check.ArgumentError(f"{name} must end at the packed total {total}, got {values[-1]}")
    return values


def _max_seqlen(name: str, value, values: list[int] | None) -> int:
    value = check.integer(name, value, minimum=0)
    if values is not None:
        longest = max((b - a for a, b in zip(values, values[1:], strict=False)), default=0)
        if value < longest:
            raise check.ArgumentError(f"{name} ({value}) is below the longest sequence ({longest})")
    return value


# ---------------------------------------------------------------------------------------------------------- the op


def _deterministic_impl(inputs, backend: str | None) -> backends.Implementation:
    """The implementation for ``deterministic=True``: the requested one if it lists the feature, else (auto) the
    highest-priority one that does and serves ``inputs`` (at least the reference)."""
    name = backends.requested_backend(backend)
    if name != "auto":
        impl = backends.select("flash_attention", name, **inputs)
        if "deterministic" not in impl.capabilities.features:
            raise ValueError(
                f"backend {name!r} cannot run 'flash_attention' on these inputs: deterministic=True (a bitwise "
                f"repeatable backward pass): not served by {name}"
            )
        return impl
    best = backends.select("flash_attention", "reference", **inputs)
    best_priority = best.priority(inputs)
    for impl in backends.implementations("flash_attention"):
        if impl.slow or "deterministic" not in impl.capabilities.features:
            continue
        priority = impl.priority(inputs)
        if priority > best_priority and not impl.not_supported_reasons(**inputs):
            best, best_priority = impl, priority
    return best


def _run(
    q, k, v, cu_q, cu_k, max_q, max_k, *, values_q, values_k, batch, dropout_p, softmax_scale, causal, window_size,
    softcap, alibi_slopes, deterministic, return_attn_probs, backend,
):  # fmt: skip
    """Validates the scalar arguments, runs the op on packed ``(T, H, D)`` tensors; returns ``(out, lse, probs)``
    (probs None unless ``return_attn_probs``)."""
    dropout_p = check.probability("dropout_p", dropout_p)
    scale = (
        1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else check.finite_float("softmax_scale", softmax_scale)
    )
    causal = check.flag("causal", causal)
    left, right = _window(window_size)
    softcap = _softcap(softcap)
    alibi = _alibi(alibi_slopes, batch, q.shape[-2], q.device)
    check.flag("deterministic", deterministic)
    check.flag("return_attn_probs", return_attn_probs)
    if causal:
        right = 0
    # Bounds past every sequence are unbounded (so a kernel without the window feature may serve them): key j < Lk
    # always satisfies j >= i + Lk - Lq - left when left >= Lk - 1, and j <= i + Lk - Lq + right when right >= Lq - 1.
    if left >= max_k:
        left = -1
    if right >= max_q and right != 0:
        right = -1
    inputs = dict(
        q=q.contiguous(),
        k=k.contiguous(),
        v=v.contiguous(),
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        softmax_scale=scale,
        causal=right == 0,
        window_left=left,
        window_right=right,
        softcap=softcap,
        alibi_slopes=alibi,
        dropout_p=dropout_p,
    )
    if deterministic:
        impl = _deterministic_impl(inputs, backend)
    else:
        impl = backends.select("flash_attention", backend, **inputs)
    if q.shape[0] == 0 or k.shape[0] == 0 or v.shape[-1] == 0:
        # Nothing to compute, or no key anywhere (every row empty: out 0, lse +inf): no kernel launch.
        impl = backends.select("flash_attention", "reference", **inputs)
    seed = new_seed(q.device) if dropout_p > 0.0 else None
    with op_range("flash_attention", impl.backend):
        out, lse = impl.fn(**inputs, seed=seed)
    probs = None
    if return_attn_probs:
        # The probabilities come from the reference (no kernel stores them): float32 softmax weights before dropout,
        # (B, Hq, max_seqlen_q, max_seqlen_k), zero outside each sequence and for masked pairs.
        with torch.no_grad():
            _, _, dense = reference_flash.flash_attention(
                inputs["q"], inputs["k"], inputs["v"], cu_q, cu_k, scale, left, right, softcap, alibi,
                return_probs=True,
            )  # fmt: skip
        probs = dense.new_zeros(batch, q.shape[-2], max_q, max_k)
        probs[:, :, : dense.shape[2], : dense.shape[3]] = dense
    return out, lse, probs


def _dense_cu(batch: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * length


# ---------------------------------------------------------------------------------------------------- the functions


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    backend: str | None = None,
):
    """flash-attn's ``flash_attn_func`` on every device: attention over ``(B, N, H, D)`` tensors.

    Arguments:
        q: ``(B, Nq, Hq, D)`` queries, float16 / bfloat16 / float32 / float64.
        k: ``(B, Nk, Hk, D)`` keys, same dtype and device; ``Hk`` divides ``Hq`` (MQA / GQA).
        v: ``(B, Nk, Hk, Dv)`` values.
        dropout_p: probability of dropping an attention weight, in ``[0, 1)``; pass 0 at evaluation.
        softmax_scale: factor on ``q . k``; default ``1 / sqrt(D)``.
        causal: query ``i`` sees keys ``j <= i + Nk - Nq`` (aligned to the bottom right, as in flash-attn).
        window_size: ``(left, right)``: query ``i`` sees keys in ``[i + Nk - Nq - left, i + Nk - Nq + right]``;
            ``-1`` is unbounded on that side; ``causal`` sets ``right = 0``. Values below -1 are refused.
        softcap: ``> 0`` caps scores as ``softcap * tanh(s / softcap)`` before the softmax; 0 is off.
        alibi_slopes: float32 ``(Hq,)`` or ``(B, Hq)``: ``-slope * |i + Nk - Nq - j|`` added to each score. Gets
            no gradient (a slopes tensor that requires grad is refused).
        deterministic: require a bitwise repeatable backward pass: ``auto`` picks among the implementations that
            declare one (the reference does), an explicit backend that does not is refused.
        return_attn_probs: also return the log-sum-exp and the attention probabilities (see Returns).
        backend: see :func:`metagpt_fast.scaled_dot_product_attention`.

    Returns:
        ``out (B, Nq, Hq, Dv)`` of q's dtype; with ``return_attn_probs``, ``(out, softmax_lse, probs)``:
        ``softmax_lse`` float32 ``(B, Hq, Nq)`` (``+inf`` for a query with no key), ``probs`` float32
        ``(B, Hq, Nq, Nk)``, the softmax weights before dropout, computed by the reference implementation (the
        kernels do not store them; flash-attn returns them for testing only, too), without gradient.
    """
    _qkv(q, k, v, 4)
    (b, nq, hq, _), (bk, nk) = q.shape, k.shape[:2]
    if bk != b:
        raise check.ArgumentError(f"k must have q's batch size ({b}), got {bk}")
    out, lse, probs = _run(
        q.reshape(b * nq, hq, q.shape[-1]), k.reshape(b * nk, *k.shape[2:]), v.reshape(b * nk, *v.shape[2:]),
        _dense_cu(b, nq, q.device), _dense_cu(b, nk, q.device), nq, nk, values_q=None, values_k=None, batch=b,
        dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, deterministic=deterministic, return_attn_probs=return_attn_probs, backend=backend,
    )  # fmt: skip
    out = out.view(b, nq, hq, -1)
    if not return_attn_probs:
        return out
    return out, lse.view(hq, b, nq).transpose(0, 1), probs


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
    *,
    backend: str | None = None,
):
    """flash-attn's ``flash_attn_varlen_func``: ``B`` sequences packed back to back, with no padding.

    Arguments:
        q: ``(total_q, Hq, D)``: sequence ``b`` is rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]``.
        k: ``(total_k, Hk, D)``; v: ``(total_k, Hk, Dv)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(B + 1,)`` on q's device, starting at 0, non-decreasing, ending at
            ``total_q`` / ``total_k``. Zero-length sequences are allowed.
        max_seqlen_q, max_seqlen_k: ints at least the longest query / key sequence.
        block_table: paged key/value caches are not supported: must be None.
        The rest as for :func:`flash_attn_func`, per sequence (masks aligned to each sequence's bottom right).

    Returns:
        ``out (total_q, Hq, Dv)``; with ``return_attn_probs``, ``(out, softmax_lse (Hq, total_q) float32, probs
        (B, Hq, max_seqlen_q, max_seqlen_k) float32)``, as for :func:`flash_attn_func`.
    """
    _qkv(q, k, v, 3)
    if block_table is not None:
        raise check.ArgumentError("block_table (paged key/value caches) is not supported: pass None")
    values_q = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    values_k = _cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise check.ArgumentError(
            f"cu_seqlens_q and cu_seqlens_k must hold the same number of sequences, got "
            f"{cu_seqlens_q.shape[0] - 1} and {cu_seqlens_k.shape[0] - 1}"
        )
    max_q = _max_seqlen("max_seqlen_q", max_seqlen_q, values_q)
    max_k = _max_seqlen("max_seqlen_k", max_seqlen_k, values_k)
    out, lse, probs = _run(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, values_q=values_q, values_k=values_k,
        batch=cu_seqlens_q.shape[0] - 1, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, backend=backend,
    )  # fmt: skip
    return (out, lse, probs) if return_attn_probs else out


def _unpack(name: str, packed: torch.Tensor, count: int, dims: int) -> tuple[torch.Tensor, ...]:
    check.tensor(name, packed, floating=True)
    layout = {(3, 5): "(B, N, 3, H, D)", (2, 5): "(B, N, 2, H, D)", (3, 4): "(total, 3, H, D)"}.get(
        (count, dims), "(total, 2, H, D)"
    )
    if packed.dim() != dims or packed.shape[-3] != count:
        raise check.ArgumentError(f"{name} must have the layout {layout}, got shape {tuple(packed.shape)}")
    return packed.unbind(-3)


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    backend: str | None = None,
):
    """:func:`flash_attn_func` with ``qkv (B, N, 3, H, D)`` stacked; gradients flow to ``qkv``."""
    q, k, v = _unpack("qkv", qkv, 3, 5)
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs, backend=backend,
    )  # fmt: skip


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    backend: str | None = None,
):
    """:func:`flash_attn_func` with ``kv (B, Nk, 2, Hk, D)`` stacked; gradients flow to ``q`` and ``kv``."""
    k, v = _unpack("kv", kv, 2, 5)
    return flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs, backend=backend,
    )  # fmt: skip


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    backend: str | None = None,
):
    """:func:`flash_attn_varlen_func` with ``qkv (total, 3, H, D)`` stacked and one ``cu_seqlens`` for all."""
    q, k, v = _unpack("qkv", qkv, 3, 4)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale, causal, window_size,
        softcap, alibi_slopes, deterministic, return_attn_probs, backend=backend,
    )  # fmt: skip


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    backend: str | None = None,
):
    """:func:`flash_attn_varlen_func` with ``kv (total_k, 2, Hk, D)`` stacked."""
    k, v = _unpack("kv", kv, 2, 4)
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
        window_size, softcap, alibi_slopes, deterministic, return_attn_probs, backend=backend,
    )  # fmt: skip
