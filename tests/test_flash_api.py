"""flash-attn's API (``metagpt_fast.flash_attn_func`` & co., the ``flash_attention`` op) and its opt-in shim.

1. The reference against an independent dense implementation (written here in float64 from the definitions, with
   masks built element by element), for every feature: bottom-right causal with Nq != Nk, windows, softcap, ALiBi
   (H,) and (B, H), GQA / MQA, varlen with zero-length and length-1 sequences, odd head dims. Outputs, lse and the
   gradients of q, k and v.
2. The packed forms, return_attn_probs, deterministic, dropout, empty inputs.
3. Every fast implementation the registry reports here (``kernel_params``) against the reference, with the parity
   rule of ``metagpt_fast.testing`` on outputs, lse and every gradient.
4. Bad input: each error names its argument.
5. The shim: installs only without a real flash-attn, never shadows one.
"""

import math
import sys
import types

import helpers
import pytest
import torch
from helpers import kernel_params, skip_unless_supported

import metagpt_fast
from metagpt_fast import backends
from metagpt_fast import flash_attn_shim as shim
from metagpt_fast.ops import flash as flash_op
from metagpt_fast.ops.reference import flash as reference_flash
from metagpt_fast.testing import (
    assert_parity,
    attention_backward_slack,
    oracle_dtype,
    outputs_and_grads,
)

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
DTYPE_IDS = {F64: "float64", F32: "float32", F16: "float16", BF16: "bfloat16"}

# ------------------------------------------------------------------------------------------- independent oracle


def dense_oracle(q, k, v, lens_q, lens_k, scale, window=(-1, -1), causal=False, softcap=0.0, alibi=None):
    """Packed ``q (Tq, Hq, D)``, ``k (Tk, Hk, D)``, ``v (Tk, Hk, Dv)``; returns ``(out, lse)``, in float64.

    Written independently of the reference: masks element by element from the definition (query i of Lq aligned
    with key i + Lk - Lq), heads of a GQA group gathered by index, the softmax from torch.softmax on rows that have
    a key, lse from torch.logsumexp (+inf for empty rows)."""
    left, right = window
    if causal:
        right = 0
    hq, hk = q.shape[1], k.shape[1]
    kv_head = torch.tensor([h // (hq // hk) for h in range(hq)])
    outs, lses = [], []
    q0 = k0 = 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k, strict=True)):
        qb = q[q0 : q0 + lq].double().permute(1, 0, 2)  # (Hq, Lq, D)
        kb = k[k0 : k0 + lk].double().index_select(1, kv_head).permute(1, 0, 2)
        vb = v[k0 : k0 + lk].double().index_select(1, kv_head).permute(1, 0, 2)
        q0, k0 = q0 + lq, k0 + lk
        allowed = torch.zeros(lq, lk, dtype=torch.bool)
        bias = torch.zeros(hq, lq, lk, dtype=F64)
        for i in range(lq):
            for j in range(lk):
                d = i + lk - lq - j  # > 0: key before the aligned position
                allowed[i, j] = (right < 0 or -d <= right) and (left < 0 or d <= left)
                if alibi is not None:
                    slopes = alibi if alibi.dim() == 1 else alibi[b]
                    bias[:, i, j] = -slopes.double() * abs(d)
        s = torch.einsum("hid,hjd->hij", qb, kb) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        s = s + bias
        s = torch.where(allowed, s, torch.full_like(s, -math.inf))
        has_key = allowed.any(-1)  # (Lq,)
        safe = torch.where(has_key[:, None], s, torch.zeros_like(s))
        p = torch.softmax(safe, dim=-1) * has_key[:, None]
        outs.append(torch.einsum("hij,hjd->ihd", p, vb))
        lse = torch.logsumexp(s, dim=-1) if lk else torch.full((hq, lq), -math.inf, dtype=F64)
        lses.append(torch.where(has_key, lse, torch.full_like(lse, math.inf)))
    return torch.cat(outs), torch.cat(lses, dim=1)


def _cu(lengths, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _assert_lse(got, expected, name="lse", atol=1e-10):
    """lse: +inf in the same rows, close elsewhere."""
    assert got.dtype == F32, name
    inf = torch.isinf(expected)
    assert torch.equal(torch.isinf(got), inf) and (got[inf] > 0).all(), f"{name}: +inf rows differ"
    torch.testing.assert_close(got[~inf].double(), expected[~inf].double(), atol=atol, rtol=1e-6, msg=name)


# ------------------------------------------------------------------------------- the reference vs the oracle

# A case: lengths of the query / key sequences, heads (Hq, Hk), head dims (D, Dv), and the feature arguments.
FEATURE_CASES = {
    "causal-nq<nk": dict(lq=[5], lk=[9], causal=True),
    "causal-nq>nk": dict(lq=[9], lk=[5], causal=True),  # rows with no key: out 0, lse +inf
    "window(-1,0)": dict(lq=[6], lk=[10], window=(-1, 0)),
    "window(0,-1)": dict(lq=[6], lk=[10], window=(0, -1)),
    "window(3,0)": dict(lq=[8], lk=[11], window=(3, 0)),
    "window(2,2)": dict(lq=[11], lk=[8], window=(2, 2)),
    "causal+window(3,-1)": dict(lq=[7], lk=[7], causal=True, window=(3, -1)),
    "softcap": dict(lq=[7], lk=[9], softcap=0.7, scale=2.0),
    "alibi(H,)": dict(lq=[6], lk=[9], alibi="h", causal=True),
    "alibi(B,H)": dict(lq=[4, 6], lk=[9, 3], alibi="bh"),
    "gqa": dict(lq=[5], lk=[8], heads=(4, 2), causal=True),
    "mqa": dict(lq=[5], lk=[8], heads=(3, 1), window=(2, 1)),
    "varlen-empty-and-one": dict(lq=[3, 0, 1, 6, 1, 2], lk=[5, 2, 0, 6, 1, 0], causal=True),
    "varlen-window": dict(lq=[1, 7, 0, 4], lk=[4, 7, 3, 9], window=(2, 0), heads=(2, 1)),
    "d59": dict(lq=[5], lk=[7], dims=(59, 59), causal=True),
    "d111-dv40": dict(lq=[4], lk=[6], dims=(111, 40), window=(1, 1)),
    "everything": dict(
        lq=[6, 1, 5], lk=[9, 4, 5], heads=(4, 2), causal=True, window=(3, -1), softcap=1.5, alibi="bh", dims=(9, 7)
    ),  # fmt: skip
}


def _make(case, dtype=F64, device="cpu", scale=1.0):
    hq, hk = case.get("heads", (2, 2))
    d, dv = case.get("dims", (8, 8))
    tq, tk = sum(case["lq"]), sum(case["lk"])
    q = torch.randn(tq, hq, d, device=device) * scale
    k = torch.randn(tk, hk, d, device=device) * scale
    v = torch.randn(tk, hk, dv, device=device)
    alibi = None
    if case.get("alibi") == "h":
        alibi = torch.rand(hq, device=device)
    elif case.get("alibi") == "bh":
        alibi = torch.rand(len(case["lq"]), hq, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype), alibi


def _kwargs(case):
    return dict(causal=case.get("causal", False), window_size=case.get("window", (-1, -1)),
                softcap=case.get("softcap", 0.0))  # fmt: skip


@pytest.mark.parametrize("case", list(FEATURE_CASES.values()), ids=list(FEATURE_CASES))
def test_reference_matches_dense_oracle(case):
    q, k, v, alibi = _make(case, scale=case.get("scale", 1.0))
    cu_q, cu_k = _cu(case["lq"]), _cu(case["lk"])
    max_q, max_k = max(case["lq"]), max(case["lk"])
    scale = 0.3

    def ours(q, k, v):
        out, lse, _ = metagpt_fast.flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale, alibi_slopes=alibi, return_attn_probs=True,
            backend="reference", **_kwargs(case),
        )  # fmt: skip
        return out, lse

    def oracle(q, k, v):
        return dense_oracle(q, k, v, case["lq"], case["lk"], scale, case.get("window", (-1, -1)),
                            case.get("causal", False), case.get("softcap", 0.0), alibi)  # fmt: skip

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = ours(*leaves)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    leaves_o = [t.clone().requires_grad_() for t in (q, k, v)]
    out_o, lse_o = oracle(*leaves_o)
    grads_o = torch.autograd.grad(out_o, leaves_o, g, allow_unused=True)
    torch.testing.assert_close(out, out_o, atol=1e-12, rtol=1e-10)
    _assert_lse(lse, lse_o, atol=1e-5)  # lse is float32 in the API
    for name, got, exp in zip(("dq", "dk", "dv"), grads, grads_o, strict=True):
        exp = torch.zeros_like(got) if exp is None else exp
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, exp, atol=1e-12, rtol=1e-10, msg=name)


def test_dense_layout_matches_varlen_and_bottom_right_causal():
    """(B, N, H, D) is B sequences of N; causal with Nq < Nk aligns to the bottom right (last query sees all)."""
    q, k, v = torch.randn(2, 3, 2, 8, dtype=F64), torch.randn(2, 5, 2, 8, dtype=F64), torch.randn(2, 5, 2, 8, dtype=F64)
    out, lse, probs = metagpt_fast.flash_attn_func(q, k, v, causal=True, return_attn_probs=True, backend="reference")
    assert out.shape == (2, 3, 2, 8) and lse.shape == (2, 2, 3) and probs.shape == (2, 2, 3, 5)
    expected, lse_o = dense_oracle(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), [3, 3], [5, 5], 8**-0.5,
                                   causal=True)  # fmt: skip
    torch.testing.assert_close(out.flatten(0, 1), expected)
    _assert_lse(lse.transpose(0, 1).flatten(1), lse_o, atol=1e-5)
    assert (probs[:, :, 0, 3:] == 0).all() and (probs[:, :, 0, :3] > 0).all()  # query 0 sees keys 0..2
    assert (probs[:, :, -1] > 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 3, dtype=F32))


def test_low_precision_reference_keeps_dtypes():
    q, k, v = (torch.randn(2, 4, 2, 16, dtype=BF16) for _ in range(3))
    out, lse, probs = metagpt_fast.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert out.dtype == BF16 and lse.dtype == F32 and probs.dtype == F32
    exact = metagpt_fast.flash_attn_func(q.double(), k.double(), v.double(), causal=True)
    assert (out.double() - exact).abs().max() < 2e-2


# ---------------------------------------------------------------------------------------------- packed forms


def test_packed_forms_match_unpacked_with_gradients():
    b, n, h, d = 2, 6, 2, 8
    qkv = torch.randn(b, n, 3, h, d, dtype=F64, requires_grad=True)
    kw = dict(causal=True, window_size=(2, -1), softcap=2.0, backend="reference")
    out = metagpt_fast.flash_attn_qkvpacked_func(qkv, **kw)
    q, k, v = qkv.detach().unbind(2)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = metagpt_fast.flash_attn_func(*leaves, **kw)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    (grad_qkv,) = torch.autograd.grad(out, qkv, g)
    torch.testing.assert_close(grad_qkv, torch.stack(torch.autograd.grad(ref, leaves, g), dim=2))

    kv = torch.stack((k, v), dim=2).requires_grad_()
    out_kv = metagpt_fast.flash_attn_kvpacked_func(q, kv, **kw)
    torch.testing.assert_close(out_kv, ref)

    cu = _cu([n] * b)
    out_vqkv = metagpt_fast.flash_attn_varlen_qkvpacked_func(qkv.flatten(0, 1), cu, n, **kw)
    torch.testing.assert_close(out_vqkv, ref.flatten(0, 1))
    out_vkv = metagpt_fast.flash_attn_varlen_kvpacked_func(q.flatten(0, 1), kv.flatten(0, 1), cu, cu, n, n, **kw)
    torch.testing.assert_close(out_vkv, ref.flatten(0, 1))
    (grad_kv,) = torch.autograd.grad(out_vkv, kv, g.flatten(0, 1))
    torch.testing.assert_close(grad_kv, grad_qkv[:, :, 1:])


def test_varlen_probs_are_padded_to_max_seqlen():
    q, k, v = torch.randn(5, 2, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    cu_q, cu_k = _cu([2, 3]), _cu([4, 3])
    out, lse, probs = metagpt_fast.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 9, return_attn_probs=True)
    assert lse.shape == (2, 5) and probs.shape == (2, 2, 6, 9)
    torch.testing.assert_close(probs[0, :, :2, :4].sum(-1), torch.ones(2, 2))
    assert (probs[0, :, 2:] == 0).all() and (probs[0, :, :, 4:] == 0).all() and (probs[1, :, :, 3:] == 0).all()


def test_window_past_every_sequence_is_unbounded():
    q, k, v = torch.randn(1, 5, 2, 8), torch.randn(1, 7, 2, 8), torch.randn(1, 7, 2, 8)
    torch.testing.assert_close(metagpt_fast.flash_attn_func(q, k, v, window_size=(7, 5)),
                               metagpt_fast.flash_attn_func(q, k, v))  # fmt: skip


# ------------------------------------------------------------------------------ deterministic, dropout, empty


def _fake_kernel(calls, features):
    def fn(**inputs):
        calls.append(inputs)
        return flash_op._reference(**inputs)

    caps = backends.Capabilities(devices=("cpu",), features=frozenset(features))
    return backends.Implementation("flash_attention", "cpu", fn, caps, priority=lambda inputs: 50)


def test_deterministic_runs_only_implementations_that_declare_it():
    q, k, v = (torch.randn(1, 4, 2, 8) for _ in range(3))
    calls = []
    with backends.registered(_fake_kernel(calls, {"window", "softcap", "alibi", "gqa"})):
        metagpt_fast.flash_attn_func(q, k, v, causal=True)
        assert len(calls) == 1  # auto picks the (faster) fake kernel
        out = metagpt_fast.flash_attn_func(q, k, v, causal=True, deterministic=True)
        assert len(calls) == 1  # ... but not for deterministic=True: the reference runs
        torch.testing.assert_close(out, metagpt_fast.flash_attn_func(q, k, v, causal=True, backend="reference"))
        with pytest.raises(ValueError, match="deterministic"):
            metagpt_fast.flash_attn_func(q, k, v, deterministic=True, backend="cpu")
    with backends.registered(_fake_kernel(calls, {"deterministic"})):
        metagpt_fast.flash_attn_func(q, k, v, deterministic=True, backend="cpu")
        assert len(calls) == 2
        with pytest.raises(ValueError, match="softcap > 0"):  # a feature it does not list: refused
            metagpt_fast.flash_attn_func(q, k, v, softcap=1.0, backend="cpu")


def test_fake_kernel_receives_the_contract_inputs():
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 6)
    calls = []
    with backends.registered(_fake_kernel(calls, {"window", "softcap", "alibi", "gqa"})):
        metagpt_fast.flash_attn_func(q, k, v, causal=True, window_size=(2, 9), alibi_slopes=torch.rand(4),
                                     softcap=3, backend="cpu")  # fmt: skip
    (inputs,) = calls
    assert inputs["q"].shape == (6, 4, 8) and inputs["k"].shape == (10, 2, 8) and inputs["v"].shape == (10, 2, 6)
    assert inputs["cu_seqlens_q"].tolist() == [0, 3, 6] and inputs["cu_seqlens_k"].tolist() == [0, 5, 10]
    assert inputs["cu_seqlens_q"].dtype == torch.int32
    assert (inputs["max_seqlen_q"], inputs["max_seqlen_k"]) == (3, 5)
    assert (inputs["causal"], inputs["window_left"], inputs["window_right"]) == (True, 2, 0)
    assert inputs["softcap"] == 3.0 and isinstance(inputs["softcap"], float)
    assert inputs["alibi_slopes"].shape == (2, 4) and inputs["alibi_slopes"].is_contiguous()
    assert inputs["softmax_scale"] == 1 / math.sqrt(8) and inputs["dropout_p"] == 0.0 and inputs["seed"] is None


def test_dropout_is_reproducible_and_unbiased():
    q, k, v = torch.randn(1, 16, 2, 8), torch.randn(1, 16, 2, 8), torch.randn(1, 16, 2, 8)
    torch.manual_seed(3)
    a = metagpt_fast.flash_attn_func(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    b = metagpt_fast.flash_attn_func(q, k, v, dropout_p=0.5)
    c = metagpt_fast.flash_attn_func(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, metagpt_fast.flash_attn_func(q, k, v))


@pytest.mark.parametrize("lens", [([0, 0], [3, 4]), ([2, 3], [0, 0]), ([0], [0])], ids=["no-query", "no-key", "none"])
def test_empty_inputs(lens):
    lq, lk = lens
    q = torch.randn(sum(lq), 2, 8, requires_grad=True)
    k = torch.randn(sum(lk), 2, 8, requires_grad=True)
    v = torch.randn(sum(lk), 2, 8, requires_grad=True)
    out, lse, _ = metagpt_fast.flash_attn_varlen_func(q, k, v, _cu(lq), _cu(lk), max(lq), max(lk),
                                                      return_attn_probs=True)  # fmt: skip
    assert out.shape == (sum(lq), 2, 8) and (out == 0).all() and lse.shape == (2, sum(lq))
    assert torch.isinf(lse).all() or sum(lq) == 0
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and (t.grad == 0).all()


# ---------------------------------------------------------------------------------------- fast implementations

# A kernel case: "lens" (per-sequence query / key lengths) or "dense" (B, Nq, Nk); heads, head dims, dtype, features.


def _kcase(nq, nk, d, dtype, b=1, heads=(2, 2), dv=None, causal=False, window=(-1, -1), softcap=0.0, alibi=None,
           lens=None, scale=None):  # fmt: skip
    lens = lens or ([nq] * b, [nk] * b)
    return dict(lq=lens[0], lk=lens[1], heads=heads, dims=(d, dv or d), dtype=dtype, causal=causal, window=window,
                softcap=softcap, alibi=alibi, scale=scale)  # fmt: skip


def _kname(c):
    lens = "x".join(str(n) for n in c["lq"]) + "-" + "x".join(str(n) for n in c["lk"])
    feats = []
    if c["causal"]:
        feats.append("causal")
    if tuple(c["window"]) != (-1, -1):
        feats.append(f"w{c['window'][0]}_{c['window'][1]}")
    if c["softcap"]:
        feats.append("softcap")
    if c["alibi"]:
        feats.append(f"alibi_{c['alibi']}")
    if c["heads"][0] != c["heads"][1]:
        feats.append(f"gqa{c['heads'][0]}_{c['heads'][1]}")
    return f"{lens}-d{c['dims'][0]}_{c['dims'][1]}-{DTYPE_IDS[c['dtype']]}-{'-'.join(feats) or 'plain'}"


def _kcases(rows):
    return {_kname(c): c for c in rows}


SEQLENS = [(113, 203), (1, 239), (108, 256)]
VARLEN = ([0, 1, 37, 113, 1, 64], [5, 0, 70, 113, 1, 203])  # zero-length and length-1 sequences
HEAD_DIMS = [40, 59, 64, 80, 96, 111, 128, 256]
EXPENSIVE_DIMS = (128, 256)


def _feature_rows(dtypes, seqlens, dims, w, varlen=VARLEN):
    """Each feature once per (dtype), rotating through the seqlen pairs and head dims."""
    features = [
        dict(causal=True),
        dict(window=(-1, 0)),
        dict(window=(0, -1)),
        dict(window=(w, 0)),
        dict(window=(w, w)),
        dict(causal=True, softcap=1.5, scale=3.0),
        dict(alibi="h", causal=True),
        dict(alibi="bh", window=(w, w)),
        dict(heads=(4, 2), causal=True, window=(w, -1)),
        dict(heads=(3, 1)),
        dict(),
    ]
    rows = []
    for t, dtype in enumerate(dtypes):
        for f, feature in enumerate(features):
            nq, nk = seqlens[(f + t) % len(seqlens)]
            rows.append(_kcase(nq, nk, dims[(f + 3 * t) % len(dims)], dtype, **feature))
        rows.append(_kcase(0, 0, dims[t % len(dims)], dtype, lens=varlen, causal=True, heads=(4, 2)))
        rows.append(_kcase(0, 0, dims[(t + 1) % len(dims)], dtype, lens=varlen, window=(w, 0), softcap=2.0))
    return rows


def _head_dim_rows(dtype, seqlen, dims, b=1):
    return [_kcase(*seqlen, d, dtype, causal=True, b=b) for d in dims]


def _tiered(quick, slow):
    """The ``quick`` cases (less those with a head dim of 128 or 256), and the others marked slow."""
    cases = {name: pytest.param(c, marks=pytest.mark.slow) for name, c in _kcases(slow).items()}
    for name, c in _kcases(quick).items():
        cases[name] = pytest.param(c, marks=pytest.mark.slow) if c["dims"][0] in EXPENSIVE_DIMS else c
    return cases


TRITON_CPU_VARLEN = ([0, 1, 9, 16], [3, 0, 20, 16])
TRITON_CPU_ROWS = _feature_rows((F32,), [(17, 33), (1, 29), (24, 24)], [16, 40, 59], 5, varlen=TRITON_CPU_VARLEN)
TRITON_CPU_QUICK = (0, 3, 5, 7, 8, 11)  # causal, (w, 0), softcap, ALiBi (B, H) with (w, w), GQA + window, varlen


FLASH_CASES = {
    # C++ kernels: every feature in float32 and bfloat16 on the seqlen pairs, every head dim.
    # Quick tier: float32; slow: bfloat16 and the float16 sweep of head dims.
    ("cpu", "cpu"): _tiered(
        _feature_rows((F32,), SEQLENS, HEAD_DIMS, 32),
        _feature_rows((BF16,), SEQLENS, HEAD_DIMS[1:], 32) + _head_dim_rows(F16, (108, 256), HEAD_DIMS),
    ),
    # Interpreted Triton: small shapes (the interpreter runs one program at a time), float32 / float16.
    # Quick tier: one case per feature.
    ("triton", "cpu"): _tiered(
        [TRITON_CPU_ROWS[i] for i in TRITON_CPU_QUICK],
        [r for i, r in enumerate(TRITON_CPU_ROWS) if i not in TRITON_CPU_QUICK]
        + [_kcase(0, 0, 32, F16, lens=TRITON_CPU_VARLEN, causal=True)],
    ),
    # Compiled Triton and CUDA: the pairs, the long ones too, every head dim.
    ("triton", "cuda"): _kcases(
        _feature_rows((BF16, F16, F32), SEQLENS + [(1023, 1024), (2048, 2048)], HEAD_DIMS, 256)
        + _head_dim_rows(BF16, (1023, 1024), HEAD_DIMS, b=2)
    ),
    ("cuda", "cuda"): _kcases(
        _feature_rows((BF16, F16), SEQLENS + [(1023, 1024), (2048, 2048)], HEAD_DIMS, 256)
        + _head_dim_rows(BF16, (1023, 1024), HEAD_DIMS, b=2)
    ),
}


def _params(op, cases):
    params = []
    for p in kernel_params(op, {key: {n: c for n, c in table.items()} for key, table in cases.items()}):
        backend, device, case = p.values
        marks = list(p.marks)
        if isinstance(case, type(pytest.param(None))):  # a slow-marked case
            marks += list(case.marks)
            case = case.values[0]
        params.append(pytest.param(backend, device, case, marks=marks, id=p.id))
    return params


def _slack_mask(case, device):
    """The bool mask and ALiBi bias of the whole packed batch as one (Hq, Tq, Tk) additive mask (block diagonal),
    for ``attention_backward_slack``; None when nothing is masked."""
    tq, tk = sum(case["lq"]), sum(case["lk"])
    mask = torch.zeros(tq, tk, dtype=torch.bool, device=device)
    q0 = k0 = 0
    left, right = case["window"]
    right = 0 if case["causal"] else right
    for lq, lk in zip(case["lq"], case["lk"], strict=True):
        mask[q0 : q0 + lq, k0 : k0 + lk] = reference_flash.allowed_mask(lq, lk, left, right, device)
        q0, k0 = q0 + lq, k0 + lk
    return mask


@pytest.mark.parametrize("backend, device, case", _params("flash_attention", FLASH_CASES))
def test_flash_attention_matches_reference(backend, device, case):
    dtype = case["dtype"]
    q, k, v, alibi = _make(case, dtype, device, scale=case["scale"] or 1.0)  # rounded to dtype once
    cu_q, cu_k = _cu(case["lq"], device), _cu(case["lk"], device)
    max_q, max_k = max(case["lq"]), max(case["lk"])
    kwargs = dict(causal=case["causal"], window_size=case["window"], softcap=case["softcap"], alibi_slopes=alibi)
    inputs = dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                  max_seqlen_q=max_q, max_seqlen_k=max_k, softmax_scale=q.shape[-1] ** -0.5,
                  causal=case["causal"] or case["window"][1] == 0, window_left=case["window"][0],
                  window_right=0 if case["causal"] else case["window"][1], softcap=float(case["softcap"]),
                  alibi_slopes=None if alibi is None else alibi.expand(len(case["lq"]), -1).contiguous(),
                  dropout_p=0.0)  # fmt: skip
    skip_unless_supported("flash_attention", backend, **inputs)

    def run(name, dt):
        def fn(q, k, v):
            return metagpt_fast.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, backend=name, **kwargs)

        results = outputs_and_grads(fn, [t.to(dt).requires_grad_() for t in (q, k, v)], device)
        with torch.no_grad():  # lse straight from the implementation (return_attn_probs would run the reference)
            up = {n: t.to(dt) for n, t in inputs.items() if n in ("q", "k", "v")}
            lse = helpers.implementation("flash_attention", name).fn(**{**inputs, **up}, seed=None)[1]
        return results, lse

    (fast, fast_lse), (lowp, lowp_lse), (exact, exact_lse) = (
        run(backend, dtype), run("reference", dtype), run("reference", oracle_dtype(dtype))
    )  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(7)
    grad_out = torch.randn(exact[0].shape, generator=gen, device=device)
    up = oracle_dtype(dtype)
    # What a flash-style backward rounds that autograd does not (metagpt_fast.testing), on the packed batch as one
    # block-diagonal masked problem. Softcap's tanh and ALiBi's bias are computed alike in both passes; the
    # bound's P is the uncapped one, which only matters through its size (<= 1 either way).
    slack = attention_backward_slack(
        *(t.to(dtype).transpose(0, 1)[None] for t in (q, k, v)),
        exact[0].transpose(0, 1)[None].to(up), grad_out.to(dtype).transpose(0, 1)[None].to(up),
        scale=q.shape[-1] ** -0.5, attn_mask=_slack_mask(case, device),
    )  # fmt: skip
    for name, f, lo, ex, extra in zip(("out", "dq", "dk", "dv"), fast, lowp, exact, (0.0, *slack), strict=True):
        assert f.dtype == dtype and torch.isfinite(f).all(), name
        assert_parity(f, lo, ex, name=name, extra=extra)
    inf = torch.isinf(exact_lse)
    assert torch.equal(torch.isinf(fast_lse), inf) and (fast_lse[inf] > 0).all(), "lse: +inf rows"
    # lse is float32 whatever the input dtype: its parity is measured in the precision it was computed from.
    assert_parity(fast_lse[~inf], lowp_lse[~inf], exact_lse[~inf].double(), name="lse", dtype=dtype)


# -------------------------------------------------------------------------------------------------- bad input


def _varlen_args():
    q, k, v = torch.randn(5, 2, 8), torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    return dict(q=q, k=k, v=v, cu_seqlens_q=_cu([2, 3]), cu_seqlens_k=_cu([4, 3]), max_seqlen_q=3, max_seqlen_k=4)


BAD_VARLEN = {
    "cu-int64": (dict(cu_seqlens_q=torch.tensor([0, 2, 5])), TypeError, "cu_seqlens_q"),
    "cu-float": (dict(cu_seqlens_k=torch.tensor([0.0, 4.0, 7.0])), TypeError, "cu_seqlens_k"),
    "cu-decreasing": (dict(cu_seqlens_k=torch.tensor([0, 5, 4, 7], dtype=torch.int32)), ValueError, "cu_seqlens_k"),
    "cu-total": (dict(cu_seqlens_q=torch.tensor([0, 2, 4], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    "cu-start": (dict(cu_seqlens_q=torch.tensor([1, 2, 5], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    "cu-2d": (dict(cu_seqlens_q=torch.tensor([[0, 2, 5]], dtype=torch.int32)), ValueError, "cu_seqlens_q"),
    "cu-count": (dict(cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32)), ValueError, "cu_seqlens_k"),
    "max-q-short": (dict(max_seqlen_q=2), ValueError, "max_seqlen_q"),
    "max-k-short": (dict(max_seqlen_k=3), ValueError, "max_seqlen_k"),
    "max-k-float": (dict(max_seqlen_k=4.0), TypeError, "max_seqlen_k"),
    "window-below": (dict(window_size=(-2, 0)), ValueError, "window_size"),
    "window-right-below": (dict(window_size=(3, -5)), ValueError, "window_size"),
    "window-int": (dict(window_size=4), TypeError, "window_size"),
    "window-triple": (dict(window_size=(1, 2, 3)), TypeError, "window_size"),
    "alibi-shape": (dict(alibi_slopes=torch.rand(3)), ValueError, "alibi_slopes"),
    "alibi-batch": (dict(alibi_slopes=torch.rand(3, 2)), ValueError, "alibi_slopes"),
    "alibi-dtype": (dict(alibi_slopes=torch.rand(2, dtype=F64)), TypeError, "alibi_slopes"),
    "alibi-grad": (dict(alibi_slopes=torch.rand(2, requires_grad=True)), ValueError, "alibi_slopes"),
    "softcap-negative": (dict(softcap=-1.0), ValueError, "softcap"),
    "softcap-nan": (dict(softcap=math.nan), ValueError, "softcap"),
    "dropout": (dict(dropout_p=1.0), ValueError, "dropout_p"),
    "scale-inf": (dict(softmax_scale=math.inf), ValueError, "softmax_scale"),
    "causal-int": (dict(causal=1), TypeError, "causal"),
    "deterministic-str": (dict(deterministic="yes"), TypeError, "deterministic"),
    "block-table": (dict(block_table=torch.zeros(1, 1, dtype=torch.int32)), ValueError, "block_table"),
    "k-heads": (dict(k=torch.randn(7, 3, 8), v=torch.randn(7, 3, 8)), ValueError, "heads"),
    "k-dim": (dict(k=torch.randn(7, 2, 4)), ValueError, "head dim"),
    "v-length": (dict(v=torch.randn(6, 2, 8)), ValueError, "v must"),
    "q-dtype": (dict(q=torch.randn(5, 2, 8, dtype=F64)), TypeError, "dtype"),
    "q-int": (dict(q=torch.ones(5, 2, 8, dtype=torch.int64)), TypeError, "q must"),
    "q-4d": (dict(q=torch.randn(1, 5, 2, 8)), ValueError, "q must"),
}


@pytest.mark.parametrize("change, error, name", list(BAD_VARLEN.values()), ids=list(BAD_VARLEN))
def test_bad_varlen_input_names_the_argument(change, error, name):
    args = {**_varlen_args(), **change}
    snapshot = {n: t.clone() for n, t in args.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(error, match=name):
        metagpt_fast.flash_attn_varlen_func(**args)
    for n, t in snapshot.items():  # nothing written
        assert torch.equal(args[n], t), n


BAD_DENSE = {
    "q-3d": (dict(q=torch.randn(4, 2, 8)), ValueError, "q must"),
    "k-batch": (dict(k=torch.randn(3, 6, 2, 8), v=torch.randn(3, 6, 2, 8)), ValueError, "batch"),
    "alibi-shape": (dict(alibi_slopes=torch.rand(2, 3)), ValueError, "alibi_slopes"),
    "window": (dict(window_size=(0, -3)), ValueError, "window_size"),
    "softcap": (dict(softcap=-0.5), ValueError, "softcap"),
    "return-probs": (dict(return_attn_probs=None), TypeError, "return_attn_probs"),
}


@pytest.mark.parametrize("change, error, name", list(BAD_DENSE.values()), ids=list(BAD_DENSE))
def test_bad_dense_input_names_the_argument(change, error, name):
    args = dict(q=torch.randn(2, 4, 2, 8), k=torch.randn(2, 6, 2, 8), v=torch.randn(2, 6, 2, 8), **{})
    args.update(change)
    with pytest.raises(error, match=name):
        metagpt_fast.flash_attn_func(**args)


def test_bad_packed_layouts():
    with pytest.raises(ValueError, match="qkv"):
        metagpt_fast.flash_attn_qkvpacked_func(torch.randn(2, 4, 2, 2, 8))
    with pytest.raises(ValueError, match="kv"):
        metagpt_fast.flash_attn_varlen_kvpacked_func(torch.randn(5, 2, 8), torch.randn(7, 3, 2, 8), _cu([5]),
                                                     _cu([7]), 5, 7)  # fmt: skip


# ------------------------------------------------------------------------------------------------------ shim


@pytest.fixture
def clean_flash_attn(monkeypatch):
    """No flash_attn module imported during the test; whatever was there is restored."""
    for name in shim.MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield
    shim.uninstall()


def test_shim_installs_when_flash_attn_is_absent(clean_flash_attn, monkeypatch):
    monkeypatch.setattr(shim.importlib.util, "find_spec", lambda name, *a: None)
    assert shim.install() and shim.installed() and shim.reason() is None
    assert shim.install()  # idempotent
    from flash_attn import flash_attn_func, flash_attn_varlen_func
    from flash_attn.flash_attn_interface import flash_attn_qkvpacked_func

    assert (
        flash_attn_func is metagpt_fast.flash_attn_func
        and flash_attn_varlen_func is metagpt_fast.flash_attn_varlen_func
    )
    assert flash_attn_qkvpacked_func is metagpt_fast.flash_attn_qkvpacked_func
    import flash_attn

    assert flash_attn.__version__.startswith("2.")
    q = torch.randn(1, 3, 2, 8)
    torch.testing.assert_close(
        flash_attn_func(q, q, q, causal=True), metagpt_fast.flash_attn_func(q, q, q, causal=True)
    )
    assert shim.uninstall() and "flash_attn" not in sys.modules and not shim.installed()


def test_shim_never_shadows_an_installed_flash_attn(clean_flash_attn, monkeypatch):
    import importlib.machinery

    spec = importlib.machinery.ModuleSpec("flash_attn", None, origin="/site-packages/flash_attn/__init__.py")
    monkeypatch.setattr(shim.importlib.util, "find_spec", lambda name, *a: spec if name == "flash_attn" else None)
    assert not shim.install()
    assert "installed" in shim.reason() and "flash_attn" not in sys.modules
    with pytest.raises(ImportError, match="never shadows"):
        shim.install(strict=True)


def test_shim_never_replaces_an_imported_flash_attn(clean_flash_attn, monkeypatch):
    real = types.ModuleType("flash_attn")
    monkeypatch.setitem(sys.modules, "flash_attn", real)
    assert not shim.install() and sys.modules["flash_attn"] is real
    assert not shim.uninstall() and sys.modules["flash_attn"] is real


def test_shim_against_this_environment(clean_flash_attn):
    """Without mocks: installs exactly when no flash_attn can be found here."""
    import importlib.util

    absent = importlib.util.find_spec("flash_attn") is None
    assert shim.install() == absent
    if not absent:
        assert "flash_attn" not in sys.modules or not shim.installed()


DETERMINISTIC_CASES = {
    ("cpu", "cpu"): {"gqa-window-varlen": dict(lens=([3, 40, 0, 17], [9, 40, 5, 30]), heads=(4, 2), window=(7, 0))},
    ("triton", "cpu"): {"gqa-window-varlen": dict(lens=([3, 16, 0, 9], [9, 16, 5, 20]), heads=(4, 2), window=(5, 0))},
    ("triton", "cuda"): {
        "gqa-window-varlen": dict(lens=([3, 400, 0, 777], [9, 400, 5, 1024]), heads=(8, 2), window=(64, 0))
    },  # fmt: skip
}


@pytest.mark.parametrize("backend, device, case", kernel_params("flash_attention", DETERMINISTIC_CASES))
def test_deterministic_backward_is_bitwise_repeatable(backend, device, case):
    impl = helpers.implementation("flash_attention", backend)
    if "deterministic" not in impl.capabilities.features:
        with pytest.raises(ValueError, match="deterministic"):
            metagpt_fast.flash_attn_func(*(torch.randn(1, 4, 2, 8, device=device) for _ in range(3)),
                                         deterministic=True, backend=backend)  # fmt: skip
        return
    lq, lk = case["lens"]
    hq, hk = case["heads"]
    q, k, v = (
        torch.randn(sum(lq), hq, 32, device=device),
        torch.randn(sum(lk), hk, 32, device=device),
        torch.randn(sum(lk), hk, 32, device=device),
    )
    g = torch.randn(sum(lq), hq, 32, device=device)
    results = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        cu_q, cu_k = _cu(lq, device), _cu(lk, device)
        out = metagpt_fast.flash_attn_varlen_func(
            *leaves, cu_q, cu_k, max(lq), max(lk), window_size=case["window"], deterministic=True, backend=backend
        )
        results.append([out.detach(), *torch.autograd.grad(out, leaves, g)])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        assert torch.equal(a, b), name
