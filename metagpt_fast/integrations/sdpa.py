"""Route ``torch.nn.functional.scaled_dot_product_attention`` through :func:`metagpt_fast.scaled_dot_product_attention`.

Existing code that calls ``F.scaled_dot_product_attention`` (your model, ``nn.MultiheadAttention``'s functional
path, Hugging Face's ``"sdpa"`` attention) gets metagpt_fast's kernels without edits::

    import metagpt_fast

    with metagpt_fast.sdpa_routing():          # only inside the block (this thread / asyncio task)
        loss = model(batch).loss

    metagpt_fast.enable_sdpa_routing()         # process-wide, until...
    metagpt_fast.disable_sdpa_routing()        # ...switched off again

How it works: while routing is on anywhere, the attribute ``torch.nn.functional.scaled_dot_product_attention`` is a
wrapper; it is torch's own function again once every context has exited and the global switch is off. The wrapper
decides per call: ``sdpa_routing()`` contexts are context-local (``sdpa_routing(False)`` turns routing off inside a
block), the global switch applies where no context says otherwise.

Reversible and conservative: torch's ``CausalBias`` masks (``causal_upper_left`` / ``causal_lower_right``) keep their
meaning, and calls outside metagpt_fast's semantics go to torch's function unchanged — other tensor subclasses
(DTensor, nested tensors), more than 4 dimensions, masks that require grad (learned biases), mixed
dtypes or devices, shapes torch would reject, and keyword arguments this wrapper does not know. Under
``torch.autocast`` the inputs are cast to the autocast dtype first, as torch does for SDPA.

Limits: code that bound the function before routing started (``from torch.nn.functional import
scaled_dot_product_attention``) keeps torch's; and a query row whose every key is masked gives 0 here where torch
gives NaN.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

from metagpt_fast.ops import scaled_dot_product_attention
from metagpt_fast.ops.attention import resolve_causal_bias
from metagpt_fast.ops.validation import FLOAT_DTYPES

_TORCH_SDPA = F.scaled_dot_product_attention  # torch's function, captured before any routing
_context: contextvars.ContextVar[bool | None] = contextvars.ContextVar("metagpt_fast_sdpa_routing", default=None)
_state = {"global": False, "contexts": 0}
_lock = threading.Lock()


def routed_scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    **kwargs,
) -> torch.Tensor:
    """The function installed as ``torch.nn.functional.scaled_dot_product_attention`` while routing is on."""
    on = _context.get()
    if on is None:
        on = _state["global"]
    if isinstance(attn_mask, CausalBias):
        if not on or kwargs:
            # torch's own handling: CausalBias dispatches on `func is F.scaled_dot_product_attention`, which routing
            # has made false, so hand it over the way that dispatch would.
            return CausalBias._dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        n_q = query.shape[-2] if isinstance(query, torch.Tensor) else 0
        n_k = key.shape[-2] if isinstance(key, torch.Tensor) else 0
        device = query.device if isinstance(query, torch.Tensor) else None
        attn_mask, is_causal = resolve_causal_bias(attn_mask, is_causal, n_q, n_k, device)
    if on and not kwargs:
        device_type = query.device.type if isinstance(query, torch.Tensor) else "cpu"
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
            query, key, value = _cast(query, dtype), _cast(key, dtype), _cast(value, dtype)
            if isinstance(attn_mask, torch.Tensor) and attn_mask.is_floating_point():
                attn_mask = attn_mask.to(dtype)
        if _supported(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
            return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if enable_gqa:
        kwargs["enable_gqa"] = True
    return _TORCH_SDPA(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)


# TorchScript compiles the functions a scripted module calls; the wrapper's **kwargs cannot be compiled, so scripted
# code keeps calling torch's builtin op (torch.jit.script(nn.MultiheadAttention(...)) works with routing on).
# Traced code runs the wrapper in Python and records what it ran.
try:
    from torch.jit._builtins import _register_builtin

    _register_builtin(routed_scaled_dot_product_attention, "aten::scaled_dot_product_attention")
except (ImportError, AttributeError):  # pragma: no cover - a torch without the builtin table
    pass


def _cast(t, dtype: torch.dtype):
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype:
        return t.to(dtype)
    return t


def _plain(t) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter) and not t.is_nested


def _supported(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    """True when metagpt_fast computes what torch would for these inputs (else torch's function runs)."""
    if not (_plain(query) and _plain(key) and _plain(value)):
        return False
    if query.dim() not in (3, 4) or key.dim() != query.dim() or value.dim() != query.dim():
        return False
    if query.dtype not in FLOAT_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return False
    if key.device != query.device or value.device != query.device:
        return False
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        return False
    if not isinstance(is_causal, bool) or (scale is not None and not isinstance(scale, (int, float))):
        return False
    q, k, v = (t.unsqueeze(1) if t.dim() == 3 else t for t in (query, key, value))
    (b, hq, nq, d), (bk, hk, nk, dk), (bv, hv, nv, _) = q.shape, k.shape, v.shape
    if bk != b or bv != b or dk != d or d == 0 or nv != nk or hv != hk:
        return False
    if hk != hq and not (enable_gqa and hk > 0 and hq % hk == 0):
        return False
    if attn_mask is not None:
        if not _plain(attn_mask) or is_causal or attn_mask.device != query.device or attn_mask.requires_grad:
            return False
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            return False
        mask_shape = tuple(attn_mask.shape)
        if query.dim() == 3 and attn_mask.dim() == 3:
            mask_shape = (mask_shape[0], 1, *mask_shape[1:])
        if len(mask_shape) > 4 or any(
            m != 1 and m != t for m, t in zip(reversed(mask_shape), reversed((b, hq, nq, nk)), strict=False)
        ):
            return False
    return True


def _install() -> None:
    if F.scaled_dot_product_attention is not routed_scaled_dot_product_attention:
        F.scaled_dot_product_attention = routed_scaled_dot_product_attention


def _uninstall_if_idle() -> None:
    idle = not _state["global"] and _state["contexts"] == 0
    if idle and F.scaled_dot_product_attention is routed_scaled_dot_product_attention:  # leave others' patches alone
        F.scaled_dot_product_attention = _TORCH_SDPA


def enable_sdpa_routing() -> None:
    """Routes ``torch.nn.functional.scaled_dot_product_attention`` through metagpt_fast process-wide."""
    with _lock:
        _state["global"] = True
        _install()


def disable_sdpa_routing() -> None:
    """Undoes :func:`enable_sdpa_routing` (active ``sdpa_routing()`` blocks keep routing until they exit)."""
    with _lock:
        _state["global"] = False
        _uninstall_if_idle()


def routing_sdpa() -> bool:
    """Whether a ``torch.nn.functional.scaled_dot_product_attention`` call made here would be routed."""
    on = _context.get()
    on = _state["global"] if on is None else on
    return bool(on) and F.scaled_dot_product_attention is routed_scaled_dot_product_attention


@contextlib.contextmanager
def sdpa_routing(enabled: bool = True) -> Iterator[None]:
    """Routes (or, with ``enabled=False``, stops routing) SDPA calls made inside the block, in this context only."""
    with _lock:
        _state["contexts"] += 1
        _install()
    token = _context.set(bool(enabled))
    try:
        yield
    finally:
        _context.reset(token)
        with _lock:
            _state["contexts"] -= 1
            _uninstall_if_idle()
