"""Input checks shared by the public ops: every failure names the argument, what was expected and what came.

Failures raise :class:`ArgumentError` (a ``ValueError``) or :class:`ArgumentTypeError` (a ``TypeError``); both are
also ``RuntimeError``s, which is what torch's own ops raise for the same inputs, so code written against either
convention keeps catching them after a drop-in swap.
"""

from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ArgumentError(ValueError, RuntimeError):
    """A bad argument value (shape, range, combination)."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype."""


def tensor(name: str, value, *, dims: tuple[int, ...] | None = None, floating: bool = False) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dims is not None and value.dim() not in dims:
        expected = " or ".join(str(d) for d in dims)
        raise ArgumentError(f"{name} must have {expected} dimensions, got shape {tuple(value.shape)}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise ArgumentTypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    return value


# Tensor types that hold plain values: parameters, and the fake / functional tensors of torch.compile and
# torch.library.opcheck traces. Any other subclass (a CausalBias, DTensor, a quantised wrapper) has its own meaning.
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter, FakeTensor, FunctionalTensor)


def plain_tensor(name: str, t: torch.Tensor) -> None:
    """Refuses tensor subclasses, nested tensors and layouts other than strided (sparse, mkldnn), whose storage is
    not what a kernel would read it as."""
    if type(t) not in _PLAIN_TYPES or t.is_nested:
        kind = "a nested tensor" if type(t) in _PLAIN_TYPES else f"a {type(t).__module__}.{type(t).__name__}"
        raise ArgumentTypeError(f"{name} is {kind}, a tensor subclass metagpt_fast does not read; pass a plain tensor")
    if t.layout is not torch.strided:
        layout = str(t.layout).removeprefix("torch.")
        raise ArgumentTypeError(
            f"{name} is a {layout} tensor; metagpt_fast reads strided tensors only: pass .to_dense()"
        )


def same_device(**tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ArgumentError(f"all tensors must be on one device, got {listed}")


def same_dtype(**tensors: torch.Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        raise ArgumentTypeError(f"tensors must share one dtype, got {listed}")


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{name} must be a float in [0, 1), got {type(value).__name__}")
    if not 0.0 <= value < 1.0:
        raise ArgumentError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def finite_float(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        kind = "a finite positive" if positive else "a finite"
        raise ArgumentError(f"{name} must be {kind} number, got {value}")
    return float(value)


def integer(name: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, torch.SymInt):
            return value
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {value}")
    return value


def broadcastable(name: str, shape: torch.Size, target: tuple[int, ...]) -> None:
    ok = len(shape) <= len(target) and all(
        s == 1 or s == t for s, t in zip(reversed(tuple(shape)), reversed(target), strict=False)
    )
    if not ok:
        raise ArgumentError(f"{name} of shape {tuple(shape)} is not broadcastable to {target}")


def token_ids(name: str, tokens, vocab_size: int) -> torch.Tensor:
    tensor(name, tokens)
    if tokens.dtype not in (torch.int32, torch.int64):  # the index dtypes torch's embedding accepts
        raise ArgumentTypeError(f"{name} must hold integer token ids (int64 or int32), got {tokens.dtype}")
    if tokens.numel() and not _is_fake(tokens):
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ArgumentError(f"{name} must lie in [0, {vocab_size}), found token id {bad}")
    return tokens


def writable(name: str, t: torch.Tensor) -> None:
    """For in-place outputs: every element of ``t`` must have its own memory (no expanded, stride-0 dimension)."""
    if any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride(), strict=True)):
        raise ArgumentError(
            f"{name} is written in place but has a broadcast (stride 0) dimension, shape {tuple(t.shape)} strides "
            f"{t.stride()}: pass a tensor whose elements do not share memory (e.g. .clone())"
        )


def _is_fake(t: torch.Tensor) -> bool:
    """True for tensors without data (meta, fake tensors under torch.compile): value checks are skipped for them."""
    if t.device.type == "meta":
        return True
    from torch._subclasses.fake_tensor import is_fake

    # is_compiling first: dynamo cannot trace into is_fake (a graph break under fullgraph=True).
    return torch.compiler.is_compiling() or is_fake(t)
