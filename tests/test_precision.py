"""Precision where float32 runs out: the Triton sinusoid far from position 0, and the cpu attention's saved row
statistics when scores sit at float32's extremes.

The Triton kernels form the angle ``pos * base^(-2i/d)`` and reduce it modulo 2*pi in float64, then take sin/cos
of the reduced float32 angle (``metagpt_fast/kernels/triton/sinusoid.py``), as the C++ kernels do. A float32 angle
(inverse frequency and product rounded to float32) was off by up to ``2 * pos * 2**-24`` rad: 3.7e-3 in sin/cos on
these inputs at offset 100000, 3.5e-2 at 1000003. These tests hold the encoding and the rotation within 1e-5 of
float64 there, through the offset and through ``position_ids``. Under the interpreter on CPU, compiled on a GPU.

The cpu attention saves the row maximum and log of the row sum apart when the mask is additive (lse
``(2, B, Hq, Nq)``): a row at ``finfo.min`` has ``|m| ~ 3.4e38``, where ``m + log(l)`` rounds back to ``m``. Its
parity with the reference on such rows is in ``tests/test_nan_policy.py``; here, the contract (shape, values, fake
kernel) of the compiled op.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import AVAILABLE_BACKENDS, device_for

import metagpt_fast
from metagpt_fast.ops import reference

requires_triton = pytest.mark.skipif("triton" not in AVAILABLE_BACKENDS, reason="triton is not available here")
requires_cpu_backend = pytest.mark.skipif("cpu" not in AVAILABLE_BACKENDS, reason="the compiled extension is not here")

TOLERANCE = 1e-5
OFFSETS = [100_000, 1_000_003]


def max_abs_error(fast: torch.Tensor, exact: torch.Tensor) -> float:
    return float((fast.double().cpu() - exact.double().cpu()).abs().max())


@requires_triton
@pytest.mark.parametrize("offset", OFFSETS)
def test_triton_positional_encoding_far_offset_within_1e_5_of_float64(offset):
    device = device_for("triton")
    x = torch.zeros(1, 9, 64, device=device)  # the encoding itself: every frequency, 9 positions
    out = metagpt_fast.add_positional_encoding(x, offset=offset, backend="triton")
    exact = reference.add_positional_encoding(x.double(), offset, 0.0)
    assert max_abs_error(out, exact) <= TOLERANCE
    tokens = torch.zeros(1, 9, dtype=torch.long, device=device)
    weight = torch.zeros(3, 64, device=device)
    out = metagpt_fast.embed_positions(tokens, weight, offset=offset, backend="triton")
    assert max_abs_error(out, exact) <= TOLERANCE


@requires_triton
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("interleaved", [False, True])
def test_triton_rotary_far_offset_within_1e_5_of_float64(offset, interleaved):
    device = device_for("triton")
    gen = torch.Generator().manual_seed(0)
    q = (torch.rand(1, 2, 9, 64, generator=gen) * 2 - 1).to(device)  # |x1| + |x2| <= 2
    k = (torch.rand(1, 1, 9, 64, generator=gen) * 2 - 1).to(device)
    exact = reference.apply_rotary(q.double(), k.double(), None, offset, 64, 10000.0, interleaved)
    by_offset = metagpt_fast.apply_rotary(q, k, offset=offset, interleaved=interleaved, backend="triton")
    position_ids = torch.arange(offset, offset + 9, device=device)
    by_ids = metagpt_fast.apply_rotary(q, k, position_ids, interleaved=interleaved, backend="triton")
    for got in (by_offset, by_ids):
        for fast, ref in zip(got, exact, strict=True):
            assert max_abs_error(fast, ref) <= 2 * TOLERANCE  # an angle within 1e-5, times |x1| + |x2| <= 2


@requires_cpu_backend
def test_cpu_attention_saves_max_and_log_sum_apart_with_an_additive_mask():
    from metagpt_fast.backends.compiled import attention  # noqa: F401  (the op's fake kernel)

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, generator=gen) for _ in range(3))
    mask = torch.randn(5, 5, generator=gen)
    mask[1] = torch.finfo(torch.float32).min  # a row of scores at -3.4e38: a uniform softmax
    mask[3] = -torch.inf  # an empty row
    out, lse = torch.ops.metagpt_fast.attention_fwd(q, k, v, mask, 0.0, False, 0.5, None)
    assert lse.shape == (2, 1, 2, 5)
    scores = (q @ k.transpose(-1, -2)).double() * 0.5 + mask.double()
    rows = [0, 2, 4]
    torch.testing.assert_close(lse[0][..., rows].double(), scores.amax(-1)[..., rows], atol=1e-5, rtol=1e-6)
    log_sum = torch.logsumexp(scores - scores.amax(-1, keepdim=True), -1)
    torch.testing.assert_close(lse[1][..., rows].double(), log_sum[..., rows], atol=1e-5, rtol=1e-6)
    # The finfo.min row: its scores round to one float32 value, so its sum is 5 and the probabilities 1/5.
    assert torch.allclose(lse[1][..., 1], torch.full((1, 2), math.log(5.0)), atol=1e-6)
    assert torch.isinf(lse[0][..., 3]).all() and (lse[0][..., 3] > 0).all() and (lse[1][..., 3] == 0).all()
    args = (torch.randn_like(out), q, k, v, out, lse, mask, 0.0, False, 0.5, None)
    dq, dk, dv = torch.ops.metagpt_fast.attention_bwd(*args)
    assert (dq[..., 3, :] == 0).all() and torch.isfinite(dq).all()
    with pytest.raises(RuntimeError, match="lse must be float32"):
        torch.ops.metagpt_fast.attention_bwd(*args[:5], lse[0], *args[6:])
    # The fake kernel gives the same shapes (opcheck compares it with the real one).
    fwd_args = (q.clone().requires_grad_(), k, v, mask, 0.0, False, 0.5, None)
    torch.library.opcheck(torch.ops.metagpt_fast.attention_fwd.default, fwd_args)
    torch.library.opcheck(torch.ops.metagpt_fast.attention_bwd.default, args)
