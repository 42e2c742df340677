"""Backend registry: which implementation of an op runs for a given input.

Every op of the package (``attention``, ``embed_positions``, ``add_positional_encoding``, ``rotary``) has a pure
PyTorch ``reference`` implementation and may have fast implementations in the ``triton``, ``cuda`` and ``cpu``
backends. A backend module registers its implementations with :func:`register`; each implementation says *why* it
cannot serve an input through ``not_supported_reasons(**inputs) -> list[str]``.

Selection order for one call:

1. the ``backend=`` argument of the op or module, if it is not ``None`` or ``"auto"``;
2. else the innermost :func:`use_backend` context (context-local: threads and asyncio tasks do not see each other's);
3. else the ``METAGPT_FAST_BACKEND`` environment variable;
4. else ``"auto"``: the highest-priority available implementation with no reasons, falling back to ``reference``.

An explicitly requested backend that cannot serve the input raises :class:`ValueError` listing the reasons.
``auto`` never picks an interpreted Triton kernel (``TRITON_INTERPRET=1`` is for correctness, not speed).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

BACKENDS = ("reference", "triton", "cuda", "cpu")
OPS = ("attention", "embed_positions", "add_positional_encoding", "rotary")
ENV_VAR = "METAGPT_FAST_BACKEND"

# Modules that register a backend's implementations when imported. Imported lazily: triton reads TRITON_INTERPRET
# at import time, and importing it costs seconds.
_BACKEND_MODULES = {
    "reference": ("metagpt_fast.ops.reference.register",),
    "triton": ("metagpt_fast.ops.triton_backend",),
    "cpu": ("metagpt_fast.ops.cpp",),
    "cuda": ("metagpt_fast.ops.cpp", "metagpt_fast.ops.cuda_attention"),
}

_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar("metagpt_fast_backend", default=None)


@dataclasses.dataclass(frozen=True)
class Implementation:
    op: str
    backend: str
    fn: Callable[..., Any]
    # Returns why this implementation cannot serve these inputs; empty means it can.
    not_supported_reasons: Callable[..., list[str]]
    # Higher runs first under ``auto``.
    priority: int = 0
    # True when the implementation is correct but slow (interpreted Triton): never picked by ``auto``.
    slow: bool = False


_registry: dict[tuple[str, str], Implementation] = {}
_unavailable: dict[str, str | None] = {}
_loaded: set[str] = set()
_lock = threading.RLock()


def register(
    op: str,
    backend: str,
    fn: Callable[..., Any],
    not_supported_reasons: Callable[..., list[str]] | None = None,
    *,
    priority: int = 0,
    slow: bool = False,
) -> None:
    """Registers ``fn`` as ``backend``'s implementation of ``op`` (called by backend modules on import)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    with _lock:
        _registry[(op, backend)] = Implementation(
            op, backend, fn, not_supported_reasons or (lambda **_: []), priority, slow
        )


def mark_unavailable(backend: str, reason: str) -> None:
    """Records why ``backend`` cannot run at all on this machine (shown by ``metagpt-fast info``)."""
    with _lock:
        _unavailable[backend] = reason


def _load(backend: str) -> None:
    if backend in _loaded:  # checked before the lock: torch.compile traces this path and cannot trace a lock
        return
    with _lock:
        if backend in _loaded:
            return
        _loaded.add(backend)
        for module in _BACKEND_MODULES[backend]:
            try:
                importlib.import_module(module)
            except Exception as exc:  # a missing toolchain must never break the package
                logger.debug("backend %s failed to load: %r", backend, exc)
                _unavailable.setdefault(backend, f"{module} failed to import: {type(exc).__name__}: {exc}")


def available_backends() -> dict[str, str | None]:
    """Maps each backend name to ``None`` if it can run here, else to the reason it cannot."""
    result = {}
    for backend in BACKENDS:
        _load(backend)
        with _lock:
            reason = _unavailable.get(backend)
            if reason is None and not any(b == backend for (_, b) in _registry):
                reason = "no op implementations registered"
        result[backend] = reason
    return result


def _check_name(name: str, what: str) -> str:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{what} must be 'auto' or one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Selects ``name`` for every op called inside the ``with`` block of this thread / asyncio task."""
    token = _requested.set(_check_name(name, "backend"))
    try:
        yield
    finally:
        _requested.reset(token)


def requested_backend(backend: str | None = None) -> str:
    """The backend a call asks for: its own argument, else the context, else the environment, else ``auto``."""
    if backend is not None:
        return _check_name(backend, "backend")
    name = _requested.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env, f"environment variable {ENV_VAR}")
    return "auto"


def candidates(op: str) -> list[Implementation]:
    """Implementations of ``op`` on available backends, fastest first."""
    for backend in BACKENDS:
        _load(backend)
    # Reads without the lock (dict reads are atomic): torch.compile traces select() and cannot trace a lock.
    impls = [impl for (o, b), impl in _registry.items() if o == op and _unavailable.get(b) is None]
    return sorted(impls, key=lambda impl: -impl.priority)


def select(op: str, backend: str | None = None, **inputs: Any) -> Implementation:
    """Returns the implementation of ``op`` that serves ``inputs`` under the current backend request."""
    name = requested_backend(backend)
    if name != "auto":
        _load(name)
        reason = _unavailable.get(name)
        impl = _registry.get((op, name))
        if reason is not None:
            raise ValueError(f"backend {name!r} is unavailable: {reason}")
        if impl is None:
            raise ValueError(f"backend {name!r} has no implementation of op {op!r}")
        reasons = impl.not_supported_reasons(**inputs)
        if reasons:
            raise ValueError(f"backend {name!r} cannot run {op!r} on these inputs: " + "; ".join(reasons))
        return impl
    for impl in candidates(op):
        if impl.slow or impl.backend == "reference":
            continue
        reasons = impl.not_supported_reasons(**inputs)
        if not reasons:
            return impl
        logger.debug("auto: %s/%s skipped: %s", op, impl.backend, "; ".join(reasons))
    return _registry[(op, "reference")]


def explain(op: str, **inputs: Any) -> dict[str, list[str]]:
    """For each backend, the reasons it cannot run ``op`` on ``inputs`` (empty list: it can)."""
    result = {}
    for backend, unavailable in available_backends().items():
        impl = _registry.get((op, backend))
        if unavailable is not None:
            result[backend] = [unavailable]
        elif impl is None:
            result[backend] = [f"no implementation of {op!r}"]
        else:
            result[backend] = impl.not_supported_reasons(**inputs)
    return result


def _load_all_before_compiling(_args: Any) -> None:
    for backend in BACKENDS:
        _load(backend)


# torch.compile traces select(); importing a backend's modules cannot happen inside a trace, so every backend is
# loaded when a compilation starts (dynamo's start callback runs before tracing).
try:
    import torch._dynamo

    torch._dynamo.callback_handler.register_start_callback(_load_all_before_compiling)
except (ImportError, AttributeError) as _exc:  # pragma: no cover - older torch
    logger.debug("cannot preload backends for torch.compile: %r", _exc)
