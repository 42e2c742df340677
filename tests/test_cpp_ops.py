"""The ``cpu`` backend (C++ kernels of metagpt_fast._C) against the reference: outputs and every gradient, odd
shapes, float32 / bfloat16 / float16, dropout replayed bit-exactly, ``torch.library.opcheck`` on every op, and the
whole model on ``backend="cpu"`` against ``backend="reference"``."""

import types

import pytest
import torch
from helpers import assert_all_parity, check_against_reference, grad_leaves, outputs_and_grads

import metagpt_fast
from metagpt_fast import _extension, backends
from metagpt_fast.ops import reference
from metagpt_fast.ops.reference.random import dropout_keep_mask
from metagpt_fast.testing import assert_parity

pytestmark = pytest.mark.skipif(_extension.find_cxx() is None, reason="no C++ compiler: the extension cannot exist")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SEED = 1234567890123


@pytest.fixture(scope="module")
def cpp():
    assert _extension.load() is not None, f"extension failed to load: {_extension.unavailable_reason()}"
    from metagpt_fast.backends.compiled import attention, positional, rotary

    assert backends.available_backends()["cpu"] is None
    return types.SimpleNamespace(
        ops=torch.ops.metagpt_fast,
        attention=attention.attention,
        embed_positions=positional.embed_positions,
        add_positional_encoding=positional.add_positional_encoding,
        rotary=rotary.rotary,
    )


def _seed(p):
    return torch.tensor([SEED], dtype=torch.int64) if p > 0 else None


# ----------------------------------------------------------------------------------------------------- attention

ATTENTION_SHAPES = [  # (B, Hq, Hk, Nq, Nk, D, Dv)
    (2, 4, 2, 77, 77, 40, 40),  # GQA, odd length, non-power-of-2 head dim
    (1, 3, 3, 17, 200, 64, 32),  # Nq < Nk across several key tiles, Dv != D
    (1, 2, 1, 300, 17, 24, 24),  # Nq > Nk across several query tiles
    (2, 1, 1, 1, 1, 8, 8),
]


def _attention_case(shape, dtype, mask_kind, causal):
    b, hq, hk, nq, nk, d, dv = shape
    gen = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(b, hq, nq, d, generator=gen).to(dtype)
    # key and value as strided views of one buffer, like the model's fused projection
    kv = torch.randn(b, nk, hk, d + dv, generator=gen).to(dtype)
    k, v = kv[..., :d].transpose(1, 2), kv[..., d:].transpose(1, 2)
    mask = None
    if mask_kind == "bool":  # key padding (B, 1, 1, Nk), batch 0 keeps only its first keys, a row of batch 1 none
        mask = torch.rand(b, 1, nq, nk, generator=gen) > 0.3
        mask[0, :, :, : max(1, nk // 2)] = True
        mask[-1, :, 0, :] = False  # a query row with no visible key
        mask = mask[:, :, :1] if nq == 1 else mask
    elif mask_kind == "float":
        mask = torch.randn(1, hq, nq, nk, generator=gen).to(dtype)
    return q, k, v, mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("mask_kind,causal", [(None, False), (None, True), ("bool", False), ("float", False)])
def test_attention_matches_reference(cpp, shape, dtype, mask_kind, causal):
    q, k, v, mask = _attention_case(shape, dtype, mask_kind, causal)
    scale = 0.3
    gqa = q.shape[1] != k.shape[1]

    def fast(q, k, v):
        return cpp.attention(q, k, v, mask, 0.0, causal, scale, gqa, None)

    def ref(q, k, v, m=mask):
        return reference.attention(q, k, v, m, 0.0, causal, scale, gqa)

    got = outputs_and_grads(fast, grad_leaves(q, k, v))
    lowp = outputs_and_grads(ref, grad_leaves(q, k, v)) if dtype != torch.float32 else [None] * 4
    up = [t.float() for t in (q, k, v)]
    exact = outputs_and_grads(
        lambda q, k, v: ref(q, k, v, mask.float() if mask is not None and mask.is_floating_point() else mask),
        grad_leaves(*up),
    )
    assert_all_parity(got, lowp, exact, ["out", "grad_q", "grad_k", "grad_v"])
    assert torch.isfinite(got[0]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_dropout_replays_the_philox_stream(cpp, dtype, causal):
    b, hq, hk, nq, nk, d = 2, 4, 2, 33, 70, 16
    p = 0.3
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(dtype) for h, n in ((hq, nq), (hk, nk), (hk, nk)))
    keep = dropout_keep_mask(SEED, (b, hq, nq, nk), p)

    def fast(q, k, v):
        return cpp.attention(q, k, v, None, p, causal, 0.25, True, _seed(p))

    def ref(q, k, v):
        return reference.attention(q, k, v, None, p, causal, 0.25, True, dropout_mask=keep)

    check_against_reference(fast, ref, (q, k, v), ["out", "grad_q", "grad_k", "grad_v"])


def test_attention_lse_and_empty_rows(cpp):
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask[..., 2, :] = False
    out, lse = cpp.ops.attention_fwd(q, k, v, mask, 0.0, False, 0.5, None)
    scores = (q @ k.transpose(-1, -2)) * 0.5
    expected = torch.logsumexp(scores, dim=-1)
    torch.testing.assert_close(lse[..., [0, 1, 3, 4]], expected[..., [0, 1, 3, 4]], atol=1e-5, rtol=1e-5)
    assert torch.isinf(lse[..., 2]).all() and (lse[..., 2] > 0).all()  # +inf: recomputed weights are exactly 0
    assert (out[..., 2, :] == 0).all()


def test_attention_public_op_runs_on_cpu_backend(cpp):
    q, k, v = (torch.randn(2, 3, 19, 16) for _ in range(3))
    out = metagpt_fast.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu")
    assert_parity(out, None, reference.attention(q, k, v, is_causal=True), name="out")


def test_float64_is_refused_with_a_reason(cpp):
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        metagpt_fast.scaled_dot_product_attention(q, q, q, backend="cpu")
    assert "float64" in " ".join(
        backends.explain(
            "attention",
            query=q,
            key=q,
            value=q,
            attn_mask=None,
            dropout_p=0.0,
            is_causal=False,
            scale=1.0,
            enable_gqa=False,
        )["cpu"]
    )


# ---------------------------------------------------------------------------------------------------- positional


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sinusoidal,d,offset,p", [(True, 33, 0, 0.0), (True, 64, 5, 0.25), (False, 20, 0, 0.4)])
def test_embed_positions_matches_reference(cpp, dtype, sinusoidal, d, offset, p):
    gen = torch.Generator().manual_seed(d)
    tokens = torch.randint(0, 11, (3, 37), generator=gen)  # small vocab: many repeated tokens
    weight = torch.randn(11, d, generator=gen).to(dtype)
    keep = dropout_keep_mask(SEED, (3, 37, d), p) if p > 0 else None

    def fast(w):
        return cpp.embed_positions(tokens, w, 1.7, offset, p, sinusoidal, _seed(p))

    def ref(w):
        return reference.embed_positions(tokens, w, 1.7, offset, p, sinusoidal, dropout_mask=keep)

    check_against_reference(fast, ref, (weight,), ["out", "grad_weight"])


def test_embed_positions_backward_is_deterministic(cpp):
    tokens = torch.randint(0, 5, (4, 300))
    weight = torch.randn(5, 48, requires_grad=True)
    grads = []
    for _ in range(2):
        out = cpp.embed_positions(tokens, weight, 2.0, 0, 0.1, True, _seed(0.1))
        (grad,) = torch.autograd.grad(out, weight, torch.ones_like(out))
        grads.append(grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset,p", [(0, 0.0), (7, 0.2)])
def test_add_positional_encoding_matches_reference(cpp, dtype, offset, p):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(41, 3, 30, generator=gen).to(dtype).transpose(0, 1)  # (3, 41, 30), non-contiguous
    keep = dropout_keep_mask(SEED, (3, 41, 30), p) if p > 0 else None

    def fast(x):
        return cpp.add_positional_encoding(x, offset, p, _seed(p))

    def ref(x):
        return reference.add_positional_encoding(x, offset, p, dropout_mask=keep)

    check_against_reference(fast, ref, (x,), ["out", "grad_x"])


def test_dropout_is_the_reference_stream_bit_for_bit(cpp):
    p = 0.37
    x = torch.ones(2, 50, 9)
    out = cpp.ops.add_positional_encoding_fwd(x, 0, p, _seed(p))
    no_drop = cpp.ops.add_positional_encoding_fwd(x, 0, 0.0, None)
    assert torch.equal(out != 0, dropout_keep_mask(SEED, (2, 50, 9), p) & (no_drop != 0))


def test_sinusoid_table_far_positions(cpp):
    # Angle reduced in float64 (metagpt_fast/sinusoid.h): float32-accurate at large positions too.
    x = torch.zeros(1, 8, 64)
    out = cpp.ops.add_positional_encoding_fwd(x, 100_000, 0.0, None)
    expected = reference.sinusoidal_table(8, 64, offset=100_000)
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------------------------- rotary

ROTARY_CASES = [  # (B, Hq, Hk, T, D, rotary_dim, interleaved, positions)
    (2, 4, 2, 13, 32, 32, False, None),
    (2, 3, 1, 9, 40, 24, True, "shared"),
    (3, 2, 2, 7, 18, 10, False, "batch"),
]


def _positions(kind, b, t):
    if kind == "shared":
        return torch.randperm(50)[:t]
    if kind == "batch":
        return torch.randint(0, 1000, (b, t))
    return None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROTARY_CASES)
def test_rotary_matches_reference(cpp, dtype, case):
    b, hq, hk, t, d, rd, interleaved, kind = case
    gen = torch.Generator().manual_seed(d)
    q = torch.randn(b, t, hq, d, generator=gen).to(dtype).transpose(1, 2)  # strided like the model's heads
    k = torch.randn(b, hk, t, d, generator=gen).to(dtype)
    pos = _positions(kind, b, t)

    def fast(q, k):
        return cpp.rotary(q, k, pos, 3, rd, 500.0, interleaved, False)

    def ref(q, k):
        return reference.apply_rotary(q, k, pos, 3, rd, 500.0, interleaved)

    check_against_reference(fast, ref, (q, k), ["q_out", "k_out", "grad_q", "grad_k"])


def test_rotary_inplace(cpp):
    q, k = torch.randn(2, 4, 11, 16), torch.randn(2, 2, 11, 16).transpose(-1, -2).contiguous().transpose(-1, -2)
    expected = reference.apply_rotary(q, k, None, 4, 12, 10000.0, True)
    q_out, k_out = cpp.rotary(q, k, None, 4, 12, 10000.0, True, True)
    assert q_out is q and k_out is k
    assert_parity(q, None, expected[0], name="q")
    assert_parity(k, None, expected[1], name="k")


# ------------------------------------------------------------------------------------------------------ opcheck


def _opcheck_samples():
    q, k, v = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8)
    mask = torch.rand(1, 1, 1, 11) > 0.2
    out, lse = torch.ops.metagpt_fast.attention_fwd(q, k, v, None, 0.2, True, 0.35, _seed(0.2))
    tokens, weight = torch.randint(0, 6, (2, 5)), torch.randn(6, 12)
    grad3 = torch.randn(2, 5, 12)
    rq, rk = torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 8)
    return [
        ("attention_fwd", (q, k, v, None, 0.2, True, 0.35, _seed(0.2)), {"grad": (q, k, v)}),
        ("attention_fwd", (q, k, v, mask, 0.0, False, 0.35, None), {"grad": (q, k, v)}),
        ("attention_bwd", (torch.randn_like(out), q, k, v, out, lse, None, 0.2, True, 0.35, _seed(0.2)), {}),
        ("embed_positions_fwd", (tokens, weight, 1.5, 2, 0.1, True, _seed(0.1)), {"grad": (weight,)}),
        ("embed_positions_bwd", (grad3, tokens, 6, 1.5, 0.1, _seed(0.1)), {}),
        ("add_positional_encoding_fwd", (grad3, 3, 0.1, _seed(0.1)), {"grad": (grad3,)}),
        ("add_positional_encoding_bwd", (grad3, 0.1, _seed(0.1)), {}),
        ("rotary", (rq, rk, None, 2, 8, 10000.0, False, False), {"grad": (rq, rk)}),
        ("rotary", (rq, rk, torch.arange(5), 0, 4, 100.0, True, True), {"grad": (rq, rk)}),
        ("rotary_", (rq.clone(), rk.clone(), None, 2, 6, 10000.0, True), {}),
    ]


@pytest.mark.parametrize("index", range(10))
def test_opcheck(cpp, index):
    name, args, opts = _opcheck_samples()[index]
    args = list(args)
    for t in opts.get("grad", ()):
        i = next(i for i, a in enumerate(args) if a is t)
        args[i] = t.clone().requires_grad_(True)
    torch.library.opcheck(getattr(torch.ops.metagpt_fast, name).default, tuple(args))


# ---------------------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("positional", ["sinusoidal", "rotary"])
def test_model_on_cpu_backend_matches_reference(cpp, positional):
    torch.manual_seed(0)
    ref_model = metagpt_fast.MetaGPT(61, 48, 2, 4, 0.0, 40, positional=positional, backend="reference")
    fast_model = metagpt_fast.MetaGPT(61, 48, 2, 4, 0.0, 40, positional=positional, backend="cpu")
    fast_model.load_state_dict(ref_model.state_dict())
    idx, targets = torch.randint(0, 61, (3, 29)), torch.randint(0, 61, (3, 29))
    results = []
    for model in (ref_model, fast_model):
        logits, loss = model(idx, targets)
        loss.backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_logits, ref_grads), (logits, grads) = results
    assert_parity(logits, None, ref_logits, name="logits")
    assert ref_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert_parity(grad, None, ref_grads[name], name=f"grad {name}")


def test_mask_that_requires_grad_falls_back_to_the_reference():
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    bias = torch.randn(5, 5, requires_grad=True)
    with pytest.raises(ValueError, match="attn_mask requires grad"):
        metagpt_fast.scaled_dot_product_attention(q, k, v, attn_mask=bias, backend="cpu")
    metagpt_fast.scaled_dot_product_attention(q, k, v, attn_mask=bias).sum().backward()  # auto: reference serves
    assert bias.grad is not None and torch.isfinite(bias.grad).all()
