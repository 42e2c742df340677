"""Constants every layer shares, from the kernels up: a leaf module that imports nothing from the package.

- The dropout stream (specified in full, with a NumPy model, in ``ops/reference/random.py``): Philox-4x32-10 with
  Triton's ``tl.randint`` constants; an element is kept when ``(word >> 8) >= dropout_threshold(p)``. The C++/CUDA
  kernels keep the same constants in ``csrc/include/metagpt_fast/philox.h``.
- ``DEFAULT_BASE``: the sinusoid / rotary base, ``10000`` as in "Attention Is All You Need".
- ``MAX_GRID_YZ``: CUDA's limit on the 2nd and 3rd grid dimensions, which the kernels index by heads and batch.
"""

from __future__ import annotations

import os

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
SEED_MAX = 2**63 - 1

DEFAULT_BASE = 10000.0

MAX_GRID_YZ = 65535


def dropout_threshold(p: float) -> int:
    """The 24-bit integer threshold below which an element is dropped."""
    return min(1 << 24, int(round(p * (1 << 24))))


def triton_interpreted() -> bool:
    """Whether ``TRITON_INTERPRET`` asks Triton to run kernels on CPU tensors (read by triton when it is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
