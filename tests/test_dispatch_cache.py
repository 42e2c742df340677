"""The light dispatch path: input signatures, the registry's selection cache and the ops' memoised checks.

A cached answer must be the one the full path gives: a change to the registry is seen at once, inputs that differ in
anything a check reads get their own answer, and checks of tensor values still run on every call."""

import pytest
import torch

import metagpt_fast
from metagpt_fast import backends
from metagpt_fast.backends import registry
from metagpt_fast.backends.signature import MEMO_LIMIT, Memo, signature
from metagpt_fast.ops.reference import kvcache as kv_reference


def test_signature_tells_apart_what_checks_read():
    x = torch.randn(2, 3)
    base = signature(x, 1, None)
    assert base == signature(torch.randn(2, 3), 1, None)  # other values, same metadata
    assert base != signature(torch.randn(3, 2), 1, None)
    assert base != signature(torch.randn(3, 2).t(), 1, None)  # same shape, other strides
    assert base != signature(x.double(), 1, None)
    assert base != signature(x.requires_grad_(True), 1, None)
    x.requires_grad_(False)
    assert len({signature(x, 1), signature(x, 1.0), signature(x, True)}) == 3  # 1 == 1.0 == True, types differ
    assert signature(x, (1, -1)) != signature(x, (1.0, -1))
    assert signature(x, [4]) != signature(x, (4,))
    y = torch.randn(2, 3)
    assert signature(x, x) != signature(x, y)  # aliasing is a reason for some kernels
    with torch.no_grad():
        assert signature(x, 1, None) != base  # the grad mode
    assert signature(torch.nn.Parameter(x)) != signature(x)


class _Subclass(torch.Tensor):
    pass


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.randn(2).as_subclass(_Subclass),
        lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]),
        object,
        lambda: [torch.randn(2)],
        lambda: (1, object()),
    ],
)
def test_signature_refuses_what_it_cannot_summarise(make):
    assert signature(torch.randn(2), make()) is None


def test_memo_starts_over_when_full():
    memo = Memo()
    for i in range(MEMO_LIMIT + 1):
        memo.put(i, i)
    assert len(memo) == 1 and memo[MEMO_LIMIT] == MEMO_LIMIT


def test_selection_cache_follows_registry_changes():
    calls = []

    def fake(**inputs):
        calls.append(inputs)
        return inputs["input"]

    x, w, b = torch.randn(3, 8), torch.ones(8), torch.zeros(8)
    before = metagpt_fast.layer_norm(x, (8,), w, b)  # caches the selection for this signature
    caps = backends.Capabilities(devices=("cpu",))
    impl = backends.Implementation("layer_norm", "cpu", fake, caps, priority=lambda inputs: 1000)
    with backends.registered(impl):
        out = metagpt_fast.layer_norm(x, (8,), w, b)
        assert len(calls) == 1 and out is x  # the new implementation at once, not the cached choice
    after = metagpt_fast.layer_norm(x, (8,), w, b)
    assert len(calls) == 1 and torch.equal(after, before)  # and the previous one once it is gone


def test_invalidate_forgets_cached_selections():
    x = torch.randn(2, 4)
    backends.select("layer_norm", None, input=x, normalized_shape=(4,), weight=None, bias=None, eps=1e-5,
                    residual=None)  # fmt: skip
    assert len(registry._selections) > 0
    registry.invalidate()
    assert len(registry._selections) == 0


def test_explicit_refusal_raises_on_every_call():
    x = torch.randn(2, 4, dtype=torch.float64)  # the compiled kernels take float32 / 16-bit
    if backends.available_backends()["cpu"] is not None:
        pytest.skip("the compiled extension is not loaded")
    for _ in range(2):
        with pytest.raises(ValueError, match="float64"):
            metagpt_fast.layer_norm(x, (4,), backend="cpu")


def test_memoised_norm_checks_still_see_other_arguments():
    x = torch.randn(2, 4)
    metagpt_fast.layer_norm(x, (4,), eps=1e-5)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        metagpt_fast.layer_norm(x, (4,), eps=-1e-5)
    with pytest.raises(TypeError, match="eps must be a float"):
        metagpt_fast.layer_norm(x, (4,), eps="1e-5")
    metagpt_fast.rms_norm(x, 4)
    with pytest.raises(TypeError, match="normalized_shape"):
        metagpt_fast.rms_norm(x, 4.0)


def test_memoised_decode_checks_still_read_the_lengths():
    """Same signature, new values: a call that passed once does not let an out-of-range length through, and the
    cache is left unchanged."""
    kc, vc = torch.zeros(2, 6, 2, 8), torch.zeros(2, 6, 2, 8)
    q, k, v = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    metagpt_fast.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=torch.tensor([0, 3], dtype=torch.int32))
    before = kc.clone(), vc.clone()
    for bad, match in (([6, 6], "exceeds the cache's capacity"), ([-1, 2], "must be >= 0")):
        with pytest.raises(ValueError, match=match):
            metagpt_fast.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=torch.tensor(bad, dtype=torch.int32))
        assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])


@pytest.mark.parametrize("seqlens", [[4, 4, 4], [0, 0, 0], [4, 1, 5]])
def test_decode_appends_as_the_reference_write(seqlens):
    """Rows of equal length take a strided copy instead of the indexed write: both give the reference's cache."""
    torch.manual_seed(0)
    kc, vc = torch.randn(4, 7, 2, 8), torch.randn(4, 7, 2, 8)
    q, k, v = torch.randn(3, 2, 2, 8), torch.randn(3, 2, 2, 8), torch.randn(3, 2, 2, 8)
    lengths = torch.tensor(seqlens, dtype=torch.int32)
    want_k, want_v = kc.clone(), vc.clone()
    kv_reference.write_cache(want_k, want_v, k, v, lengths, None, None)
    out = metagpt_fast.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lengths, causal=True)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    expected = metagpt_fast.flash_attn_with_kvcache(q, want_k, want_v, cache_seqlens=lengths + 2, causal=True,
                                                    backend="reference")  # fmt: skip
    torch.testing.assert_close(out, expected)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support")
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_non_strided_tensors_are_refused_naming_the_argument(layout):
    """A sparse tensor has no strides to summarise (CSR's stride() raises): the signature gives None, and the ops'
    checks refuse it with a TypeError naming the argument instead of an error from deep inside."""
    x = torch.randn(2, 4)
    sparse = x.to_sparse() if layout == "coo" else x.to_sparse_csr()
    q = torch.randn(1, 2, 1, 4)
    assert signature(x, sparse) is None
    for call, name in (
        (lambda: metagpt_fast.layer_norm(sparse, (4,)), "input"),
        (lambda: metagpt_fast.rms_norm(x, (4,), weight=torch.ones(4).to_sparse()), "weight"),
        (lambda: metagpt_fast.bias_gelu(sparse, None), "x"),
        (lambda: metagpt_fast.layer_norm(x, (4,), residual=sparse), "residual"),
        (lambda: metagpt_fast.scaled_dot_product_attention(q.to_sparse(), q, q), "query"),
        (lambda: metagpt_fast.flash_attn_with_kvcache(q, q.to_sparse(), q), "k_cache"),
    ):
        with pytest.raises(TypeError, match=f"{name} is a sparse"):
            call()


@pytest.mark.parametrize("backend", ["no-such-backend", "unavailable"])
def test_decode_refusing_the_backend_leaves_the_cache_unwritten(backend, monkeypatch):
    """The backend request is part of validation: a name that is not a backend, or a backend that cannot serve the
    call, raises before the new keys and values are appended (they were written first, then the call raised)."""
    kc, vc = torch.zeros(2, 6, 2, 8), torch.zeros(2, 6, 2, 8)
    q, k, v = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    lengths = torch.tensor([0, 3], dtype=torch.int32)
    if backend == "unavailable":
        backend = "cpu"
        monkeypatch.setitem(registry._unavailable, "cpu", "switched off for this test")
        monkeypatch.setattr(registry, "_selections", registry.Memo())  # the previous cache comes back afterwards
    for _ in range(2):  # the second call through the memoised checks
        with pytest.raises(ValueError, match="backend"):
            metagpt_fast.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lengths, backend=backend)
        assert not kc.any() and not vc.any()
