"""Registers the Triton backend's implementations, or records why it cannot run here.

Triton kernels need a CUDA GPU, or ``TRITON_INTERPRET=1`` set before triton is imported (CPU tensors, NumPy
underneath: for correctness tests only, so ``auto`` never picks it).
"""

from __future__ import annotations

import os

import torch

from metagpt_fast import backends


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
    from metagpt_fast.ops import triton_attention, triton_positional  # noqa: F401  (registers on import)
