"""The parity harness itself (metagpt_fast.testing): the rule accepts a result within twice the reference's error and
rejects one at three times it, in float32 and float16; its floor, its fallback without a reference run, the check of
every output and gradient, and the attention-backward slack."""

from __future__ import annotations

import math

import pytest
import torch

from metagpt_fast.testing import (
    FLOAT32_ATOL_ULPS,
    assert_parity,
    attention_backward_slack,
    check_against_reference,
    max_error,
    oracle_dtype,
    parity_atol,
    parity_bound,
)


def test_oracle_is_one_precision_up():
    assert oracle_dtype(torch.float16) == oracle_dtype(torch.bfloat16) == torch.float32
    assert oracle_dtype(torch.float32) == oracle_dtype(torch.float64) == torch.float64


# Errors far above the floor, on values exactly representable in the result's dtype (so the comparison is exact):
# float32 around 100 (floor 16 * 2**-24 * 100 ~ 1e-4), float16 around 1 (floor 1e-3).
CASES = {torch.float32: (100.0, 2.0**-6, torch.float64), torch.float16: (1.0, 2.0**-6, torch.float32)}


@pytest.mark.parametrize("dtype", list(CASES), ids=["fp32", "fp16"])
def test_rule_accepts_twice_the_reference_error_and_rejects_three_times(dtype):
    size, step, up = CASES[dtype]
    oracle = torch.full((5,), size, dtype=up)
    offsets = torch.tensor([0.0, 1.0, -1.0, 0.5, 0.0], dtype=up) * step
    ref = (oracle + offsets).to(dtype)
    assert max_error(ref, oracle) == step
    assert_parity((oracle + 2 * offsets).to(dtype), ref, oracle, name="2x")
    with pytest.raises(AssertionError, match="3x"):
        assert_parity((oracle + 3 * offsets).to(dtype), ref, oracle, name="3x")
    # A documented slack is added to the bound, not to the measurement.
    assert_parity((oracle + 3 * offsets).to(dtype), ref, oracle, name="3x", extra=step)
    assert parity_bound(ref, oracle, dtype) == 2 * step + parity_atol(oracle, dtype)


def test_float32_floor_scales_with_the_result():
    """Where the reference is exact, float32 gets a few roundings of the largest value: a fixed 1e-5 would be 168 of
    them at size 1 and let a 1e-3 relative error through at size 1e-3."""
    for size in (1e-3, 1.0, 1e3):
        oracle = torch.full((4,), size, dtype=torch.float64) * torch.tensor([1.0, -0.5, 0.25, 0.0], dtype=torch.float64)
        ref = oracle.float()  # one rounding: the best float32 can do
        floor = parity_atol(oracle, torch.float32)
        assert floor == pytest.approx(FLOAT32_ATOL_ULPS * 2**-24 * size)
        assert_parity(oracle.float() * (1 + 4 * 2**-24), ref, oracle, name="a few ulps")
        with pytest.raises(AssertionError):
            assert_parity(oracle.float() * (1 + 1e-3), ref, oracle, name="1e-3 relative")


def test_a_result_is_never_its_own_yardstick():
    """Passed as its own reference, a result would pass against any oracle (its error is the bound's half); the
    check falls back on the fixed tolerance instead, as it does without a reference run."""
    oracle = torch.linspace(-2, 2, 9, dtype=torch.float64)
    off = (oracle + 1e-3).float()
    for ref in (off, None, oracle):
        with pytest.raises(AssertionError, match="no reference run"):
            assert_parity(off, ref, oracle, name="off")
    assert_parity((oracle + 5e-6).float(), None, oracle, name="inside the fixed tolerance")
    with pytest.raises(AssertionError, match="no reference run"):
        assert_parity((oracle + 2e-3).half(), None, oracle.float(), name="half")


def test_nan_errors_fail_and_matching_nans_pass():
    oracle = torch.tensor([1.0, math.nan], dtype=torch.float64)
    assert_parity(oracle.float(), oracle.float(), oracle, name="same NaNs")
    with pytest.raises(AssertionError):
        assert_parity(torch.tensor([math.nan, math.nan]), oracle.float(), oracle, name="extra NaN")


def test_autocast_results_held_in_float32_get_their_computation_floor():
    oracle = torch.zeros(3, dtype=torch.float64)
    ref = torch.zeros(3)  # the bfloat16 reference happened to be exact
    fast = torch.full((3,), 5e-3)
    with pytest.raises(AssertionError):
        assert_parity(fast, ref, oracle, name="float32 floor")
    assert_parity(fast, ref, oracle, name="bfloat16 floor", dtype=torch.bfloat16)


def _softmax_by_hand(x):
    """Softmax computed in float32 whatever the input dtype, as the kernels do, rounded to the input's dtype."""
    x32 = x.float()
    e = torch.exp(x32 - x32.amax(-1, keepdim=True))
    return (e / e.sum(-1, keepdim=True)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_check_against_reference_covers_outputs_and_every_gradient(dtype):
    x = torch.randn(3, 17, generator=torch.Generator().manual_seed(0)).to(dtype) * 4

    def reference(t):
        return torch.softmax(t.float(), -1).to(t.dtype) if t.dtype == torch.float16 else torch.softmax(t, -1)

    def wrong_gradient(t):  # the right output, a gradient 1e-2 off (one tenth of the input's size, in float16)
        out = _softmax_by_hand(t)
        return out + 1e-2 * (t - t.detach())

    errors = check_against_reference(_softmax_by_hand, reference, (x,), ["out", "dx"])
    assert len(errors) == 2
    with pytest.raises(AssertionError, match="dx"):
        check_against_reference(wrong_gradient, reference, (x,), ["out", "dx"])


def _float32_scores(q, k, scale, reverse):
    """``scale * q . k`` summed term by term in float32, in order or in reverse: two roundings of the same scores,
    as a flash-style forward and backward compute them."""
    terms = (q.unsqueeze(-2) * k.unsqueeze(-3)).float()  # (.., Nq, Nk, D), each product rounded once
    acc = torch.zeros(terms.shape[:-1])
    for d in reversed(range(terms.shape[-1])) if reverse else range(terms.shape[-1]):
        acc = acc + terms[..., d]
    return acc * scale


def test_recomputed_probabilities_at_large_scores_are_within_the_attention_slack():
    """A flash backward's dV at scores of ~3e3: P = exp(s' - lse) with s' another rounding of the forward's score is
    off by ulps of the score. The reference's float32 error says nothing about it (its one-hot softmax is exact), so
    the bare rule rejects it; the slack of attention_backward_slack accounts for it."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 7 if i == 0 else 9, 16, generator=gen) for i in range(3))
    grad_out = torch.randn(2, 7, 16, generator=gen)
    scale = 300.0
    causal = torch.ones(7, 9, dtype=torch.bool).tril()
    lse = torch.logsumexp(_float32_scores(q, k, scale, False).masked_fill(~causal, -math.inf), -1, keepdim=True)
    probs = torch.exp(_float32_scores(q, k, scale, True).masked_fill(~causal, -math.inf) - lse)
    dv = probs.transpose(-2, -1) @ grad_out

    def reference_dv(dtype):
        qr, kr, vr = (t.to(dtype) for t in (q, k, v))
        vr.requires_grad_(True)
        p = torch.softmax((qr @ kr.transpose(-2, -1) * scale).masked_fill(~causal, -math.inf), -1)
        out = p @ vr
        (grad,) = torch.autograd.grad(out, vr, grad_out.to(dtype))
        return out.detach(), grad

    out_exact, dv_exact = reference_dv(torch.float64)
    _, dv_ref = reference_dv(torch.float32)
    *_, slack = attention_backward_slack(q, k, v, out_exact, grad_out, scale=scale, is_causal=True)
    assert max_error(dv, dv_exact) > 10 * parity_bound(dv_ref, dv_exact, torch.float32)
    with pytest.raises(AssertionError):
        assert_parity(dv, dv_ref, dv_exact, name="dv without the slack")
    assert_parity(dv, dv_ref, dv_exact, name="dv", extra=slack)
    assert slack < 5e-3 * float(dv_exact.abs().max())  # still a check: a 1% error in dv would fail


def test_attention_slack_is_zero_without_keys_or_rows():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 0, 8)
    assert attention_backward_slack(q, k, k, torch.zeros(1, 2, 4, 8), torch.randn(1, 2, 4, 8)) == (0.0, 0.0, 0.0)
