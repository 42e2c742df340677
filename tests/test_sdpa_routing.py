"""Routing torch.nn.functional.scaled_dot_product_attention through metagpt_fast: reversible, context-local,
same results, torch's function for inputs outside metagpt_fast's semantics."""

import threading

import pytest
import torch
import torch.nn.functional as F

import metagpt_fast
from metagpt_fast.integrations import sdpa as routing
from metagpt_fast.testing import assert_parity

BACKENDS = [name for name, reason in metagpt_fast.available_backends().items() if reason is None]
TORCH_SDPA = F.scaled_dot_product_attention


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reach metagpt_fast's op."""
    seen = []
    op = routing.scaled_dot_product_attention

    def counting(*args, **kwargs):
        seen.append(1)
        return op(*args, **kwargs)

    monkeypatch.setattr(routing, "scaled_dot_product_attention", counting)
    yield seen
    routing.disable_sdpa_routing()
    assert F.scaled_dot_product_attention is TORCH_SDPA


def qkv(b=2, hq=4, hk=4, nq=9, nk=13, d=8, dtype=torch.float32):
    return (
        torch.randn(b, hq, nq, d, dtype=dtype),
        torch.randn(b, hk, nk, d, dtype=dtype),
        torch.randn(b, hk, nk, d, dtype=dtype),
    )


def test_context_manager_routes_and_restores(calls):
    q, k, v = qkv()
    assert F.scaled_dot_product_attention is TORCH_SDPA
    with metagpt_fast.sdpa_routing():
        assert routing.routing_sdpa()
        F.scaled_dot_product_attention(q, k, v)
        with metagpt_fast.sdpa_routing(False):  # switched off inside a block
            F.scaled_dot_product_attention(q, k, v)
            assert not routing.routing_sdpa()
        F.scaled_dot_product_attention(q, k, v)
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert len(calls) == 2


def test_global_switch_and_nesting(calls):
    q, k, v = qkv()
    metagpt_fast.enable_sdpa_routing()
    F.scaled_dot_product_attention(q, k, v)
    with metagpt_fast.sdpa_routing():
        metagpt_fast.disable_sdpa_routing()  # the open block keeps routing until it exits
        F.scaled_dot_product_attention(q, k, v)
    assert F.scaled_dot_product_attention is TORCH_SDPA
    F.scaled_dot_product_attention(q, k, v)
    assert len(calls) == 2


def test_context_is_local_to_its_thread(calls):
    q, k, v = qkv()
    with metagpt_fast.sdpa_routing():
        worker = threading.Thread(target=lambda: F.scaled_dot_product_attention(q, k, v))
        worker.start()
        worker.join()
        assert calls == []
        F.scaled_dot_product_attention(q, k, v)
    assert calls == [1]


CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "bool-padding": dict(mask=("bool", (2, 1, 1, 13))),
    "float-mask": dict(mask=("float", (9, 13))),
    "scale": dict(scale=0.3),
    "gqa": dict(hk=2, enable_gqa=True),
    "three-dims": dict(dims=3),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_routed_results_match_torch(backend, case, calls):
    c = CASES[case]
    q, k, v = qkv(hk=c.get("hk", 4))
    if c.get("dims") == 3:
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    kwargs = {key: c[key] for key in ("is_causal", "scale", "enable_gqa") if key in c}
    if "mask" in c:
        kind, shape = c["mask"]
        if kind == "bool":
            mask = torch.rand(shape) > 0.3
            mask[..., 0] = True
        else:
            mask = torch.randn(shape)
        kwargs["attn_mask"] = mask

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        kw = {
            key: (val.to(dtype) if isinstance(val, torch.Tensor) and val.is_floating_point() else val)
            for key, val in kwargs.items()
        }
        out = fn(*leaves, **kw)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape))
        return [out] + [t.grad for t in leaves]

    expected = run(TORCH_SDPA, torch.float64)
    with metagpt_fast.use_backend(backend), metagpt_fast.sdpa_routing():
        try:
            got = run(F.scaled_dot_product_attention, torch.float32)
        except ValueError as exc:
            if "cannot run" in str(exc):
                pytest.skip(f"{backend}: {exc}")
            raise
    assert calls == [1]
    for name, g, e in zip(("output", "dq", "dk", "dv"), got, expected, strict=True):
        assert_parity(g, g, e, name=name)


def test_inputs_outside_our_semantics_go_to_torch(calls):
    q, k, v = qkv()
    with metagpt_fast.sdpa_routing():
        bias = torch.randn(9, 13, requires_grad=True)  # a learned bias needs its gradient: torch serves it
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias).sum().backward()
        assert bias.grad is not None
        F.scaled_dot_product_attention(q[None], k[None], v[None])  # 5-D
        with pytest.raises(RuntimeError):  # mixed dtypes: torch's own error
            F.scaled_dot_product_attention(q, k.double(), v)
        with pytest.raises(RuntimeError):  # torch rejects a mask combined with is_causal
            F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(9, 13, dtype=torch.bool), is_causal=True)
    assert calls == []


def test_torch_multihead_attention_is_routed(calls):
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    expected, _ = mha(x, x, x, need_weights=False)
    with metagpt_fast.sdpa_routing():
        got, _ = mha(x, x, x, need_weights=False)
    assert calls == [1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_autocast_casts_like_torch(calls):
    q, k, v = qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = TORCH_SDPA(q, k, v, is_causal=True)
        with metagpt_fast.sdpa_routing():
            got = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert calls == [1]
    assert got.dtype == expected.dtype == torch.bfloat16
    exact = TORCH_SDPA(q.double(), k.double(), v.double(), is_causal=True)
    assert_parity(got, expected, exact, name="bf16 output")
