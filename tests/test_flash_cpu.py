"""The C++ CPU kernel of ``flash_attention`` (csrc/cpu/flash_cpu.cpp), on what is its own: its custom ops called
directly against a float64 dense oracle written here (packed sequences of length 0 and 1, bottom-right windows,
softcap, ALiBi, GQA, lse with +inf for empty rows), opcheck, the skipping of key blocks outside the window (poisoned
keys that a visited block would propagate), results independent of the thread count, and the kernel's own argument
checks. The parity of outputs and every gradient against the reference, per dtype, is tests/test_flash_api.py's.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import metagpt_fast
from metagpt_fast import _extension, backends

ops = torch.ops.metagpt_fast


@pytest.fixture(scope="module", autouse=True)
def compiled_flash():
    if _extension.find_cxx() is None:
        pytest.skip("no C++ compiler: the extension cannot exist")
    assert _extension.load() is not None, f"extension failed to load: {_extension.unavailable_reason()}"
    from metagpt_fast.backends.compiled import flash

    assert backends.available_backends()["cpu"] is None
    return flash


def dense(q, k, v, cu_q, cu_k, scale, left, right, softcap, slopes):
    """out (Tq, Hq, Dv) and lse (Hq, Tq) from the definitions, one sequence at a time, in q's dtype."""
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for b in range(cu_q.numel() - 1):
        qb = q[cu_q[b] : cu_q[b + 1]].transpose(0, 1)
        kb = k[cu_k[b] : cu_k[b + 1]].transpose(0, 1).repeat_interleave(group, 0)
        vb = v[cu_k[b] : cu_k[b + 1]].transpose(0, 1).repeat_interleave(group, 0)
        lq, lk = qb.shape[1], kb.shape[1]
        s = scale * qb @ kb.transpose(-1, -2)
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        rel = torch.arange(lq)[:, None] + (lk - lq) - torch.arange(lk)[None]  # i + shift - j
        if slopes is not None:
            s = s - slopes[b].to(s.dtype)[:, None, None] * rel.abs()
        allowed = torch.ones(lq, lk, dtype=torch.bool)
        if right >= 0:
            allowed &= rel >= -right
        if left >= 0:
            allowed &= rel <= left
        s = s.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # empty rows: lse -inf, p 0
        outs.append((p @ vb).transpose(0, 1))
        lses.append(lse.masked_fill(~allowed.any(-1), float("inf")))
    return torch.cat(outs), torch.cat(lses, dim=1)


CASES = {
    "dense": dict(),
    "causal-gqa": dict(right=0, hk=1),  # 6 sequences x 1 kv head
    "window-bottom-right": dict(left=37, right=5, longer_keys=True),
    "left-only": dict(left=0, right=-1, longer_keys=True, hk=2),
    "softcap-window": dict(left=70, right=0, softcap=1.5),
    "alibi-causal": dict(right=0, alibi=True, longer_keys=True),
    "everything": dict(left=50, right=3, softcap=2.0, alibi=True, hk=2, longer_keys=True),
}


def _inputs(case, dtype=torch.float32, d=40, dv=24, hq=4):
    g = torch.Generator().manual_seed(7)
    # Lengths 0 and 1, a length that is not a block multiple, one over several key blocks; keys longer than queries
    # (bottom-right alignment) and shorter (rows with no key when causal).
    lens_q = [5, 0, 1, 130, 3, 301]
    lens_k = [9, 3, 0, 300, 1, 560] if case.get("longer_keys") else [5, 0, 1, 130, 3, 301]
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    hk = case.get("hk", hq)
    q = torch.randn(int(cu_q[-1]), hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(int(cu_k[-1]), hk, d, generator=g, dtype=torch.float64)
    v = torch.randn(int(cu_k[-1]), hk, dv, generator=g, dtype=torch.float64)
    grad = torch.randn(int(cu_q[-1]), hq, dv, generator=g, dtype=torch.float64)
    slopes = torch.rand(len(lens_q), hq, generator=g) * 0.3 if case.get("alibi") else None
    args = dict(
        cu_q=cu_q, cu_k=cu_k, max_q=max(lens_q), max_k=max(lens_k), scale=d**-0.5, left=case.get("left", -1),
        right=case.get("right", -1), softcap=case.get("softcap", 0.0), slopes=slopes,
    )  # fmt: skip
    return [t.to(dtype) for t in (q, k, v, grad)], args


def _fwd(q, k, v, a):
    return ops.flash_attention_fwd(
        q, k, v, a["cu_q"], a["cu_k"], a["max_q"], a["max_k"], a["scale"], a["right"] == 0, a["left"], a["right"],
        a["softcap"], a["slopes"], 0.0, None,
    )  # fmt: skip


@pytest.fixture
def threads(request):
    count = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(count)


# One thread: the backward's fused pass. 16 threads, more than the (sequence, kv head) pairs of the GQA cases: its
# split passes (dK / dV per key block, then dQ per query block).
@pytest.mark.parametrize(
    ("name", "threads"),
    [(name, 1) for name in CASES] + [(name, 16) for name in ("causal-gqa", "everything", "left-only")],
    indirect=["threads"],
)
def test_kernel_matches_dense_float64_oracle(name, threads):
    (q, k, v, grad), a = _inputs(CASES[name])
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = _fwd(q, k, v, a)
    out.backward(grad)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out64, lse64 = dense(q64, k64, v64, a["cu_q"], a["cu_k"], a["scale"], a["left"], a["right"], a["softcap"],
                         a["slopes"])  # fmt: skip
    out64.backward(grad.double())
    empty = torch.isinf(lse64)
    if name == "alibi-causal":
        assert empty.any()  # queries before the first key (Lk < Lq): out 0, lse +inf
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] > 0).all()
    assert (out.detach()[empty.T] == 0).all()
    torch.testing.assert_close(lse[~empty].double(), lse64[~empty], atol=2e-5, rtol=0)
    for label, got, want in (("out", out, out64), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad),
                             ("dv", v.grad, v64.grad)):  # fmt: skip
        torch.testing.assert_close(got.detach().double(), want, atol=2e-5, rtol=1e-5, msg=label)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precisions_compute_in_float32(dtype):
    (q, k, v, grad), a = _inputs(CASES["everything"], dtype=dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, _ = _fwd(q, k, v, a)
    out.backward(grad)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    out32, _ = _fwd(q32, k32, v32, a)
    out32.backward(grad.float())
    assert out.dtype == dtype and q.grad.dtype == dtype
    # Same inputs, float32 inside: only the final rounding to ``dtype`` (one unit roundoff of the value) differs.
    eps = torch.finfo(dtype).eps
    for got, want in ((out, out32), (q.grad, q32.grad), (k.grad, k32.grad), (v.grad, v32.grad)):
        torch.testing.assert_close(got.detach().float(), want.to(dtype).float(), atol=eps, rtol=eps)


@pytest.mark.parametrize("threads", [1, 16], indirect=True)  # the fused backward pass, the split ones
def test_key_blocks_outside_the_window_are_skipped(threads):
    # Keys 0..255 poisoned with NaN: a visited key block propagates NaN even where its weights are 0 (0 * NaN), so
    # the rows that stay finite are exactly those whose key range the kernel never entered. dK / dV: from key 512 on
    # (the split pass tiles keys from 0 by 256, and queries 256..319 saw poisoned keys, so their lse is NaN).
    n, w, hq = 1024, 64, 2
    g = torch.Generator().manual_seed(3)
    q, k, v, grad = (torch.randn(n, hq, 32, generator=g) for _ in range(4))
    k[:256] = float("nan")
    v[:256] = float("nan")
    cu = torch.tensor([0, n], dtype=torch.int32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, _ = ops.flash_attention_fwd(q, k, v, cu, cu, n, n, 0.2, True, w, 0, 0.0, None, 0.0, None)
    out.backward(grad)
    near, far = slice(0, 256), slice(256 + w + 64, n)  # far: query blocks whose windows start past key 255
    assert torch.isnan(out[near]).all() and torch.isfinite(out[far]).all()
    assert torch.isnan(q.grad[near]).all() and torch.isfinite(q.grad[far]).all()
    assert torch.isfinite(k.grad[512:]).all() and torch.isfinite(v.grad[512:]).all()


def test_results_do_not_depend_on_the_thread_count():
    (q, k, v, grad), a = _inputs(CASES["everything"])
    runs = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 3, 1):
            torch.set_num_threads(count)
            out, lse = _fwd(q, k, v, a)
            runs.append((out, lse, *ops.flash_attention_bwd(
                grad, q, k, v, out, lse, a["cu_q"], a["cu_k"], a["max_q"], a["max_k"], a["scale"], False, a["left"],
                a["right"], a["softcap"], a["slopes"], 0.0, None,
            )))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(runs[0], run, strict=True))


def _opcheck_samples():
    (q, k, v, grad), a = _inputs(CASES["everything"], d=16, dv=8, hq=2)
    args = (a["cu_q"], a["cu_k"], a["max_q"], a["max_k"], a["scale"], False, a["left"], a["right"], a["softcap"],
            a["slopes"], 0.0, None)  # fmt: skip
    out, lse = ops.flash_attention_fwd(q, k, v, *args)
    return [
        ("flash_attention_fwd", (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), *args)),
        ("flash_attention_bwd", (grad, q.detach(), k.detach(), v.detach(), out, lse, *args)),
    ]


@pytest.mark.parametrize("index", range(2))
def test_opcheck(index):
    name, args = _opcheck_samples()[index]
    torch.library.opcheck(getattr(ops, name).default, args)


def test_kernel_checks_its_arguments():
    q = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="dropout"):
        ops.flash_attention_fwd(q, q, q, cu, cu, 6, 6, 1.0, False, -1, -1, 0.0, None, 0.1, None)
    with pytest.raises(RuntimeError, match="cu_seqlens_k must run from 0 to 6"):
        ops.flash_attention_fwd(q, q, q, cu, cu - 1, 6, 6, 1.0, False, -1, -1, 0.0, None, 0.0, None)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        bad = torch.tensor([0, 4, 2, 6], dtype=torch.int32)
        ops.flash_attention_fwd(q, q, q, bad, bad, 6, 6, 1.0, False, -1, -1, 0.0, None, 0.0, None)
    with pytest.raises(RuntimeError, match="alibi_slopes"):
        ops.flash_attention_fwd(q, q, q, cu, cu, 6, 6, 1.0, False, -1, -1, 0.0, torch.ones(2), 0.0, None)


def test_public_api_routes_windows_to_the_cpu_kernel():
    q, k, v = (torch.randn(2, 40, 4, 16) for _ in range(3))
    inputs = dict(
        q=q.reshape(80, 4, 16), k=k.reshape(80, 4, 16), v=v.reshape(80, 4, 16),
        cu_seqlens_q=torch.tensor([0, 40, 80], dtype=torch.int32), cu_seqlens_k=torch.tensor([0, 40, 80],
        dtype=torch.int32), max_seqlen_q=40, max_seqlen_k=40, softmax_scale=0.25, causal=True, window_left=8,
        window_right=0, softcap=1.0, alibi_slopes=None, dropout_p=0.0,
    )  # fmt: skip
    assert backends.select("flash_attention", "auto", **inputs).backend == "cpu"
    out = metagpt_fast.flash_attn_func(q, k, v, causal=True, window_size=(8, 0), softcap=1.0, backend="cpu")
    ref = metagpt_fast.flash_attn_func(q, k, v, causal=True, window_size=(8, 0), softcap=1.0, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dropout"):
        metagpt_fast.flash_attn_func(q, k, v, dropout_p=0.1, backend="cpu")


@pytest.mark.slow  # a fresh interpreter: about 15 s on 2 loaded cores
def test_portable_path_matches_the_oracle(tmp_path):
    # The BLAS path (forced with METAGPT_FAST_CPU_TILES=0; the tests above run the AVX-512 tiles where the CPU has
    # them), float32 against the oracle and bfloat16 (keys converted once per head, no tiles) against float32.
    script = textwrap.dedent(
        """
        import sys, torch
        sys.path.insert(0, sys.argv[2])
        import test_flash_cpu as t
        from metagpt_fast import _extension
        _extension.load()
        import metagpt_fast.backends.compiled.flash
        results = []
        for name, threads, dtype in [("everything", 1, torch.float32), ("left-only", 16, torch.float32),
                                     ("everything", 1, torch.bfloat16)]:
            torch.set_num_threads(threads)
            (q, k, v, grad), a = t._inputs(t.CASES[name], dtype=dtype)
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            out, lse = t._fwd(q, k, v, a)
            out.backward(grad)
            results.append([out.detach(), q.grad, k.grad, v.grad])
        torch.save(results, sys.argv[1])
        """
    )
    path = str(tmp_path / "portable.pt")
    env = {**os.environ, "METAGPT_FAST_CPU_TILES": "0"}
    subprocess.run([sys.executable, "-c", script, path, os.path.dirname(__file__)], env=env, check=True, timeout=300)
    portable = torch.load(path)
    for (name, dtype), got in zip([("everything", torch.float32), ("left-only", torch.float32),
                                   ("everything", torch.bfloat16)], portable, strict=True):  # fmt: skip
        (q, k, v, grad), a = _inputs(CASES[name], dtype=torch.float32)
        if dtype == torch.float32:
            q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
            out64, _ = dense(q64, k64, v64, a["cu_q"], a["cu_k"], a["scale"], a["left"], a["right"], a["softcap"],
                             a["slopes"])  # fmt: skip
            out64.backward(grad.double())
            for x, want in zip(got, (out64, q64.grad, k64.grad, v64.grad), strict=True):
                torch.testing.assert_close(x.double(), want.detach(), atol=2e-5, rtol=1e-5)
        else:
            (q, k, v, grad), a = _inputs(CASES[name], dtype=dtype)
            q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
            out32, _ = _fwd(q32, k32, v32, a)
            out32.backward(grad.float())
            eps = torch.finfo(dtype).eps
            for x, want in zip(got, (out32, q32.grad, k32.grad, v32.grad), strict=True):
                torch.testing.assert_close(x.float(), want.detach().to(dtype).float(), atol=eps, rtol=eps)
