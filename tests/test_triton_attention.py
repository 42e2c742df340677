"""Triton fused attention (forward + backward) against the reference, under TRITON_INTERPRET=1 on CPU.

Outputs and dQ, dK, dV follow the parity rule of ``metagpt_fast.testing``: at most twice as far from the reference
run one precision up (float64 for float32, float32 for float16) as the reference run in the kernel's own precision,
plus a flash backward's own roundings (``attention_backward_slack``). bfloat16 products are wrong under the interpreter
(docs/testing.md), so bfloat16 runs in tests/test_triton_attention_gpu.py. Dropout is compared by replaying the kernel's
Philox mask (``reference.dropout_keep_mask``) in the reference. Shapes are a covering subset: every N in
{1, 17, 77, 200}, every D in {16, 32, 48, 64, 80, 128}, causal and not, each mask kind, GQA and MQA, Nq != Nk.
"""

import math

import pytest
import torch

from metagpt_fast import backends
from metagpt_fast.ops.reference import attention as reference_attention
from metagpt_fast.ops.reference import dropout_keep_mask
from metagpt_fast.testing import assert_all_parity, assert_parity, attention_backward_slack, oracle_dtype

pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("interpreter tests: the GPU suite runs tests/test_triton_attention_gpu.py", allow_module_level=True)

from metagpt_fast.backends.triton import attention as triton_attention  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _inputs(b, hq, hk, nq, nk, d, dv, dtype, layout="contiguous"):
    """Leaf tensors q (b, hq, nq, d), k (b, hk, nk, d), v (b, hk, nk, dv); ``layout="strided"`` gives the
    (B, N, H, D) memory order of a fused projection for q, a slice of a wider buffer for k and a non-unit last
    stride for v."""
    if layout == "contiguous":
        q = torch.randn(b, hq, nq, d)
        k = torch.randn(b, hk, nk, d)
        v = torch.randn(b, hk, nk, dv)
    else:
        q = torch.randn(b, nq, hq, d).transpose(1, 2)
        k = torch.randn(b, hk, nk, d + 8)[..., 3 : 3 + d]
        v = torch.randn(b, hk, nk, 2 * dv)[..., ::2]
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


def _run(fn, q, k, v, grad_out, **kwargs):
    out = fn(q, k, v, **kwargs)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)]


def _reference(q, k, v, grad_out, dtype, attn_mask, **kwargs):
    """The reference's output and gradients with inputs (and an additive mask) cast to ``dtype``."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(dtype)
    return _run(reference_attention, q, k, v, grad_out.to(dtype), attn_mask=attn_mask, **kwargs)


def check_attention(
    b=1, hq=2, hk=None, nq=17, nk=None, d=32, dv=None, dtype="fp32", is_causal=False, attn_mask=None,
    dropout_p=0.0, scale=None, layout="contiguous", grad_layout="contiguous",
):  # fmt: skip
    """Runs the Triton implementation and asserts parity of the output and all three gradients; returns them."""
    hk, nk, dv, dtype = hk or hq, nk or nq, dv or d, DTYPES[dtype]
    q, k, v = _inputs(b, hq, hk, nq, nk, d, dv, dtype, layout)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    grad_out = torch.randn(b, hq, nq, dv).to(dtype)
    if grad_layout == "transposed":  # (B, N, H, Dv) memory order, as from a following projection
        grad_out = grad_out.transpose(1, 2).contiguous().transpose(1, 2)
    seed = torch.tensor([20240611 + nq * nk], dtype=torch.int64) if dropout_p > 0 else None
    keep = dropout_keep_mask(seed, (b, hq, nq, nk), dropout_p) if dropout_p > 0 else None

    args = dict(attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=hq != hk)
    fast = _run(triton_attention.attention, q, k, v, grad_out, seed=seed, **args)
    args["dropout_mask"] = keep
    exact = _reference(q, k, v, grad_out, oracle_dtype(dtype), **args)
    lowp = _reference(q, k, v, grad_out, dtype, **args)
    for name, f in zip(("out", "dq", "dk", "dv"), fast, strict=True):
        assert f.dtype == dtype and torch.isfinite(f).all(), name
    slack = attention_backward_slack(
        q, k, v, exact[0], grad_out, scale=scale, attn_mask=attn_mask, is_causal=is_causal, dropout_mask=keep,
        dropout_p=dropout_p,
    )  # fmt: skip
    assert_all_parity(fast, lowp, exact, ("out", "dq", "dk", "dv"), (0.0, *slack))
    return fast


# ------------------------------------------------------------------------------------------------ shapes and dims


@pytest.mark.parametrize(
    "n, d, is_causal, dtype",
    [
        (1, 16, False, "fp32"),
        (1, 64, True, "fp16"),
        (17, 16, True, "fp16"),
        (17, 128, False, "fp32"),
        (77, 32, False, "fp16"),
        (77, 48, True, "fp32"),
        (77, 80, False, "fp16"),
        (200, 64, True, "fp32"),
        (200, 80, True, "fp16"),
        (200, 128, False, "fp16"),
    ],
)
def test_matches_reference(n, d, is_causal, dtype):
    check_attention(b=1, hq=2, nq=n, d=d, dtype=dtype, is_causal=is_causal)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("nq, nk", [(17, 77), (77, 17), (1, 200), (200, 33)])
def test_different_query_and_key_lengths(nq, nk, is_causal):
    # torch's causal alignment when Nq != Nk is top-left: query i sees keys j <= i (queries past Nk see all keys).
    check_attention(nq=nq, nk=nk, d=32, is_causal=is_causal)


def test_value_head_dim_differs_and_custom_scale():
    check_attention(nq=33, nk=50, d=48, dv=16, scale=0.3, is_causal=True)


# ---------------------------------------------------------------------------------------------------------- masks


def test_key_padding_mask_with_fully_masked_rows():
    # (B, 1, 1, Nk) bool: batch 0 pads its last 20 keys, batch 1 masks every key -> its output rows are 0.
    mask = torch.ones(2, 1, 1, 45, dtype=torch.bool)
    mask[0, ..., 25:] = False
    mask[1] = False
    out, dq, dk, dv = check_attention(b=2, hq=2, nq=30, nk=45, d=32, attn_mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(dq[1], torch.zeros_like(dq[1])) and torch.equal(dk[0, :, 25:], torch.zeros_like(dk[0, :, 25:]))


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_dense_bool_mask_per_head(dtype):
    mask = torch.rand(2, 2, 40, 77) > 0.3
    mask[0, 1, 5] = False  # one fully-masked row
    check_attention(b=2, hq=2, nq=40, nk=77, d=64, dtype=dtype, attn_mask=mask)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_additive_mask_broadcast_over_batch_and_heads(dtype):
    mask = torch.randn(50, 50)
    mask[7] = float("-inf")  # fully masked row -> 0
    mask[:, 11] = float("-inf")
    out = check_attention(b=2, hq=2, nq=50, d=32, dtype=dtype, attn_mask=mask)[0]
    assert torch.equal(out[:, :, 7], torch.zeros_like(out[:, :, 7]))


def test_additive_key_padding_mask_with_float32_minimum():
    # Masks built with torch.finfo(float32).min must not overflow to -inf inside the kernel (base-2 scaling): a row
    # of them is uniform in the reference, not empty.
    mask = torch.zeros(2, 1, 1, 21)
    mask[0, ..., 15:] = torch.finfo(torch.float32).min
    mask[1] = torch.finfo(torch.float32).min
    check_attention(b=2, hq=2, nq=9, nk=21, d=16, attn_mask=mask)


def test_query_broadcast_mask_with_head_dim():
    # (1, Hq, Nq, 1): broadcast along keys only (stride 0 on the last dim).
    mask = torch.rand(1, 2, 33, 1) > 0.2
    check_attention(b=2, hq=2, nq=33, nk=40, d=16, attn_mask=mask)


# -------------------------------------------------------------------------------------------- GQA, dropout, layout


@pytest.mark.parametrize("hq, hk, is_causal", [(4, 2, True), (4, 1, False)])
def test_grouped_and_multi_query(hq, hk, is_causal):
    check_attention(b=2, hq=hq, hk=hk, nq=37, nk=70, d=32, is_causal=is_causal)


@pytest.mark.parametrize(
    "dropout_p, is_causal, hq, hk, dtype",
    [(0.2, False, 2, 2, "fp32"), (0.5, True, 4, 2, "fp32"), (0.1, True, 2, 1, "fp16")],
)
def test_dropout_replayed_with_the_exact_mask(dropout_p, is_causal, hq, hk, dtype):
    check_attention(b=2, hq=hq, hk=hk, nq=45, nk=66, d=32, dtype=dtype, is_causal=is_causal, dropout_p=dropout_p)


def test_dropout_with_key_padding_mask():
    mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    mask[1, ..., 31:] = False
    check_attention(b=2, hq=2, nq=29, nk=40, d=16, attn_mask=mask, dropout_p=0.3)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_non_contiguous_inputs_and_gradient(dtype):
    check_attention(
        b=2, hq=4, hk=2, nq=40, nk=51, d=48, dtype=dtype, is_causal=True, layout="strided", grad_layout="transposed"
    )


def test_backward_is_bitwise_deterministic():
    q, k, v = _inputs(1, 4, 2, 40, 50, 32, 32, torch.float32)
    grad_out = torch.randn(1, 4, 40, 32)
    seed = torch.tensor([7], dtype=torch.int64)
    args = dict(attn_mask=None, dropout_p=0.25, is_causal=True, scale=0.2, enable_gqa=True, seed=seed)
    first = _run(triton_attention.attention, q, k, v, grad_out, **args)
    second = _run(triton_attention.attention, q, k, v, grad_out, **args)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------------------------------- registration, errors


def test_registered_with_reasons():
    impl = backends.lookup("attention", "triton")
    assert impl.slow and impl.priority({}) == 20
    q = torch.randn(1, 2, 8, 16)
    ok = dict(query=q, key=q, value=q, attn_mask=None, dropout_p=0.0, is_causal=False, scale=0.25, enable_gqa=False)
    assert impl.not_supported_reasons(**ok) == []
    wide = torch.randn(1, 1, 4, 512)
    for bad in (
        dict(ok, query=q.double(), key=q.double(), value=q.double()),
        dict(ok, query=q.bfloat16(), key=q.bfloat16(), value=q.bfloat16()),
        dict(ok, query=wide, key=wide, value=wide),
        dict(ok, attn_mask=torch.zeros(8, 8, requires_grad=True)),
    ):
        assert impl.not_supported_reasons(**bad), bad


def test_custom_ops_pass_opcheck():
    q, k, v = (t.detach() for t in _inputs(1, 2, 1, 19, 23, 16, 16, torch.float32))
    mask = torch.rand(1, 1, 1, 23) > 0.2
    seed = torch.tensor([3], dtype=torch.int64)
    # The fake-tensor and compile checks trace the op without data, which the interpreter cannot run (docs/testing.md):
    # the GPU suite covers torch.compile.
    utils = ("test_schema", "test_autograd_registration")
    forward = torch.ops.metagpt_fast.triton_attention_forward.default
    torch.library.opcheck(forward, (q.requires_grad_(), k, v, mask, 0.1, False, 0.25, seed), test_utils=utils)
    out, lse = forward(q, k, v, mask, 0.1, False, 0.25, seed)
    backward = torch.ops.metagpt_fast.triton_attention_backward.default
    torch.library.opcheck(
        backward, (torch.randn_like(out), q, k, v, out, lse, mask, 0.1, False, 0.25, seed), test_utils=("test_schema",)
    )


def test_public_api_selects_triton():
    reason = backends.available_backends()["triton"]
    if reason is not None:
        pytest.skip(f"triton backend not loadable here: {reason}")
    import metagpt_fast

    q, k, v = _inputs(1, 2, 2, 21, 21, 16, 16, torch.float32)
    out = metagpt_fast.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
    expected = reference_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert_parity(out, reference_attention(q, k, v, is_causal=True), expected, name="out")
    with pytest.raises(ValueError, match="float64"):
        metagpt_fast.scaled_dot_product_attention(q.double(), k.double(), v.double(), backend="triton")
