"""Backend registry: selection order, context-local choice, explicit requests, auto fallback, validation errors."""

import asyncio
import threading

import pytest
import torch

import metagpt_fast
from metagpt_fast import backends


def _qkv(*shape, dtype=torch.float32):
    return (torch.randn(*shape, dtype=dtype) for _ in range(3))


def test_available_backends_names_every_backend_with_a_reason_or_none():
    available = metagpt_fast.available_backends()
    assert set(available) == set(metagpt_fast.BACKENDS)
    assert available["reference"] is None
    for name, reason in available.items():
        assert reason is None or (isinstance(reason, str) and reason), name


def test_requested_backend_order(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.requested_backend() == "reference"
    with metagpt_fast.use_backend("auto"):
        assert backends.requested_backend() == "auto"
        assert backends.requested_backend("reference") == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="METAGPT_FAST_BACKEND"):
        backends.requested_backend()


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend must be"):
        with metagpt_fast.use_backend("tpu"):
            pass


def test_use_backend_is_thread_local():
    seen = {}
    ready = threading.Event()
    release = threading.Event()

    def worker():
        ready.wait()
        seen["worker"] = backends.requested_backend()
        release.set()

    thread = threading.Thread(target=worker)
    thread.start()
    with metagpt_fast.use_backend("reference"):
        ready.set()
        release.wait(5)
        seen["main"] = backends.requested_backend()
    thread.join()
    assert seen == {"worker": "auto", "main": "reference"}


def test_use_backend_is_task_local():
    async def task(name, delay):
        with metagpt_fast.use_backend(name):
            await asyncio.sleep(delay)
            return backends.requested_backend()

    async def main():
        return await asyncio.gather(task("reference", 0.02), task("auto", 0.01))

    assert asyncio.run(main()) == ["reference", "auto"]


def test_unavailable_explicit_backend_raises_with_reason():
    reasons = {name: r for name, r in metagpt_fast.available_backends().items() if r is not None}
    if not reasons:
        pytest.skip("every backend is available here")
    name, reason = next(iter(reasons.items()))
    q, k, v = _qkv(1, 1, 4, 8)
    with pytest.raises(ValueError, match="unavailable"):
        metagpt_fast.scaled_dot_product_attention(q, k, v, backend=name)


def test_auto_falls_back_and_explicit_unsupported_raises():
    calls = []

    def fake(**inputs):
        calls.append(inputs)
        return inputs["query"]

    def reasons(**inputs):
        return ["head dim 8 is not supported"] if inputs["query"].shape[-1] == 8 else []

    caps = backends.Capabilities(devices=("cpu",))
    impl = backends.Implementation("attention", "cpu", fake, caps, reasons, priority=lambda inputs: 1000)
    with backends.registered(impl):
        q, k, v = _qkv(1, 1, 4, 8)
        out = metagpt_fast.scaled_dot_product_attention(q, k, v)  # auto: cpu refuses, reference serves
        assert not calls and out.shape == q.shape
        with pytest.raises(ValueError, match="head dim 8 is not supported"):
            metagpt_fast.scaled_dot_product_attention(q, k, v, backend="cpu")
        q, k, v = _qkv(1, 1, 4, 16)
        metagpt_fast.scaled_dot_product_attention(q, k, v)
        assert len(calls) == 1 and calls[0]["seed"] is None


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(query="q"), TypeError, "query must be a torch.Tensor"),
        (dict(query=torch.randn(2, 4, 8)[None, None]), ValueError, "query must have 3 or 4 dimensions"),
        (dict(key=torch.randn(2, 2, 5, 8, dtype=torch.float64)), TypeError, "share one dtype"),
        (dict(key=torch.randn(2, 2, 5, 4)), ValueError, "key's head dim"),
        (dict(key=torch.randn(2, 3, 5, 8)), ValueError, "key must have query's number of heads"),
        (dict(value=torch.randn(2, 2, 6, 8)), ValueError, "value must have key's sequence length"),
        (dict(dropout_p=1.0), ValueError, "dropout_p must be in"),
        (dict(dropout_p=-0.1), ValueError, "dropout_p must be in"),
        (dict(scale=float("nan")), ValueError, "scale must be"),
        (dict(attn_mask=torch.ones(3, 5, dtype=torch.bool)), ValueError, "attn_mask of shape"),
        (dict(attn_mask=torch.ones(5, 5, dtype=torch.int32)), TypeError, "attn_mask must be bool"),
        (dict(attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True), ValueError, "cannot be combined"),
        (dict(query=torch.randint(0, 3, (2, 2, 5, 8))), TypeError, "query must be float"),
        (dict(enable_gqa=True, query=torch.randn(2, 3, 5, 8)), ValueError, "divide"),
    ],
)
def test_attention_validation_names_the_argument(kwargs, error, match):
    inputs = dict(zip(("query", "key", "value"), _qkv(2, 2, 5, 8), strict=True))
    inputs.update(kwargs)
    with pytest.raises(error, match=match):
        metagpt_fast.scaled_dot_product_attention(**inputs)


def test_attention_accepts_3d_inputs_like_torch():
    q, k, v = _qkv(2, 5, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(metagpt_fast.scaled_dot_product_attention(q, k, v, is_causal=True), expected)


def test_positional_validation_names_the_argument():
    weight = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 10\)"):
        metagpt_fast.embed_positions(torch.tensor([[1, 10]]), weight)
    with pytest.raises(ValueError, match="tokens must lie"):
        metagpt_fast.embed_positions(torch.tensor([[-1, 2]]), weight)
    with pytest.raises(TypeError, match="tokens must hold integer"):
        metagpt_fast.embed_positions(torch.tensor([[1.0, 2.0]]), weight)
    with pytest.raises(ValueError, match="offset must be >= 0"):
        metagpt_fast.add_positional_encoding(torch.randn(1, 3, 4), offset=-1)
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        metagpt_fast.add_positional_encoding(torch.randn(3, 4))
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        metagpt_fast.apply_rotary(torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8), rotary_dim=5)
    with pytest.raises(ValueError, match="position_ids must have shape"):
        metagpt_fast.apply_rotary(torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8), position_ids=torch.arange(4))
