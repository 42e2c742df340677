"""The NaN/Inf policy of docs/reliability.md, on every available backend.

- A query row whose every key is masked (boolean False, additive -inf, key padding of length 0, no keys at all)
  gives output 0 and finite gradients: dq of that row is 0 and the row adds nothing to dk / dv.
- -inf in an additive mask masks that key; finite masks, however negative (finfo.min), are ordinary scores.
- +inf in an additive mask makes that query row NaN, as in the reference and torch (inf - inf in the softmax).
- Large finite scores do not overflow (the row maximum is subtracted before exp).
- NaN inputs propagate: every output element that depends on a NaN input is NaN (never a finite, wrong value);
  outputs that do not depend on it match the reference. A backend may skip masked-out work, so a NaN in a masked
  key/value need not spread (the reference multiplies masked probabilities, 0, by V and spreads it).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import backend_params, device_for

import metagpt_fast
from metagpt_fast.ops import reference
from metagpt_fast.testing import assert_parity, attention_backward_slack, oracle_dtype, parity_atol

DTYPES = [torch.float32, torch.float16]


# Kernels known to break the policy, each with its reproducer in the commit that added it. Strict: the test fails
# as soon as the kernel is fixed, so the entry gets removed.
KNOWN_ISSUES: dict[tuple[str, str], str] = {}


def known_issue(request, backend: str, issue: str, when: bool = True) -> None:
    reason = KNOWN_ISSUES.get((backend, issue))
    if reason and when:
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))


def qkv(dtype, device, b=2, h=2, nq=7, nk=9, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((b, h, nq, d), (b, h, nk, d), (b, h, nk, d))
    return [torch.randn(s, generator=gen).to(dtype).to(device).requires_grad_() for s in shapes]


def run(backend, q, k, v, **kwargs):
    out = metagpt_fast.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype).to(out.device)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, grads, grad_out


def reference_run(q, k, v, grad_out, dtype, **kwargs):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    mask = kwargs.pop("attn_mask", None)
    mask = mask.to(dtype) if mask is not None and mask.dtype != torch.bool else mask
    out = reference.attention(q, k, v, attn_mask=mask, **kwargs)
    return out, torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))


def check_against_reference(backend, q, k, v, **kwargs):
    """Runs ``backend``; unless it is the reference itself, asserts the parity rule (``metagpt_fast.testing``) for
    the output and every gradient, with the slack of a flash-style backward (``attention_backward_slack``)."""
    out, grads, grad_out = run(backend, q, k, v, **kwargs)
    if backend == "reference":  # the reference against itself: a comparison that cannot fail
        return out, grads
    lo = reference_run(q, k, v, grad_out, q.dtype, **dict(kwargs))
    hi = reference_run(q, k, v, grad_out, oracle_dtype(q.dtype), **dict(kwargs))
    assert_parity(out, lo[0], hi[0], name="output")
    mask = kwargs.get("attn_mask")
    slack = attention_backward_slack(
        q, k, v, hi[0], grad_out, scale=kwargs.get("scale"), attn_mask=mask, is_causal=kwargs.get("is_causal", False)
    )
    for name, g, g_lo, g_hi, extra in zip(("dq", "dk", "dv"), grads, lo[1], hi[1], slack, strict=True):
        assert_parity(g, g_lo, g_hi, name=name, extra=extra)
    return out, grads


def dead_row_masks(device, b=2, h=2, nq=7, nk=9):
    """Masks in which query rows 0 and 4 (and batch 1 of the key padding) see no key at all."""
    gen = torch.Generator().manual_seed(2)
    allowed = torch.rand(b, h, nq, nk, generator=gen) < 0.6
    allowed[..., 0, :] = False
    allowed[..., 4, :] = False
    allowed[..., 1, 3] = True
    additive = torch.randn(nq, nk, generator=gen).masked_fill(torch.rand(nq, nk, generator=gen) < 0.3, -math.inf)
    additive[0] = -math.inf
    additive[4] = -math.inf
    lengths = torch.tensor([5, 0])
    padding = (torch.arange(nk)[None, :] < lengths[:, None]).view(b, 1, 1, nk)
    return {
        "bool": (allowed.to(device), [(slice(None), slice(None), 0), (slice(None), slice(None), 4)]),
        "additive": (additive.to(device), [(slice(None), slice(None), 0), (slice(None), slice(None), 4)]),
        "key_padding": (padding.to(device), [(1,)]),
    }


@pytest.mark.parametrize("backend", backend_params("attention"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["bool", "additive", "key_padding"])
def test_fully_masked_rows_give_zero_and_finite_gradients(backend, dtype, kind):
    device = device_for(backend)
    mask, dead = dead_row_masks(device)[kind]
    mask = mask if mask.dtype == torch.bool else mask.to(dtype)
    q, k, v = qkv(dtype, device)
    out, (dq, dk, dv) = check_against_reference(backend, q, k, v, attn_mask=mask)
    for index in dead:
        assert torch.equal(out[index], torch.zeros_like(out[index])), f"fully-masked rows {index} are not 0"
        assert torch.equal(dq[index], torch.zeros_like(dq[index])), f"dq of fully-masked rows {index} is not 0"
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(g).all(), f"{name} is not finite"


@pytest.mark.parametrize("backend", backend_params("attention"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_no_keys_gives_zero_output_and_zero_gradients(backend, dtype):
    device = device_for(backend)
    q = torch.randn(2, 2, 5, 8).to(dtype).to(device).requires_grad_()
    k, v = (torch.randn(2, 2, 0, 8).to(dtype).to(device).requires_grad_() for _ in range(2))
    out, (dq, dk, dv), _ = run(backend, q, k, v, is_causal=False)
    expected = torch.nn.functional.scaled_dot_product_attention(q.detach(), k.detach(), v.detach())
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(out, expected)
    assert torch.equal(dq, torch.zeros_like(dq)) and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("backend", backend_params("attention"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_minus_inf_masks_like_false_and_finfo_min_is_an_ordinary_score(backend, dtype):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(3)
    allowed = torch.rand(7, 9, generator=gen) < 0.5
    allowed[:, 0] = True
    q, k, v = qkv(dtype, device)
    additive = torch.zeros(7, 9, dtype=dtype).masked_fill(~allowed, -math.inf).to(device)
    out_add, grads_add, _ = run(backend, q, k, v, attn_mask=additive)
    out_bool, grads_bool, _ = run(backend, q, k, v, attn_mask=allowed.to(device))
    # The two spellings of one mask agree to the parity rule's floor (a kernel may take another path for each).
    for a, b in zip((out_add, *grads_add), (out_bool, *grads_bool), strict=True):
        torch.testing.assert_close(a, b, atol=parity_atol(b, dtype), rtol=0)
    # A whole row at finfo.min is not masked: its softmax is uniform over the keys, like torch's.
    soft = torch.zeros(7, 9, dtype=dtype)
    soft[2] = torch.finfo(dtype).min
    check_against_reference(backend, q, k, v, attn_mask=soft.to(device))


@pytest.mark.parametrize("backend", backend_params("attention"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_plus_inf_in_an_additive_mask_makes_its_row_nan(request, backend, dtype):
    known_issue(request, backend, "+inf")
    device = device_for(backend)
    q, k, v = qkv(dtype, device)
    mask = torch.zeros(7, 9, dtype=dtype)
    mask[3, 2] = math.inf
    out = metagpt_fast.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(device), backend=backend)
    lo, hi = (
        reference.attention(*(t.detach().to(dt) for t in (q, k, v)), attn_mask=mask.to(device).to(dt))
        for dt in (dtype, torch.float64)
    )
    assert torch.isnan(hi[:, :, 3]).all()
    assert torch.equal(torch.isnan(out), torch.isnan(hi)), "NaN rows differ from the reference"
    rows = [i for i in range(7) if i != 3]
    if backend != "reference":  # not the reference against itself
        assert_parity(out[:, :, rows], lo[:, :, rows], hi[:, :, rows], name="finite rows")


@pytest.mark.parametrize("backend", backend_params("attention"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_finite_scores_do_not_overflow(backend, dtype):
    device = device_for(backend)
    q, k, v = qkv(dtype, device)
    # scores up to ~|q||k| * 300 ~ 1e4: exp would overflow float32 (and float16) without the row maximum.
    check_against_reference(backend, q, k, v, scale=300.0, is_causal=True)
    out = metagpt_fast.scaled_dot_product_attention(q, k, v, scale=300.0, is_causal=True, backend=backend)
    assert torch.isfinite(out).all()


def _required_nan(where: str, index, allowed: torch.Tensor, shape) -> torch.Tensor:
    """Output elements (B, H, Nq, Dv) that depend on a NaN put at ``where``[index] (b, h, row, feature)."""
    b, h, n, f = index
    need = torch.zeros(shape, dtype=torch.bool)
    if where == "query":
        if allowed[b, h, n].any():  # a fully-masked row is 0 whatever its query holds
            need[b, h, n, :] = True
    elif where == "key":
        need[b, h] = allowed[b, h, :, n][:, None].expand(-1, shape[-1])
    else:  # value: feature f of every row that attends key n
        need[b, h, :, f] = allowed[b, h, :, n]
    return need


@pytest.mark.parametrize("backend", backend_params("attention"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["query", "key", "value"])
@pytest.mark.parametrize("masking", ["none", "causal", "bool"])
def test_nan_inputs_propagate(request, backend, dtype, where, masking):
    known_issue(request, backend, "nan", when=where == "key" or (where == "query" and masking != "bool"))
    device = device_for(backend)
    q, k, v = (t.detach() for t in qkv(dtype, device))
    nq, nk = q.shape[-2], k.shape[-2]
    allowed = torch.ones(2, 2, nq, nk, dtype=torch.bool)
    kwargs = {}
    if masking == "causal":
        allowed &= torch.ones(nq, nk, dtype=torch.bool).tril()
        kwargs["is_causal"] = True
    elif masking == "bool":
        allowed = torch.rand(2, 2, nq, nk, generator=torch.Generator().manual_seed(4)) < 0.5
        allowed[..., 2, :] = False  # a dead row
        kwargs["attn_mask"] = allowed.to(device)
    index = (1, 0, 2 if where == "query" else 5, 3)
    {"query": q, "key": k, "value": v}[where][index] = math.nan
    out = metagpt_fast.scaled_dot_product_attention(q, k, v, backend=backend, **kwargs).cpu()
    expected = reference.attention(q.double(), k.double(), v.double(), **kwargs).cpu()
    expected_lo = reference.attention(q, k, v, **kwargs).cpu()
    need = _required_nan(where, index, allowed, out.shape)
    assert need.any() or masking == "bool", "the test should put the NaN where an output depends on it"
    assert torch.isnan(out[need]).all(), f"a NaN {where} was turned into finite outputs"
    finite = ~torch.isnan(expected)
    assert not torch.isnan(out[finite]).any(), "NaN where the reference is finite"
    if backend != "reference":  # not the reference against itself
        assert_parity(out[finite], expected_lo[finite], expected[finite], name="outputs the NaN does not reach")


# --------------------------------------------------------------------------------------------- positional ops


@pytest.mark.parametrize("backend", backend_params("add_positional_encoding"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_and_inf_propagate_through_add_positional_encoding(backend, dtype):
    device = device_for(backend)
    x = torch.randn(2, 5, 6).to(dtype)
    x[0, 1, 2], x[1, 3, 0], x[1, 4, 5] = math.nan, math.inf, -math.inf
    out = metagpt_fast.add_positional_encoding(x.to(device), backend=backend).cpu()
    expected = reference.add_positional_encoding(x.double())
    assert torch.equal(torch.isnan(out), torch.isnan(expected)) and torch.equal(out.isinf(), expected.isinf())
    assert torch.equal(out[out.isinf()], expected[expected.isinf()].to(dtype))
    finite = torch.isfinite(expected)
    assert_parity(out[finite], expected[finite].to(dtype), expected[finite], name="finite elements")


@pytest.mark.parametrize("backend", backend_params("embed_positions"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_weight_rows_reach_exactly_their_tokens(backend, dtype):
    device = device_for(backend)
    weight = torch.randn(7, 6).to(dtype)
    weight[3, 1] = math.nan
    tokens = torch.tensor([[3, 1, 3, 0], [2, 2, 6, 3]])
    out = metagpt_fast.embed_positions(tokens.to(device), weight.to(device), backend=backend).cpu()
    expected = reference.embed_positions(tokens, weight.double())
    assert torch.equal(torch.isnan(out), torch.isnan(expected)) and torch.isnan(out[tokens == 3][:, 1]).all()
    finite = ~torch.isnan(expected)
    assert_parity(out[finite], expected[finite].to(dtype), expected[finite], name="finite elements")


@pytest.mark.parametrize("backend", backend_params("rotary"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_rotary_reaches_its_pair_only(backend, dtype):
    device = device_for(backend)
    q, k = torch.randn(1, 2, 5, 8).to(dtype), torch.randn(1, 1, 5, 8).to(dtype)
    q[0, 1, 2, 1] = math.nan  # half-split pairs (i, i + 4): features 1 and 5 of that row
    q_out, k_out = metagpt_fast.apply_rotary(q.to(device), k.to(device), backend=backend)
    q_ref, k_ref = reference.apply_rotary(q.double(), k.double())
    assert torch.equal(torch.isnan(q_out.cpu()), torch.isnan(q_ref)) and torch.isnan(q_ref).sum() == 2
    finite = ~torch.isnan(q_ref)
    assert_parity(q_out.cpu()[finite], q_ref[finite].to(dtype), q_ref[finite], name="finite elements")
    assert_parity(k_out.cpu(), k_ref.to(dtype), k_ref, name="k")
