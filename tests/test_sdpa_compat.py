"""Cases in the spirit of PyTorch's own SDPA test-suite (written here), run against metagpt_fast both called directly
and through ``sdpa_routing``: torch's CausalBias masks, error types, other tensor subclasses, TorchScript and tracing.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import metagpt_fast

TORCH_SDPA = F.scaled_dot_product_attention  # captured before any routing in this module


def _direct(*args, **kwargs):
    return metagpt_fast.scaled_dot_product_attention(*args, **kwargs)


def _routed(*args, **kwargs):
    with metagpt_fast.sdpa_routing():
        return F.scaled_dot_product_attention(*args, **kwargs)


CALLS = [pytest.param(_direct, id="direct"), pytest.param(_routed, id="routed")]


def _qkv(nq, nk, dtype, requires_grad=False, heads=3, d=8):
    gen = torch.Generator().manual_seed(nq * 31 + nk)
    shapes = ((2, heads, nq, d), (2, heads, nk, d), (2, heads, nk, d))
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_(requires_grad) for s in shapes]


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("make_bias", [causal_upper_left, causal_lower_right])
@pytest.mark.parametrize("nq,nk", [(4, 6), (6, 6), (1, 5)])
def test_causal_bias_keeps_torchs_semantics(call, make_bias, nq, nk):
    q, k, v = _qkv(nq, nk, torch.float64, requires_grad=True)
    expected = TORCH_SDPA(q, k, v, attn_mask=make_bias(nq, nk))
    got = call(q, k, v, attn_mask=make_bias(nq, nk))
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    have = torch.autograd.grad(got, (q, k, v), grad)
    for name, a, b in zip("qkv", have, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_causal_bias_in_low_precision_is_not_read_as_an_additive_mask(dtype):
    q, k, v = _qkv(4, 6, dtype)
    for make_bias in (causal_upper_left, causal_lower_right):
        expected = TORCH_SDPA(q.float(), k.float(), v.float(), attn_mask=make_bias(4, 6))
        got = metagpt_fast.scaled_dot_product_attention(q, k, v, attn_mask=make_bias(4, 6))
        ours_in_fp32 = metagpt_fast.scaled_dot_product_attention(
            q.float(), k.float(), v.float(), attn_mask=make_bias(4, 6)
        )
        lowp_error = (TORCH_SDPA(q, k, v, attn_mask=make_bias(4, 6)).float() - expected).abs().max()
        assert (got.float() - expected).abs().max() <= 2 * lowp_error + 1e-3
        torch.testing.assert_close(ours_in_fp32, expected, atol=1e-6, rtol=1e-5)


def test_causal_bias_errors():
    q, k, v = _qkv(4, 6, torch.float32)
    with pytest.raises(ValueError, match="cannot be combined with is_causal"):
        metagpt_fast.scaled_dot_product_attention(q, k, v, attn_mask=causal_upper_left(4, 6), is_causal=True)
    with pytest.raises(ValueError, match="CausalBias for 5 queries and 6 keys"):
        metagpt_fast.scaled_dot_product_attention(q, k, v, attn_mask=causal_upper_left(5, 6))


class _Marked(torch.Tensor):
    """A tensor subclass with a meaning of its own (like DTensor or a quantised wrapper)."""


def test_unknown_tensor_subclasses_are_refused_not_read_as_plain_tensors():
    q, k, v = _qkv(4, 4, torch.float32)
    mask = torch.zeros(4, 4).as_subclass(_Marked)
    with pytest.raises(TypeError, match="attn_mask is a .*_Marked"):
        metagpt_fast.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with pytest.raises(TypeError, match="query is a .*_Marked"):
        metagpt_fast.scaled_dot_product_attention(q.as_subclass(_Marked), k, v)
    # Routing leaves them to torch's function, which gives its own answer.
    torch.testing.assert_close(_routed(q, k, v, attn_mask=mask), TORCH_SDPA(q, k, v, attn_mask=torch.zeros(4, 4)))


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize(
    "case",
    ["mixed dtypes", "1-D query", "mask with is_causal", "int mask", "wrong head dim", "dropout above 1"],
)
def test_errors_are_runtime_errors_like_torchs(call, case):
    q, k, v = _qkv(4, 4, torch.float32)
    kwargs = {}
    if case == "mixed dtypes":
        k = k.double()
    elif case == "1-D query":
        q = torch.randn(8)
    elif case == "mask with is_causal":
        kwargs = dict(attn_mask=torch.ones(4, 4, dtype=torch.bool), is_causal=True)
    elif case == "int mask":
        kwargs = dict(attn_mask=torch.ones(4, 4, dtype=torch.int32))
    elif case == "wrong head dim":
        k = torch.randn(2, 3, 4, 4)
    else:
        kwargs = dict(dropout_p=1.5)
    with pytest.raises(RuntimeError):
        TORCH_SDPA(q, k, v, **kwargs)
    with pytest.raises(RuntimeError) as info:
        call(q, k, v, **kwargs)
    if call is _direct:  # metagpt_fast's own check: also the ValueError/TypeError it documents
        assert isinstance(info.value, (ValueError, TypeError)), type(info.value)


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize(
    "case", ["3-D inputs", "scale", "GQA", "bool mask broadcast", "additive mask with -inf", "causal Nq < Nk"]
)
def test_results_match_torch(call, case):
    q, k, v = _qkv(5, 7, torch.float64)
    kwargs = {}
    if case == "3-D inputs":
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    elif case == "scale":
        kwargs = dict(scale=0.3)
    elif case == "GQA":
        k, v = k[:, :1], v[:, :1]
        kwargs = dict(enable_gqa=True)
    elif case == "bool mask broadcast":
        kwargs = dict(attn_mask=torch.rand(2, 1, 1, 7, generator=torch.Generator().manual_seed(1)) > 0.3)
        kwargs["attn_mask"][..., 0] = True  # no fully masked row (torch gives NaN there, metagpt_fast 0)
    elif case == "additive mask with -inf":
        mask = torch.zeros(5, 7, dtype=torch.float64)
        mask[:, 3] = float("-inf")
        kwargs = dict(attn_mask=mask)
    else:
        kwargs = dict(is_causal=True)
    torch.testing.assert_close(call(q, k, v, **kwargs), TORCH_SDPA(q, k, v, **kwargs), atol=1e-12, rtol=1e-12)


def _mha_output(module, x):
    # Training mode (dropout 0): the path that calls F.scaled_dot_product_attention (in eval under no_grad, MHA takes
    # its fused fast path instead, which a scripted module cannot run with need_weights=False).
    return module(x, x, x, need_weights=False)[0].detach()


class _SelfAttention(torch.nn.Module):
    def __init__(self, mha):
        super().__init__()
        self.mha = mha

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


def test_routing_keeps_torchscript_and_tracing_working():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    expected = _mha_output(mha, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream, still used
        with metagpt_fast.sdpa_routing():
            scripted = torch.jit.script(mha)
            traced = torch.jit.trace(_SelfAttention(mha), (x,), check_trace=False)
            torch.testing.assert_close(_mha_output(scripted, x), expected, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(traced(x), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_mha_output(scripted, x), expected, atol=1e-6, rtol=1e-5)
