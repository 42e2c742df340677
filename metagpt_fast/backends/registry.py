"""Backend registry: which implementation of an op runs for a given input.

Every op (``attention``, ``embed_positions``, ``add_positional_encoding``, ``rotary``) is declared once by its public
module in ``metagpt_fast/ops/`` with :func:`declare_op`, which also registers its pure PyTorch ``reference``
implementation. Fast implementations live in one module per (backend, op) under ``metagpt_fast/backends/`` and
register with :func:`register`, declaring what they serve as :class:`Capabilities` (devices, dtypes, head dims,
compute capability, optional features). The generic reasons against an input are derived from those; an
implementation adds op-specific ones (grid limits, position ranges, aliasing) through ``extra_reasons``.

Selection order for one call:

1. the ``backend=`` argument of the op or module, if it is not ``None`` or ``"auto"``;
2. else the innermost :func:`use_backend` context (context-local: threads and asyncio tasks do not see each other's);
3. else the ``METAGPT_FAST_BACKEND`` environment variable;
4. else ``"auto"``: of the implementations with no reasons against the input, the one with the highest priority for
   it (priorities depend on the device, its compute capability and the input; each is justified where it is set).
   The reference has priority 0, so a kernel ranked below it for some input is never picked there.

An explicitly requested backend that cannot serve the input raises :class:`ValueError` listing the reasons.
``auto`` never picks a slow implementation (interpreted Triton: ``TRITON_INTERPRET=1`` is for correctness, not speed).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from metagpt_fast.backends.signature import Memo, signature

logger = logging.getLogger("metagpt_fast.backends")

# Backend name -> the package whose import registers its implementations (or records why it cannot run). Imported
# lazily: triton reads TRITON_INTERPRET at import time, and importing it costs seconds. ``cpu`` and ``cuda`` are the
# compiled extension's ops on two devices; the reference is registered by each op's declaration.
BACKEND_PACKAGES: dict[str, str | None] = {
    "reference": None,
    "triton": "metagpt_fast.backends.triton",
    "cuda": "metagpt_fast.backends.compiled",
    "cpu": "metagpt_fast.backends.compiled",
}
BACKENDS = tuple(BACKEND_PACKAGES)
ENV_VAR = "METAGPT_FAST_BACKEND"
REFERENCE_PRIORITY = 0

_requested: contextvars.ContextVar[str | None] = contextvars.ContextVar("metagpt_fast_backend", default=None)


# ------------------------------------------------------------------------------------------------------ declarations


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """What the registry knows of an op, to derive the generic reasons from an implementation's capabilities."""

    name: str
    # The input whose device and dtype decide (every other floating input must match it; the public op checks).
    primary: str
    # The head dims an input has (query/key and value for attention), or None when the op has none.
    head_dims: Callable[[Mapping[str, Any]], tuple[int, ...]] | None = None
    # Optional features of an input: name -> (what it is, whether an input uses it). An implementation lists the
    # ones it serves; an input using another one is refused with the description.
    features: Mapping[str, tuple[str, Callable[[Mapping[str, Any]], bool]]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What an implementation serves. Every field is checked by :func:`generic_reasons`."""

    devices: tuple[str, ...]  # device types whose tensors it takes here ("cpu", "cuda")
    dtypes: tuple[torch.dtype, ...] | None = None  # None: any floating dtype
    min_compute_capability: tuple[int, int] | None = None  # on CUDA devices
    max_head_dim: int | None = None
    head_dims: tuple[int, ...] | None = None  # exactly these (compiled kernels), all of an input's head dims equal
    features: frozenset[str] = frozenset()  # the op's optional features it serves; an input using another is refused


@dataclasses.dataclass(frozen=True)
class Implementation:
    op: str
    backend: str
    fn: Callable[..., Any]
    capabilities: Capabilities
    # Op-specific reasons on top of the generic ones (same keyword inputs as ``fn`` less ``seed``).
    extra_reasons: Callable[..., list[str]] | None = None
    # auto's ranking for an input: higher runs first; the reference is 0.
    priority: Callable[[Mapping[str, Any]], int] = lambda inputs: 0
    # Correct but slow (interpreted Triton): never picked by ``auto``.
    slow: bool = False

    @property
    def devices(self) -> tuple[str, ...]:
        return self.capabilities.devices

    def not_supported_reasons(self, **inputs: Any) -> list[str]:
        """Why this implementation cannot serve ``inputs``; empty when it can."""
        reasons = generic_reasons(_ops[self.op], self.backend, self.capabilities, inputs)
        if self.extra_reasons is not None:
            reasons += self.extra_reasons(**inputs)
        return reasons


_ops: dict[str, OpSpec] = {}
_registry: dict[tuple[str, str], Implementation] = {}
# op -> its non-reference implementations, in registration order: what ``auto`` ranks on every call (rebuilt lazily
# after any change to ``_registry``; scanning every op's entries cost about a third of a small op's dispatch).
_candidates: dict[str, tuple[Implementation, ...]] = {}
# (op, requested backend, input names, signature of the inputs) -> the implementation select() returned: every
# reason and priority reads only what the signature holds (device, dtype, shapes, strides, requires_grad, aliasing,
# scalars, grad mode), so the same signature gets the same answer until the registry changes. Replaced, not cleared,
# on every change: a select() that started before the change writes into the old dict, which nothing reads.
_selections: Memo = Memo()
_unavailable: dict[str, str | None] = {}
_loaded: set[str] = set()
_lock = threading.RLock()

ANY_DEVICE = ("cpu", "cuda", "mps", "xpu", "meta")


def declare_op(spec: OpSpec, reference: Callable[..., Any]) -> OpSpec:
    """Declares an op and registers its reference implementation (serves every valid input, on every device)."""
    with _lock:
        _ops[spec.name] = spec
        _changed()
        _registry[(spec.name, "reference")] = Implementation(
            spec.name, "reference", reference, Capabilities(devices=ANY_DEVICE, features=frozenset(spec.features)),
            priority=lambda inputs: REFERENCE_PRIORITY,
        )  # fmt: skip
    return spec


def register(
    op: str,
    backend: str,
    fn: Callable[..., Any],
    capabilities: Capabilities,
    extra_reasons: Callable[..., list[str]] | None = None,
    *,
    priority: int | Callable[[Mapping[str, Any]], int],
    slow: bool = False,
) -> Implementation:
    """Registers ``fn`` as ``backend``'s implementation of ``op`` (called by backend modules on import); returns it.

    ``priority`` is a number, or a function of the inputs for rankings that depend on the device or the shape.
    """
    if op not in _ops:
        raise ValueError(f"op must be one of {tuple(_ops)}, got {op!r}")
    if backend not in BACKENDS or backend == "reference":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    unknown = capabilities.features - set(_ops[op].features)
    if unknown:
        raise ValueError(f"{op!r} has no features {sorted(unknown)}; it has {sorted(_ops[op].features)}")
    rank = priority if callable(priority) else (lambda inputs, value=priority: value)
    impl = Implementation(op, backend, fn, capabilities, extra_reasons, rank, slow)
    with _lock:
        _registry[(op, backend)] = impl
        _changed()
    return impl


@contextlib.contextmanager
def registered(impl: Implementation) -> Iterator[Implementation]:
    """Puts ``impl`` in the registry for the ``with`` block, then restores what was there (tests, experiments)."""
    _load(impl.backend)
    key = (impl.op, impl.backend)
    with _lock:
        previous, unavailable = _registry.get(key), _unavailable.pop(impl.backend, None)
        _registry[key] = impl
        _changed()
    try:
        yield impl
    finally:
        with _lock:
            if previous is None:
                _registry.pop(key, None)
            else:
                _registry[key] = previous
            if unavailable is not None:
                _unavailable[impl.backend] = unavailable
            _changed()


def mark_unavailable(backend: str, reason: str) -> None:
    """Records why ``backend`` cannot run at all on this machine (shown by ``metagpt-fast info``)."""
    with _lock:
        _unavailable.setdefault(backend, reason)
        _changed()


def invalidate() -> None:
    """Forgets every cached selection: for changes the registry cannot see (a new measured speed table)."""
    with _lock:
        _changed()


def _changed() -> None:
    """After any change to what selection reads (ops, implementations, unavailable backends): the per-op index is
    rebuilt and the selection cache starts empty."""
    global _selections
    _candidates.clear()
    _selections = Memo()


# ---------------------------------------------------------------------------------------------------------- reasons


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def generic_reasons(spec: OpSpec, backend: str, caps: Capabilities, inputs: Mapping[str, Any]) -> list[str]:
    """The reasons ``caps`` gives against ``inputs``: device, compute capability, dtype, head dims, features."""
    reasons = []
    tensor = inputs[spec.primary]
    device = tensor.device
    if device.type not in caps.devices:
        reasons.append(
            f"{spec.primary} is on {device}; the {backend} backend takes {' or '.join(caps.devices)} tensors"
        )
    elif device.type == "cuda" and caps.min_compute_capability is not None:
        capability = torch.cuda.get_device_capability(device)
        if capability < caps.min_compute_capability:
            reasons.append(f"needs compute capability >= {caps.min_compute_capability}, got {capability}")
    if caps.dtypes is not None and tensor.dtype not in caps.dtypes:
        reasons.append(f"{spec.primary} has dtype {tensor.dtype}; {backend} supports {_names(caps.dtypes)}")
    if spec.head_dims is not None and (caps.max_head_dim is not None or caps.head_dims is not None):
        dims = spec.head_dims(inputs)
        if caps.max_head_dim is not None and max(dims) > caps.max_head_dim:
            reasons.append(f"head dims up to {caps.max_head_dim}, got {dims}")
        if caps.head_dims is not None and (dims[0] not in caps.head_dims or len(set(dims)) > 1):
            reasons.append(f"head dims in {caps.head_dims}, all equal, got {dims}")
    for feature, (description, used) in spec.features.items():
        if feature not in caps.features and used(inputs):
            reasons.append(f"{description}: not served by {backend}")
    return reasons


# -------------------------------------------------------------------------------------------------------- selection


def _load(backend: str) -> None:
    if backend in _loaded:  # checked before the lock: torch.compile traces this path and cannot trace a lock
        return
    with _lock:
        if backend in _loaded:
            return
        _loaded.add(backend)
        package = BACKEND_PACKAGES[backend]
        if package is None:
            return
        try:
            importlib.import_module(package)
        except Exception as exc:  # a missing toolchain must never break the package
            logger.debug("backend %s failed to load: %r", backend, exc)
            _unavailable.setdefault(backend, f"{package} failed to import: {type(exc).__name__}: {exc}")


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


def ops() -> tuple[str, ...]:
    """The declared ops."""
    return tuple(_ops)


def lookup(op: str, backend: str) -> Implementation | None:
    """``backend``'s registered implementation of ``op``, whether or not the backend can run here."""
    _load(backend)
    return _registry.get((op, backend))


def implementations(op: str) -> list[Implementation]:
    """The implementations of ``op`` on the backends that can run here, in :data:`BACKENDS` order."""
    if op not in _ops:
        raise ValueError(f"op must be one of {tuple(_ops)}, got {op!r}")
    available = available_backends()
    return [_registry[(op, b)] for b in BACKENDS if available[b] is None and (op, b) in _registry]


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


def select(op: str, backend: str | None = None, **inputs: Any) -> Implementation:
    """Returns the implementation of ``op`` that serves ``inputs`` under the current backend request.

    The answer for a signature of the inputs (:func:`metagpt_fast.backends.signature.signature`) is cached until the
    registry changes; inputs without one (tensor subclasses, traces) are ranked on every call. A refusal (an explicit
    backend that cannot serve the inputs) is never cached: it raises on every call."""
    name = requested_backend(backend)
    key = signature(*inputs.values())
    if key is None:
        return _select(op, name, inputs)
    selections = _selections
    key = (op, name, tuple(inputs), key)
    impl = selections.get(key)
    if impl is None:
        impl = selections.put(key, _select(op, name, inputs))
    return impl


def select_signed(op: str, backend: str | None, key: tuple | None, inputs: dict[str, Any]) -> Implementation:
    """:func:`select` for a public op that has computed the signature of its call already (to memoise its own
    checks): ``key`` must determine the signature of ``inputs`` (``inputs`` a function of the arguments ``key`` was
    computed from, the op's name among them), or be ``None`` (no caching)."""
    name = requested_backend(backend)
    if key is None:
        return _select(op, name, inputs)
    selections = _selections
    key = (op, name, key)
    impl = selections.get(key)
    if impl is None:
        impl = selections.put(key, _select(op, name, inputs))
    return impl


def _select(op: str, name: str, inputs: dict[str, Any]) -> Implementation:
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
    for backend_name in BACKENDS:
        _load(backend_name)
    # Reads without the lock (dict reads are atomic): torch.compile traces select() and cannot trace a lock.
    best = _registry[(op, "reference")]
    best_priority = REFERENCE_PRIORITY
    candidates = _candidates.get(op)
    if candidates is None:
        candidates = _candidates_of(op)
    for impl in candidates:
        if impl.slow or _unavailable.get(impl.backend) is not None:
            continue
        priority = impl.priority(inputs)
        if priority <= best_priority:
            continue
        reasons = impl.not_supported_reasons(**inputs)
        if reasons:
            logger.debug("auto: %s/%s skipped: %s", op, impl.backend, "; ".join(reasons))
            continue
        best, best_priority = impl, priority
    return best


def _candidates_of(op: str) -> tuple[Implementation, ...]:
    candidates = tuple(impl for (o, b), impl in list(_registry.items()) if o == op and b != "reference")
    _candidates[op] = candidates
    return candidates


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
    for op in list(_ops):  # so a traced select() only reads the index
        _candidates_of(op)


# torch.compile traces select(); importing a backend's modules cannot happen inside a trace, so every backend is
# loaded when a compilation starts (dynamo's start callback runs before tracing).
try:
    import torch._dynamo

    torch._dynamo.callback_handler.register_start_callback(_load_all_before_compiling)
except (ImportError, AttributeError) as _exc:  # pragma: no cover - older torch
    logger.debug("cannot preload backends for torch.compile: %r", _exc)
