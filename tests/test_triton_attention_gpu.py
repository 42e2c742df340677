"""Triton fused attention on a CUDA GPU: bfloat16/float16 parity at training sizes, torch.compile, determinism.

Parity follows the rule of metagpt_fast.testing: at most twice as far from the reference run one precision up
(float32 for half precisions, float64 for float32) as the reference run in the kernel's own precision, plus the
rounding a flash-style backward adds (``attention_backward_slack``). Skipped without a GPU; the interpreter tests in
tests/test_triton_attention.py cover the semantics on CPU.
"""

import math

import pytest
import torch

from metagpt_fast.ops.reference import attention as reference_attention
from metagpt_fast.ops.reference import dropout_keep_mask
from metagpt_fast.testing import assert_all_parity, assert_parity, attention_backward_slack, oracle_dtype

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs in the GPU suite)"),
]
pytest.importorskip("triton")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _triton_attention():
    from metagpt_fast.backends.triton import attention as triton_attention

    return triton_attention


def _grads(fn, q, k, v, grad_out, **kwargs):
    out = fn(q, k, v, **kwargs)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)]


def _check(b, hq, hk, nq, nk, d, dtype, is_causal=False, attn_mask=None, dropout_p=0.0):
    dtype = DTYPES[dtype]
    q = torch.randn(b, hq, nq, d, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(b, hk, nk, d, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(b, hk, nk, d, device="cuda", dtype=dtype, requires_grad=True)
    grad_out = torch.randn(b, hq, nq, d, device="cuda", dtype=dtype)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(dtype)
    seed = torch.tensor([1234], dtype=torch.int64, device="cuda") if dropout_p else None
    args = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=1 / math.sqrt(d),
                enable_gqa=hq != hk)  # fmt: skip
    fast = _grads(_triton_attention().attention, q, k, v, grad_out, seed=seed, **args)
    args["dropout_mask"] = dropout_keep_mask(seed, (b, hq, nq, nk), dropout_p, "cuda") if dropout_p else None
    lowp = _grads(reference_attention, q, k, v, grad_out, **args)
    up = [x.detach().to(oracle_dtype(dtype)).requires_grad_() for x in (q, k, v)]
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        args["attn_mask"] = attn_mask.to(oracle_dtype(dtype))
    exact = _grads(reference_attention, *up, grad_out.to(oracle_dtype(dtype)), **args)
    for name, f in zip(("out", "dq", "dk", "dv"), fast, strict=True):
        assert torch.isfinite(f).all(), name
    assert_all_parity(fast, lowp, exact, ("out", "dq", "dk", "dv"))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
def test_causal_training_shape(dtype, d):
    _check(2, 8, 8, 1024, 1024, d, dtype, is_causal=True)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gqa_key_padding_odd_lengths(dtype):
    mask = torch.ones(2, 1, 1, 1531, dtype=torch.bool, device="cuda")
    mask[1, ..., 1000:] = False
    _check(2, 8, 2, 997, 1531, 80, dtype, attn_mask=mask)


def test_head_dim_256_additive_mask():
    mask = torch.randn(1, 1, 300, 700, device="cuda")
    _check(1, 4, 4, 300, 700, 256, "bf16", attn_mask=mask)


def test_dropout_bf16_exact_mask():
    _check(2, 4, 4, 512, 512, 64, "bf16", is_causal=True, dropout_p=0.1)


def test_float32_is_not_tf32(monkeypatch):
    # The float32 reference is the yardstick: it must not run its matmuls in TF32 either.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    q, k, v = (torch.randn(1, 4, 300, 64, device="cuda", requires_grad=True) for _ in range(3))
    grad_out = torch.randn(1, 4, 300, 64, device="cuda")
    fast = _grads(_triton_attention().attention, q, k, v, grad_out, attn_mask=None, dropout_p=0.0, is_causal=True,
                  scale=0.125, enable_gqa=False, seed=None)  # fmt: skip
    lowp = _grads(reference_attention, q, k, v, grad_out, is_causal=True, scale=0.125)
    up = [x.detach().double().requires_grad_() for x in (q, k, v)]
    exact = _grads(reference_attention, *up, grad_out.double(), is_causal=True, scale=0.125)
    slack = attention_backward_slack(q, k, v, exact[0], grad_out, scale=0.125, is_causal=True)
    assert_all_parity(fast, lowp, exact, ("out", "dq", "dk", "dv"), (0.0, *slack))


def test_backward_bitwise_deterministic():
    q, k, v = (torch.randn(2, 8, 777, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn_like(q)
    args = dict(attn_mask=None, dropout_p=0.0, is_causal=True, scale=0.125, enable_gqa=False, seed=None)
    first = _grads(_triton_attention().attention, q, k, v, grad_out, **args)
    second = _grads(_triton_attention().attention, q, k, v, grad_out, **args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_matches_eager():
    attention = _triton_attention().attention
    mask = torch.ones(2, 1, 1, 300, dtype=torch.bool, device="cuda")
    mask[0, ..., 250:] = False

    def step(q, k, v):
        out = attention(q, k, v, mask, 0.0, False, 0.125, True, None)
        return out.float().square().sum()

    q = torch.randn(2, 8, 200, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2, 300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    compiled = torch.compile(step, fullgraph=True)
    loss_eager = step(q, k, v)
    grads_eager = torch.autograd.grad(loss_eager, (q, k, v))
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    torch.testing.assert_close(loss, loss_eager)
    for g, ge in zip(grads, grads_eager):
        torch.testing.assert_close(g, ge)


def test_public_api_and_opcheck():
    import metagpt_fast

    q, k, v = (torch.randn(1, 2, 130, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    out = metagpt_fast.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
    expected = reference_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert_parity(out, reference_attention(q, k, v, is_causal=True), expected, name="out")
    forward = torch.ops.metagpt_fast.triton_attention_forward.default
    torch.library.opcheck(forward, (q.requires_grad_(), k, v, None, 0.0, True, 0.125, None))
