"""Registers the Triton backend's implementations, or records why it cannot run here.

Triton kernels need a CUDA GPU, or ``TRITON_INTERPRET=1`` set before triton is imported (CPU tensors, NumPy
underneath: for correctness tests only, so ``auto`` never picks it).
"""

from __future__ import annotations

import importlib
import os

import torch

from metagpt_fast import backends

# One module per kernel family; each registers its ops with the registry when imported.
OP_MODULES = ("metagpt_fast.ops.triton_attention", "metagpt_fast.ops.triton_positional")


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _unavailable_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if interpreted() or torch.cuda.is_available():
        return None
    return "no CUDA GPU (set TRITON_INTERPRET=1 before importing to run the kernels on CPU for testing)"


_reason = _unavailable_reason()
if _reason is not None:
    backends.mark_unavailable("triton", _reason)
else:
    for _module in OP_MODULES:
        importlib.import_module(_module)
