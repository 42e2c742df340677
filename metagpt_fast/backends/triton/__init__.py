"""The ``triton`` backend: one module per op family, each registering its ``torch.library.triton_op``s.

Triton kernels need a CUDA GPU, or ``TRITON_INTERPRET=1`` set before triton is imported (CPU tensors, NumPy
underneath: for correctness tests only, so every implementation is then registered as slow and ``auto`` never picks
it). Importing this package imports every module in it when Triton can run, else records why it cannot.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

from metagpt_fast import _spec
from metagpt_fast.backends import registry

INTERPRETED = _spec.triton_interpreted()
DEVICES = ("cpu",) if INTERPRETED else ("cuda",)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Ampere's bf16 tensor cores and cp.async: the oldest GPU the kernels are tuned and tested for.
MIN_COMPUTE_CAPABILITY = (8, 0)


def capabilities(**kwargs) -> registry.Capabilities:
    """The capabilities every Triton kernel shares, plus the op's own (``kwargs``)."""
    return registry.Capabilities(**{"devices": DEVICES, "dtypes": DTYPES, **kwargs})


def interpreter_reasons(tensor: torch.Tensor) -> list[str]:
    """What the interpreter gets wrong: ``tl.dot`` on bfloat16 multiplies raw bit patterns."""
    if INTERPRETED and tensor.dtype == torch.bfloat16:
        return ["bfloat16 products are wrong under TRITON_INTERPRET (triton issue #11584)"]
    return []


def bfloat16_reasons(tensor: torch.Tensor) -> list[str]:
    """Elementwise kernels run on any CUDA GPU, but bfloat16 arithmetic needs Ampere."""
    if tensor.dtype == torch.bfloat16 and tensor.device.type == "cuda":
        capability = torch.cuda.get_device_capability(tensor.device)
        if capability < MIN_COMPUTE_CAPABILITY:
            return [f"bfloat16 needs compute capability >= 8.0, got {capability}"]
    return []


def register(op, fn, caps, extra_reasons=None, *, priority):
    """Registers a Triton implementation: slow (never picked by ``auto``) under the interpreter."""
    return registry.register(op, "triton", fn, caps, extra_reasons, priority=priority, slow=INTERPRETED)


def _unavailable_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if INTERPRETED or torch.cuda.is_available():
        return None
    return "no CUDA GPU (set TRITON_INTERPRET=1 before importing to run the kernels on CPU for testing)"


_reason = _unavailable_reason()
if _reason is not None:
    registry.mark_unavailable("triton", _reason)
else:
    for _module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{_module.name}")
