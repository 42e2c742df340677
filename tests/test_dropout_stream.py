"""The Triton dropout helper draws exactly the reference Philox stream (so masks agree across backends)."""

import numpy as np
import pytest
import torch

from metagpt_fast.ops.reference.random import dropout_keep_mask, dropout_threshold, philox_word

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from metagpt_fast.kernels.triton.dropout import dropout_keep  # noqa: E402


@triton.jit
def _keep_kernel(out_ptr, seed_ptr, base, n, THRESHOLD, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = dropout_keep(tl.load(seed_ptr), base + offs.to(tl.int64), THRESHOLD)
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=offs < n)


def _reference_keep(seed: int, offsets: np.ndarray, p: float) -> torch.Tensor:
    words = philox_word(seed, offsets)
    return torch.from_numpy((words >> np.uint64(8)) >= np.uint64(dropout_threshold(p)))


def test_philox_reference_known_values():
    # Philox-4x32-10, key (0, 0), counters 0..3: first words, fixed so a change to the reference is caught.
    np.testing.assert_array_equal(philox_word(0, np.arange(4)), [1713891541, 4175744164, 83534633, 3381718825])


def test_keep_mask_is_the_stream_in_contiguous_order():
    mask = dropout_keep_mask(7, (4, 5), 0.3)
    assert mask.shape == (4, 5)
    assert torch.equal(mask.flatten(), _reference_keep(7, np.arange(20, dtype=np.uint64), 0.3))


@pytest.mark.parametrize("seed", [0, 123456789012345, 2**63 - 1])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_triton_dropout_matches_reference(seed, p):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, base = 1000, 2**32 - 500  # crosses the 32-bit boundary of the counter
    out = torch.empty(n, dtype=torch.int8, device=device)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    _keep_kernel[(triton.cdiv(n, 256),)](out, seed_t, base, n, dropout_threshold(p), BLOCK=256)
    expected = _reference_keep(seed, np.arange(base, base + n, dtype=np.uint64), p)
    assert torch.equal(out.bool().cpu(), expected)
    assert abs(expected.float().mean().item() - (1 - p)) < 0.06
