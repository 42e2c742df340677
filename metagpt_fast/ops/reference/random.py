"""The dropout random stream every backend shares, written out in plain NumPy so tests can rebuild exact masks.

Each fast kernel (Triton, CUDA, C++ CPU) draws dropout decisions from the same counter-based generator, so the
same ``seed`` gives the same mask on every backend and in the backward pass (nothing is stored):

- generator: Philox-4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) —
  the constants Triton's ``tl.randint`` uses;
- key ``(seed & 0xffffffff, seed >> 32)``, counter ``(offset & 0xffffffff, offset >> 32, 0, 0)``, output: the first
  32-bit word;
- ``offset`` is the element's linear index in the contiguous output of the op: ``((b*H + h)*Nq + i)*Nk + j`` for
  attention probabilities, ``(b*T + t)*D + d`` for the positional ops;
- an element is **kept** when ``(word >> 8) >= threshold`` with ``threshold = round(p * 2**24)`` (integer compare,
  no float rounding differences between backends); kept values are scaled by ``1 / (1 - p)``.
"""

from __future__ import annotations

import numpy as np
import torch

# The stream's constants and threshold live in the package's leaf module, which the kernels import; this module
# re-exports them with the stream's NumPy model.
from metagpt_fast._spec import (
    MASK32,
    PHILOX_KEY_A,
    PHILOX_KEY_B,
    PHILOX_ROUND_A,
    PHILOX_ROUND_B,
    PHILOX_ROUNDS,
    SEED_MAX,
    dropout_threshold,
)

__all__ = [
    "MASK32",
    "PHILOX_KEY_A",
    "PHILOX_KEY_B",
    "PHILOX_ROUNDS",
    "PHILOX_ROUND_A",
    "PHILOX_ROUND_B",
    "SEED_MAX",
    "dropout_keep_mask",
    "dropout_threshold",
    "new_seed",
    "philox_word",
]


def philox_word(seed: int, offsets: np.ndarray) -> np.ndarray:
    """First 32-bit output word of Philox-4x32-10 for each offset (uint64 array), as uint64."""
    offsets = offsets.astype(np.uint64)
    m = np.uint64(MASK32)
    c0, c1 = offsets & m, offsets >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0 = np.uint64(seed & MASK32)
    k1 = np.uint64((seed >> 32) & MASK32)
    a, b = np.uint64(PHILOX_ROUND_A), np.uint64(PHILOX_ROUND_B)
    for _ in range(PHILOX_ROUNDS):
        prod_b = b * c2  # < 2**64: exact in uint64
        prod_a = a * c0
        c0, c1, c2, c3 = (
            (prod_b >> np.uint64(32)) ^ c1 ^ k0,
            prod_b & m,
            (prod_a >> np.uint64(32)) ^ c3 ^ k1,
            prod_a & m,
        )
        k0 = (k0 + np.uint64(PHILOX_KEY_A)) & m
        k1 = (k1 + np.uint64(PHILOX_KEY_B)) & m
    return c0


def dropout_keep_mask(seed: int | torch.Tensor, shape: tuple[int, ...], p: float, device=None) -> torch.Tensor:
    """Boolean keep-mask of ``shape`` (elements indexed in contiguous order) that every backend draws for ``seed``."""
    if isinstance(seed, torch.Tensor):
        seed = int(seed.reshape(-1)[0].item())
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    words = philox_word(seed, np.arange(numel, dtype=np.uint64))
    keep = (words >> np.uint64(8)) >= np.uint64(dropout_threshold(p))
    return torch.from_numpy(keep.reshape(shape)).to(device)


def new_seed(device: torch.device | str) -> torch.Tensor:
    """A fresh dropout seed drawn from torch's generator for ``device`` (so ``torch.manual_seed`` reproduces it).

    Returned as a one-element int64 tensor on ``device``: kernels read it from memory, and ``torch.compile`` traces
    its creation without a graph break.
    """
    return torch.randint(0, SEED_MAX, (1,), dtype=torch.int64, device=device)
