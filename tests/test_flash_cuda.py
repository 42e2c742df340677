"""The ``cuda`` backend of the flash_attention op (backends/compiled/flash_cuda.py, csrc/attention/).

On the CPU: what it declares it serves and refuses (the decision table below, through the same capabilities and
reasons the registry applies on a GPU), its priority against Triton per architecture, and its wiring (the packed
layout read as (B, H, N, D), the window and causal arguments, lse's layout, the autograd formula) against the
reference with a CPU stand-in for the CUDA kernels. On a GPU (marker ``gpu``,
skipped here): parity with the reference on outputs, lse and every gradient for dense calls in float16 / bfloat16 at
head dims 64 and 128 with causal masks and windows aligned to the bottom right, softcap and GQA; a bitwise repeatable
backward; ``auto`` falling back and ``backend="cuda"`` raising on inputs it refuses. The full feature sweep on GPU
is tests/test_flash_api.py's ("cuda", "cuda") cases.
"""

import dataclasses

import pytest
import torch
from helpers import requires_cuda

import metagpt_fast
from metagpt_fast import backends
from metagpt_fast.ops.reference import flash as reference_flash
from metagpt_fast.testing import assert_parity, attention_backward_slack, oracle_dtype, outputs_and_grads

F16, BF16 = torch.float16, torch.bfloat16


def _flash_module():
    impl = backends.lookup("flash_attention", "cuda")
    if impl is None:
        pytest.skip("the compiled extension is not loaded")
    from metagpt_fast.backends.compiled import flash_cuda

    return impl, flash_cuda


def _cu(lengths, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _inputs(lq=(16, 16), lk=(24, 24), heads=(4, 2), d=64, dv=None, dtype=F16, device="cpu", **overrides):
    """The op's inputs (what ops/flash.py passes an implementation) for sequences of lengths lq / lk."""
    hq, hk = heads
    q = torch.randn(sum(lq), hq, d, device=device).to(dtype)
    k = torch.randn(sum(lk), hk, d, device=device).to(dtype)
    v = torch.randn(sum(lk), hk, dv or d, device=device).to(dtype)
    inputs = dict(
        q=q, k=k, v=v, cu_seqlens_q=_cu(lq, device), cu_seqlens_k=_cu(lk, device), max_seqlen_q=max(lq),
        max_seqlen_k=max(lk), softmax_scale=d**-0.5, causal=False, window_left=-1, window_right=-1, softcap=0.0,
        alibi_slopes=None, dropout_p=0.0,
    )  # fmt: skip
    return {**inputs, **overrides}


# ------------------------------------------------------------------------------------ the decision table (CPU)

# case -> (inputs, the reason's words, or None when served)
DECISIONS = {
    "dense-fp16-d64": (dict(), None),
    "dense-bf16-d128": (dict(dtype=BF16, d=128), None),
    "causal-bottom-right": (dict(causal=True, window_right=0), None),
    "window-left": (dict(window_left=8, window_right=0, causal=True), None),
    "window-both": (dict(window_left=5, window_right=3), None),
    "softcap": (dict(softcap=30.0), None),
    "mqa": (dict(heads=(4, 1)), None),
    "nq-above-nk": (dict(lq=(24, 24), lk=(16, 16), causal=True, window_right=0), None),
    "varlen-q": (dict(lq=(16, 9)), "variable-length sequences"),
    "varlen-k": (dict(lk=(24, 20)), "variable-length sequences"),
    "alibi": (dict(alibi_slopes=torch.rand(2, 4)), "ALiBi slopes: not served by cuda"),
    "dropout": (dict(dropout_p=0.1), "dropout_p > 0: not served by cuda"),
    "float32": (dict(dtype=torch.float32), "supports float16, bfloat16"),
    "head-dim-96": (dict(d=96), "head dims in (64, 128)"),
    "head-dim-32": (dict(d=32), "head dims in (64, 128)"),
    "value-dim-differs": (dict(d=64, dv=128), "head dims in (64, 128), all equal"),
    "batch-over-grid": (dict(lq=(1,) * 65536, lk=(1,) * 65536, heads=(1, 1)), "CUDA grid limit"),
    "softcap-with-grad": (dict(softcap=30.0, grad=True), None),
    "window-with-grad": (dict(window_left=8, window_right=0, causal=True, grad=True), None),
}


def _served_here(impl, flash, kernels=True):
    """``impl`` as the registry applies it on a GPU, but taking CPU tensors: the same capabilities (less the device
    and compute capability) and the same CUDA reasons."""
    caps = dataclasses.replace(impl.capabilities, devices=("cpu",), min_compute_capability=None)

    def reasons(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **_):
        return flash.cuda_reasons(q, k, cu_seqlens_q, max_seqlen_q, max_seqlen_k, kernels=kernels)

    return dataclasses.replace(impl, capabilities=caps, extra_reasons=reasons)


@pytest.mark.parametrize("case", DECISIONS)
def test_decision_table(case):
    impl, flash = _flash_module()
    overrides, expected = dict(DECISIONS[case][0]), DECISIONS[case][1]
    grad = overrides.pop("grad", False)
    inputs = _inputs(**overrides)
    if grad:
        inputs["q"].requires_grad_()
    reasons = _served_here(impl, flash).not_supported_reasons(**inputs)
    if expected is None:
        assert reasons == []
    else:
        assert any(expected in r for r in reasons), reasons


def test_capabilities():
    impl, flash = _flash_module()
    caps = impl.capabilities
    assert caps.devices == ("cuda",) and caps.min_compute_capability == (8, 0)
    assert caps.dtypes == (F16, BF16) and caps.head_dims == (64, 128)
    assert caps.features == {"window", "softcap", "gqa", "deterministic"}


def test_without_the_kernels_every_input_is_refused_with_the_reason():
    impl, flash = _flash_module()
    reasons = _served_here(impl, flash, kernels=False).not_supported_reasons(**_inputs())
    assert reasons == [flash.NO_CUDA_KERNELS]


def test_ranks_above_triton_on_sm80_and_below_on_sm90(monkeypatch):
    impl, _ = _flash_module()
    triton = 20  # backends/triton/flash.py
    inputs = _inputs()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert impl.priority(inputs) > triton
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert impl.priority(inputs) < triton


# ------------------------------------------------------------------- the wiring, with a CPU stand-in for the kernels


class StandIn:
    """``attention_window_fwd`` / ``attention_window_bwd`` on (B, H, N, D) tensors, written out densely (any device
    and dtype): what the binding's kernels compute, so the custom ops around them can run on the CPU."""

    calls: list

    def __init__(self):
        self.calls = []

    @staticmethod
    def _probabilities(q, k, left, right, bottom_right, softcap, scale):
        """P (B, Hq, Nq, Nk), lse (B, Hq, Nq) and d(score)/d(raw score), with k repeated over the GQA group."""
        nq, nk = q.shape[2], k.shape[2]
        raw = (q @ k.transpose(-1, -2)) * scale
        s, slope = raw, torch.ones_like(raw)
        if softcap > 0:
            t = torch.tanh(raw / softcap)
            s, slope = softcap * t, 1 - t * t
        if bottom_right:
            allowed = reference_flash.allowed_mask(nq, nk, left, right, q.device)
        else:  # top-left: the key aligned with query i is i
            allowed = reference_flash.allowed_mask(nq, nq, left, right, q.device)[:, :nk]
            allowed = torch.nn.functional.pad(allowed, (0, max(0, nk - nq)))
        s = s.masked_fill(~allowed, torch.finfo(s.dtype).min)
        p = torch.softmax(s, -1) * allowed
        lse = torch.logsumexp(s, -1).masked_fill(~allowed.any(-1), float("inf"))
        return p, lse.float(), slope

    def forward(self, q, k, v, mask, dropout_p, left, right, bottom_right, softcap, scale, seed):
        self.calls.append(("forward", q.shape, k.shape, left, right, bottom_right, softcap, scale))
        assert mask is None and dropout_p == 0.0 and seed is None
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        p, lse, _ = self._probabilities(q, k, left, right, bottom_right, softcap, scale)
        return p @ v, lse

    def backward(self, grad_out, q, k, v, out, lse, mask, dropout_p, left, right, bottom_right, softcap, scale, seed):
        """The flash backward written out: dV = P^T dO, dS = P (dO V^T - rowsum(dO O)) (times 1 - tanh^2 under a
        softcap), dQ = scale dS K, dK = scale dS^T Q, dK and dV summed over each GQA group."""
        self.calls.append(("backward", q.shape, k.shape, left, right, bottom_right, softcap, scale))
        assert lse.shape == q.shape[:3] and out.shape == q.shape and grad_out.shape == q.shape
        b, hk, nk, d = k.shape
        group = q.shape[1] // hk
        kr, vr = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        p, _, slope = self._probabilities(q, kr, left, right, bottom_right, softcap, scale)
        ds = p * (grad_out @ vr.transpose(-1, -2) - (grad_out * out).sum(-1, keepdim=True)) * slope
        dq = scale * ds @ kr
        dk = (scale * ds.transpose(-1, -2) @ q).view(b, hk, group, nk, d).sum(2)
        dv = (p.transpose(-1, -2) @ grad_out).view(b, hk, group, nk, d).sum(2)
        return dq, dk, dv


WIRING_CASES = {
    "plain": dict(lq=(5, 5), lk=(5, 5), heads=(2, 2)),
    "causal-nq<nk-gqa": dict(lq=(4, 4, 4), lk=(9, 9, 9), heads=(4, 2), causal=True),
    "causal-nq>nk": dict(lq=(9, 9), lk=(4, 4), heads=(2, 1), causal=True),  # rows with no key: out 0, lse +inf
    "window-both-softcap": dict(lq=(7, 7), lk=(11, 11), heads=(3, 3), window=(3, 2), softcap=2.0),
    "window-left-one-sequence": dict(lq=(12,), lk=(12,), heads=(2, 2), window=(4, 0)),
}


@pytest.mark.parametrize("case", WIRING_CASES)
def test_wiring_matches_reference_with_a_cpu_stand_in(case, monkeypatch):
    """Outputs, lse and every gradient of the cuda custom ops around a dense stand-in of the kernels equal the
    reference's in float64: the (B, H, N, D) views, bottom-right alignment, causal as window_right 0, softcap and
    lse's (Hq, Tq) layout are wired right."""
    impl, flash = _flash_module()
    stand_in = StandIn()
    monkeypatch.setattr(flash, "kernels", stand_in)
    c = WIRING_CASES[case]
    left, right = c.get("window", (-1, -1))
    causal = c.get("causal", False)
    inputs = _inputs(c["lq"], c["lk"], c["heads"], d=8, dtype=torch.float64, causal=causal or right == 0,
                     window_left=left, window_right=0 if causal else right, softcap=c.get("softcap", 0.0))  # fmt: skip
    grad_out = torch.randn(inputs["q"].shape, dtype=torch.float64)

    def run(fn):
        leaves = [inputs[n].clone().requires_grad_() for n in ("q", "k", "v")]
        out, lse = fn(**{**inputs, "q": leaves[0], "k": leaves[1], "v": leaves[2]}, seed=None)
        return [out.detach(), lse, *torch.autograd.grad(out, leaves, grad_out)]

    got = run(impl.fn)
    expected = run(backends.lookup("flash_attention", "reference").fn)
    for name, g, e in zip(("out", "lse", "dq", "dk", "dv"), got, expected, strict=True):
        assert g.shape == e.shape and g.is_contiguous(), name
        inf = torch.isinf(e)
        assert torch.equal(torch.isinf(g), inf), name
        # lse is float32 in the kernels' contract (the stand-in rounds its float64 lse to it): float32 rounding there.
        torch.testing.assert_close(g[~inf].double(), e[~inf].double(), atol=1e-6 if name == "lse" else 1e-10,
                                   rtol=1e-6 if name == "lse" else 1e-10, msg=name)  # fmt: skip
    # One forward and one backward call, on (B, H, N, D) views, bottom-right aligned, causal as window_right 0.
    batch, hq, hk = len(c["lq"]), *c["heads"]
    want = (torch.Size([batch, hq, c["lq"][0], 8]), torch.Size([batch, hk, c["lk"][0], 8]), left,
            0 if causal else right, True, c.get("softcap", 0.0), 8**-0.5)  # fmt: skip
    assert stand_in.calls == [("forward", *want), ("backward", *want)]


def test_custom_ops_pass_opcheck(monkeypatch):
    impl, flash = _flash_module()
    monkeypatch.setattr(flash, "kernels", StandIn())
    inputs = _inputs((6, 6), (8, 8), (2, 1), d=8, dtype=torch.float32, causal=True, window_left=3, window_right=0)
    args = [inputs[n] for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                                "softmax_scale", "causal", "window_left", "window_right", "softcap", "alibi_slopes",
                                "dropout_p")] + [None]  # fmt: skip
    args[0] = args[0].clone().requires_grad_()
    torch.library.opcheck(torch.ops.metagpt_fast.cuda_flash_attention_forward, args)
    out, lse = torch.ops.metagpt_fast.cuda_flash_attention_forward(*args)
    grad_out = torch.randn_like(out)
    bwd = [grad_out, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:3]], out.detach(), lse,
           *args[3:]]  # fmt: skip
    torch.library.opcheck(torch.ops.metagpt_fast.cuda_flash_attention_backward, bwd)


# ---------------------------------------------------------------------------------------------------- on a GPU

# (Nq, Nk, heads, causal, window, softcap): dense calls, odd lengths, Nq != Nk (bottom-right alignment).
GPU_CASES = {
    "plain-odd": (77, 77, (4, 4), False, (-1, -1), 0.0),
    "causal-nq<nk": (100, 300, (4, 4), True, (-1, -1), 0.0),
    "causal-nq>nk": (300, 129, (4, 2), True, (-1, -1), 0.0),
    "window-left": (257, 257, (8, 2), True, (64, 0), 0.0),
    "window-both": (200, 333, (4, 1), False, (31, 17), 0.0),
    "softcap": (190, 190, (4, 4), False, (-1, -1), 30.0),
    "softcap-window-gqa": (1023, 1024, (8, 2), True, (128, 0), 50.0),
}


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.gpu
@requires_cuda
def test_dense_calls_match_reference(case, d, dtype):
    nq, nk, (hq, hk), causal, window, softcap = GPU_CASES[case]
    batch, right = 2, 0 if causal else window[1]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, n, h, d, generator=gen, device="cuda") for n, h in ((nq, hq), (nk, hk), (nk, hk)))
    kwargs = dict(causal=causal, window_size=window, softcap=softcap)
    packed = dict(causal=right == 0, window_left=window[0], window_right=right, softcap=softcap)
    assert backends.select("flash_attention", "cuda", **_inputs((nq,) * batch, (nk,) * batch, (hq, hk), d,
                           dtype=dtype, device="cuda", **packed)).backend == "cuda"  # fmt: skip

    def run(name, dt):
        def fn(q, k, v):
            return metagpt_fast.flash_attn_func(q, k, v, backend=name, **kwargs)

        leaves = [t.to(dt).requires_grad_() for t in (q, k, v)]
        results = outputs_and_grads(fn, leaves, "cuda")
        with torch.no_grad():  # lse straight from the implementation (return_attn_probs would run the reference)
            flat = {n: t.detach().flatten(0, 1) for n, t in zip("qkv", leaves, strict=True)}
            inputs = _inputs((nq,) * batch, (nk,) * batch, (hq, hk), d, device="cuda", **packed) | flat
            lse = backends.lookup("flash_attention", name).fn(**inputs, seed=None)[1]
        return results, lse

    (fast, fast_lse), (lowp, lowp_lse), (exact, exact_lse) = (
        run("cuda", dtype), run("reference", dtype), run("reference", oracle_dtype(dtype))
    )  # fmt: skip
    up = oracle_dtype(dtype)
    grad_out = torch.randn(exact[0].shape, generator=torch.Generator(device="cuda").manual_seed(7), device="cuda")
    slack = attention_backward_slack(
        *(t.to(dtype).transpose(1, 2) for t in (q, k, v)), exact[0].transpose(1, 2).to(up),
        grad_out.to(dtype).transpose(1, 2).to(up), scale=d**-0.5,
        attn_mask=reference_flash.allowed_mask(nq, nk, window[0], right, "cuda"),
    )  # fmt: skip
    for name, f, lo, ex, extra in zip(("out", "dq", "dk", "dv"), fast, lowp, exact, (0.0, *slack), strict=True):
        assert f.dtype == dtype and torch.isfinite(f).all(), name
        assert_parity(f, lo, ex, name=name, extra=extra)
    inf = torch.isinf(exact_lse)
    assert torch.equal(torch.isinf(fast_lse), inf) and (fast_lse[inf] > 0).all(), "lse: +inf rows"
    assert_parity(fast_lse[~inf], lowp_lse[~inf], exact_lse[~inf].double(), name="lse", dtype=dtype)


@pytest.mark.gpu
@requires_cuda
def test_backward_is_bitwise_repeatable():
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 513, 8, 128, generator=gen, device="cuda", dtype=BF16)
    k, v = (torch.randn(2, 700, 2, 128, generator=gen, device="cuda", dtype=BF16) for _ in range(2))
    g = torch.randn(q.shape, generator=gen, device="cuda", dtype=BF16)
    results = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = metagpt_fast.flash_attn_func(
            *leaves, causal=True, window_size=(96, 0), softcap=20.0, deterministic=True, backend="cuda"
        )
        results.append([out.detach(), *torch.autograd.grad(out, leaves, g)])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.gpu
@requires_cuda
def test_refused_inputs_fall_back_under_auto_and_raise_when_asked_for():
    q = torch.randn(9, 4, 64, device="cuda", dtype=F16)
    k = v = torch.randn(12, 4, 64, device="cuda", dtype=F16)
    cu_q, cu_k = _cu([4, 5], "cuda"), _cu([6, 6], "cuda")
    with pytest.raises(ValueError, match="variable-length sequences"):
        metagpt_fast.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6, backend="cuda")
    out = metagpt_fast.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 6)  # auto: another backend serves it
    assert out.shape == q.shape
    dense = torch.randn(2, 8, 4, 64, device="cuda", dtype=F16)
    with pytest.raises(ValueError, match="ALiBi"):
        metagpt_fast.flash_attn_func(dense, dense, dense, alibi_slopes=torch.rand(4, device="cuda"), backend="cuda")
    with pytest.raises(ValueError, match="head dims"):
        wide = torch.randn(2, 8, 4, 96, device="cuda", dtype=F16)
        metagpt_fast.flash_attn_func(wide, wide, wide, backend="cuda")
