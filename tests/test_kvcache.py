"""``flash_attn_with_kvcache`` (the ``decode_attention`` op) on every backend that runs here, against the reference.

The parity test is written once and runs on every (backend, device) the registry reports (``kernel_params``):
interpreted Triton on CPU tensors, compiled Triton on CUDA ones, the compiled extension's CPU kernel. Each case
covers ragged ``cache_seqlens`` (0 included), GQA, new tokens appended with and without rotary (both layouts),
windows, softcap, ALiBi, paged caches and ``cache_batch_idx``, and checks the output and the log-sum-exp with the
parity rule of ``metagpt_fast.testing`` (the reference one precision up is the oracle), and the cache contents after
the call against the reference run's (the write is the public function's, the same for every backend: bitwise).

Then: the reference against torch's SDPA per sequence, the in-place cache write against a loop written out, paged
and contiguous caches bitwise equal, ``num_splits`` not changing the result, bad input raising an error that names
the argument with the cache left unchanged, and per-backend sections (opcheck, torch.compile).
"""

from __future__ import annotations

import math

import helpers
import pytest
import torch
from helpers import kernel_params, skip_unless_supported

import metagpt_fast
from metagpt_fast import backends
from metagpt_fast.ops.reference import kvcache as kv_reference
from metagpt_fast.testing import FLOAT32_ATOL_ULPS, UNIT_ROUNDOFF, assert_parity, oracle_dtype

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

# ------------------------------------------------------------------------------------------------------- cases

# A case: B, Nq, Hq, Hk, D, N (cache capacity per sequence), new (tokens appended), dtype, and the options: page
# (page size of a paged cache, or None), batch_idx (a permuted cache row per sequence), rotary (None, "neox" or
# "gptj") with rotary_dim, causal, window, softcap, alibi, num_splits. cache_seqlens are ragged, the first one 0.


def _case(b, nq, hq, hk, d, n, new, dtype, page=None, batch_idx=False, rotary=None, rotary_dim=None, causal=False,
          window=(-1, -1), softcap=0.0, alibi=False, num_splits=0):  # fmt: skip
    return dict(b=b, nq=nq, hq=hq, hk=hk, d=d, n=n, new=new, dtype=dtype, page=page, batch_idx=batch_idx,
                rotary=rotary, rotary_dim=rotary_dim or d, causal=causal, window=tuple(window), softcap=softcap,
                alibi=alibi, num_splits=num_splits)  # fmt: skip


def _cases(rows):
    cases = {}
    for c in rows:
        name = (f"{c['b']}x{c['nq']}x{c['hq']}x{c['hk']}x{c['d']}-n{c['n']}-new{c['new']}-{str(c['dtype'])[6:]}"
                f"{'-page' + str(c['page']) if c['page'] else ''}{'-bidx' if c['batch_idx'] else ''}"
                f"{'-' + c['rotary'] + str(c['rotary_dim']) if c['rotary'] else ''}{'-causal' if c['causal'] else ''}"
                f"{'-win{}_{}'.format(*c['window']) if c['window'] != (-1, -1) else ''}"
                f"{'-cap' if c['softcap'] else ''}{'-alibi' if c['alibi'] else ''}-s{c['num_splits']}")  # fmt: skip
        cases[name] = c
    return cases


# Options every backend runs, on its own shapes (the variety is in the options; the shapes stay small where the
# kernel is interpreted).
def _variants(b, nq, hq, hk, d, n, new, dtype):
    return [
        _case(b, nq, hq, hk, d, n, new, dtype),
        _case(b, nq, hq, hk, d, n, new, dtype, causal=True, rotary="neox", num_splits=3),
        _case(b, nq, hq, hk, d, n, new, dtype, page=16, causal=True, rotary="gptj", rotary_dim=d // 2),
        _case(b, nq, hq, hk, d, n, new, dtype, batch_idx=True, window=(5, 0), alibi=True, num_splits=1),
        _case(b, nq, hq, hk, d, n, new, dtype, page=16, window=(9, 2), softcap=3.0, num_splits=2),
    ]


KV_CASES = {
    # Interpreted Triton: tiny shapes, float32 and float16 (bfloat16 dots are wrong under the interpreter).
    ("triton", "cpu"): _cases(
        _variants(3, 1, 4, 2, 16, 48, 1, F32)
        + _variants(2, 3, 6, 3, 24, 40, 2, F16)
        + [_case(2, 2, 2, 2, 32, 33, 0, F32, causal=True), _case(2, 1, 4, 1, 8, 64, 1, F32, page=32)]
    ),
    # Compiled Triton at decode sizes: every dtype, long caches, many splits.
    ("triton", "cuda"): _cases(
        [
            case
            for dtype in (BF16, F16, F32)
            for case in _variants(4, 1, 32, 8, 128, 4096, 1, dtype) + _variants(3, 4, 16, 2, 64, 2000, 4, dtype)
        ]
    ),
    # C++ kernel: odd head dims, long enough for several key blocks and splits; the 16-bit types on the smaller shape.
    ("cpu", "cpu"): _cases(
        _variants(3, 1, 8, 2, 40, 300, 1, F32)
        + [case for dtype in (F32, F16, BF16) for case in _variants(2, 3, 3, 3, 17, 130, 3, dtype)]
    ),
}


def _inputs(case, device, seed=0):
    """Float32 inputs of a case: the public function's keyword arguments (caches contiguous, paged ones built from
    them by the runner)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, nq, hq, hk, d, n, new = (case[k] for k in ("b", "nq", "hq", "hk", "d", "n", "new"))
    rows = b + 2 if case["batch_idx"] else b
    x = dict(
        q=torch.randn(b, nq, hq, d, generator=g),
        k_cache=torch.randn(rows, n, hk, d, generator=g),
        v_cache=torch.randn(rows, n, hk, d, generator=g),
        cache_seqlens=torch.randint(0, n - new + 1, (b,), generator=g, dtype=torch.int32),
    )
    x["cache_seqlens"][0] = 0
    x["cache_seqlens"][-1] = n - new  # one sequence fills the cache
    if new:
        x["k"], x["v"] = torch.randn(b, new, hk, d, generator=g), torch.randn(b, new, hk, d, generator=g)
    if case["batch_idx"]:
        x["cache_batch_idx"] = torch.randperm(rows, generator=g)[:b].to(torch.int32)
    if case["rotary"]:
        angle = torch.rand(n + nq, case["rotary_dim"] // 2, generator=g, dtype=torch.float64) * 2 * math.pi
        x["rotary_cos"], x["rotary_sin"] = torch.cos(angle), torch.sin(angle)
    if case["alibi"]:
        x["alibi_slopes"] = torch.rand(b, hq, generator=g) * 0.3
    return {k: v.to(device) for k, v in x.items()}


def _paged(k_cache, v_cache, page, batch_idx=None, seed=1):
    """The contiguous caches' rows as pages of ``page`` tokens in shuffled order (plus unused pages), and the block
    table; the last row's table entries past its first page point out of range where the sequence does not reach
    (never read)."""
    rows = k_cache[batch_idx.long()] if batch_idx is not None else k_cache
    vrows = v_cache[batch_idx.long()] if batch_idx is not None else v_cache
    b, n, hk, d = rows.shape
    blocks = -(-n // page)
    pad = blocks * page - n
    g = torch.Generator(device="cpu").manual_seed(seed)
    order = torch.randperm(b * blocks + 3, generator=g)[: b * blocks].to(k_cache.device)
    k_pages = torch.randn(b * blocks + 3, page, hk, d, generator=g).to(k_cache)
    v_pages = torch.randn(b * blocks + 3, page, hk, d, generator=g).to(k_cache)
    fill = torch.zeros(b, pad, hk, d, dtype=k_cache.dtype, device=k_cache.device)
    k_pages[order] = torch.cat((rows, fill), 1).reshape(b * blocks, page, hk, d)
    v_pages[order] = torch.cat((vrows, fill), 1).reshape(b * blocks, page, hk, d)
    return k_pages, v_pages, order.view(b, blocks).to(torch.int32)


def _contiguous_view(pages, table, n):
    """A paged cache read back as (B, n, Hk, D)."""
    b = table.shape[0]
    return pages[table.long().clamp(0, pages.shape[0] - 1)].reshape(b, -1, *pages.shape[2:])[:, :n]


def _run(case, x, dtype, backend):
    """Runs the public function on copies of ``x`` in ``dtype``; returns out, lse and the caches after the call
    (paged ones read back in sequence order)."""
    args = {k: v.to(dtype) if v.is_floating_point() and k != "alibi_slopes" else v.clone() for k, v in x.items()}
    table = None
    if case["page"]:
        args["k_cache"], args["v_cache"], table = _paged(
            args["k_cache"], args["v_cache"], case["page"], args.pop("cache_batch_idx", None)
        )
        args["block_table"] = table
    out, lse = metagpt_fast.flash_attn_with_kvcache(
        **args, causal=case["causal"], window_size=case["window"], softcap=case["softcap"],
        rotary_interleaved=case["rotary"] == "gptj", num_splits=case["num_splits"], return_softmax_lse=True,
        backend=backend,
    )  # fmt: skip
    k_after, v_after = args["k_cache"], args["v_cache"]
    if table is not None:
        k_after, v_after = (_contiguous_view(c, table, case["n"]) for c in (k_after, v_after))
    return out, lse, k_after, v_after


def _decode_inputs(case, x, dtype):
    """The registry inputs of the case (for skip_unless_supported)."""
    q = x["q"].to(dtype)
    kc = x["k_cache"].to(dtype)
    return dict(q=q, k_cache=kc, v_cache=kc, seqlens=x["cache_seqlens"], batch_idx=None, block_table=None,
                scale=1.0, window_left=-1, window_right=-1, softcap=case["softcap"], alibi_slopes=None,
                num_splits=case["num_splits"])  # fmt: skip


# ------------------------------------------------------------------------------------------------------ parity


def lse_floor(q, k_cache, scale, rotary):
    """The parity floor of the float32 log-sum-exp: FLOAT32_ATOL_ULPS roundings at the size of the largest score
    term ``scale * sum_e |q_e k_e|`` over every query and cached key, instead of at the size of the lse itself. The
    lse sums scores, and a kernel reorders their dot products; cancellation can leave a score (and the lse of a row
    with one key) far smaller than its terms, where the lse-sized floor would ask for roundings below those of the
    terms. Rotary mixes feature pairs, so rotated queries' terms are bounded with twice |q|."""
    qa = q.detach().abs().double().flatten(0, 2) * (2 if rotary else 1)
    ka = k_cache.detach().abs().double().flatten(0, 2)
    largest = float((qa @ ka.T).max()) if qa.numel() and ka.numel() else 0.0
    return FLOAT32_ATOL_ULPS * UNIT_ROUNDOFF[torch.float32] * scale * largest


@pytest.mark.parametrize("backend, device, case", kernel_params("decode_attention", KV_CASES))
def test_kvcache_matches_reference(backend, device, case):
    dtype = case["dtype"]
    x = _inputs(case, device)
    skip_unless_supported("decode_attention", backend, **_decode_inputs(case, x, dtype))
    # The oracles run on the same inputs rounded to the case's dtype, then upcast.
    x = {k: v.to(dtype) if v.is_floating_point() and k != "alibi_slopes" else v for k, v in x.items()}
    fast = _run(case, x, dtype, backend)
    lowp = _run(case, x, dtype, "reference")
    exact = _run(case, x, oracle_dtype(dtype), "reference")
    exact64 = _run(case, x, torch.float64, "reference")  # the lse is float32 whatever the dtype: its oracle
    out, lse = fast[0], fast[1]
    assert out.dtype == dtype and out.shape == x["q"].shape
    assert lse.dtype == torch.float32 and lse.shape == (case["b"], case["hq"], case["nq"])
    assert_parity(out, lowp[0], exact[0], name="out")
    # Rows with no visible key: -inf in both; the finite ones by the rule.
    empty = torch.isinf(exact64[1])
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all()
    finite = [t.masked_fill(empty, 0) for t in (lse, lowp[1], exact64[1])]
    assert_parity(*finite, name="lse", atol=lse_floor(x["q"], fast[2], x["q"].shape[-1] ** -0.5, case["rotary"]))
    # The cache write is the public function's: the same bytes whichever backend attends.
    assert torch.equal(fast[2], lowp[2]) and torch.equal(fast[3], lowp[3])


# ------------------------------------------------------------------------------------------ semantics, reference


def _sdpa_per_sequence(q, k_cache, v_cache, lengths, causal, window):
    """Each sequence through torch's SDPA with an explicit bottom-right mask (float64)."""
    outs = []
    for b, n in enumerate(lengths):
        nq, hq = q.shape[1], q.shape[2]
        k = k_cache[b, :n].transpose(0, 1).repeat_interleave(hq // k_cache.shape[2], 0)
        v = v_cache[b, :n].transpose(0, 1).repeat_interleave(hq // k_cache.shape[2], 0)
        pos = torch.arange(nq)[:, None] + n - nq
        j = torch.arange(n)
        mask = torch.ones(nq, n, dtype=torch.bool)
        if causal:
            mask &= j <= pos
        if window[0] >= 0:
            mask &= j >= pos - window[0]
        if window[1] >= 0:
            mask &= j <= pos + window[1]
        out = torch.nn.functional.scaled_dot_product_attention(q[b].transpose(0, 1), k, v, attn_mask=mask)
        outs.append(torch.where(mask.any(-1)[None, :, None], out, 0.0).transpose(0, 1))
    return torch.stack(outs)


@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (False, (3, 1)), (True, (4, -1))])
def test_reference_matches_sdpa_per_sequence(causal, window):
    q = torch.randn(3, 3, 4, 8, dtype=torch.float64)
    k_cache, v_cache = torch.randn(3, 20, 2, 8, dtype=torch.float64), torch.randn(3, 20, 2, 8, dtype=torch.float64)
    lengths = [0, 2, 20]
    out = metagpt_fast.flash_attn_with_kvcache(
        q, k_cache, v_cache, cache_seqlens=torch.tensor(lengths, dtype=torch.int32), causal=causal,
        window_size=window, backend="reference",
    )  # fmt: skip
    expected = _sdpa_per_sequence(q, k_cache, v_cache, lengths, causal, window)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_cache_write_and_rotary_match_a_loop():
    b, new, hq, hk, d, n, rd = 3, 2, 4, 2, 8, 10, 6
    q, k, v = torch.randn(b, new, hq, d), torch.randn(b, new, hk, d), torch.randn(b, new, hk, d)
    k_cache, v_cache = torch.randn(b + 1, n, hk, d), torch.randn(b + 1, n, hk, d)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    seqlens = torch.tensor([0, 3, 8], dtype=torch.int32)
    batch_idx = torch.tensor([2, 0, 3], dtype=torch.int32)
    angle = torch.rand(n + 1, rd // 2) * 6
    cos, sin = torch.cos(angle), torch.sin(angle)
    for interleaved in (False, True):
        kc, vc = before_k.clone(), before_v.clone()
        metagpt_fast.flash_attn_with_kvcache(
            q, kc, vc, k, v, cos, sin, cache_seqlens=seqlens, cache_batch_idx=batch_idx,
            rotary_interleaved=interleaved, backend="reference",
        )  # fmt: skip
        expected_k, expected_v = before_k.clone(), before_v.clone()
        for i in range(b):
            row, s = int(batch_idx[i]), int(seqlens[i])
            for t in range(new):
                key = k[i, t].clone()
                for p in range(rd // 2):  # written out: the pair and its angle at position s + t
                    a, e = (2 * p, 2 * p + 1) if interleaved else (p, p + rd // 2)
                    c, si = cos[s + t, p], sin[s + t, p]
                    key[:, a], key[:, e] = (
                        k[i, t, :, a] * c - k[i, t, :, e] * si,
                        k[i, t, :, e] * c + k[i, t, :, a] * si,
                    )
                expected_k[row, s + t], expected_v[row, s + t] = key, v[i, t]
        torch.testing.assert_close(kc, expected_k, atol=1e-6, rtol=0)
        assert torch.equal(vc, expected_v)


def test_queries_rotate_at_cache_seqlens_unless_causal_or_local():
    b, nq, h, d, n = 2, 3, 2, 8, 12
    q, k, v = torch.randn(b, nq, h, d), torch.randn(b, nq, h, d), torch.randn(b, nq, h, d)
    angle = torch.rand(n + nq, d // 2) * 6
    cos, sin = torch.cos(angle), torch.sin(angle)
    seqlens = torch.tensor([1, 5], dtype=torch.int32)
    for causal, window in ((False, (-1, -1)), (True, (-1, -1)), (False, (4, -1))):
        kc, vc = torch.randn(b, n, h, d), torch.randn(b, n, h, d)
        got = metagpt_fast.flash_attn_with_kvcache(
            q, kc.clone(), vc.clone(), k, v, cos, sin, cache_seqlens=seqlens, causal=causal, window_size=window,
            rotary_interleaved=False, backend="reference",
        )  # fmt: skip
        # The same attention with q rotated beforehand and no rotary (k rotated by the call itself).
        local = causal or window != (-1, -1)
        positions = seqlens[:, None].long() + (torch.arange(nq) if local else torch.zeros(nq, dtype=torch.long))
        q_rot = kv_reference.rotate_at(q, cos, sin, positions, False)
        k_rot = kv_reference.rotate_at(k, cos, sin, seqlens[:, None].long() + torch.arange(nq), False)
        want = metagpt_fast.flash_attn_with_kvcache(
            q_rot, kc.clone(), vc.clone(), k_rot, v, cache_seqlens=seqlens, causal=causal, window_size=window,
            backend="reference",
        )  # fmt: skip
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_int_cache_seqlens_default_scale_and_no_cache_seqlens():
    q, kc, vc = torch.randn(2, 1, 2, 8), torch.randn(2, 6, 2, 8), torch.randn(2, 6, 2, 8)
    as_int = metagpt_fast.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=4, backend="reference")
    as_tensor = metagpt_fast.flash_attn_with_kvcache(
        q, kc, vc, cache_seqlens=torch.full((2,), 4, dtype=torch.int32), softmax_scale=8**-0.5, backend="reference"
    )
    assert torch.equal(as_int, as_tensor)
    whole = metagpt_fast.flash_attn_with_kvcache(q, kc, vc, backend="reference")
    assert torch.equal(whole, metagpt_fast.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=6, backend="reference"))


# ------------------------------------------------------------------------------ every backend: paged, splits, empty


def _fast_backends():
    return [impl.backend for impl in backends.implementations("decode_attention")]


@pytest.mark.parametrize("backend", _fast_backends())
def test_paged_and_contiguous_caches_give_identical_outputs(backend):
    case = _case(3, 2, 4, 2, 16, 64, 2, F32, causal=True, rotary="neox", num_splits=2)
    x = _inputs(case, helpers.device_for(backend))
    contiguous = _run(case, x, F32, backend)
    for page in (16, 32):
        paged = _run(dict(case, page=page), x, F32, backend)
        for a, b in zip(contiguous, paged, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", _fast_backends())
def test_num_splits_does_not_change_the_result(backend):
    case = _case(2, 1, 4, 1, 16, 96, 1, F32)
    x = _inputs(case, helpers.device_for(backend))
    outs = [_run(dict(case, num_splits=s), x, F32, backend) for s in (1, 3, 0, 7)]
    for out, lse, *_ in outs[1:]:
        torch.testing.assert_close(out, outs[0][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse, outs[0][1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", _fast_backends())
def test_empty_rows_give_zero_and_minus_inf(backend):
    device = helpers.device_for(backend)
    q, kc, vc = (torch.randn(s, device=device) for s in ((2, 2, 2, 8), (2, 16, 1, 8), (2, 16, 1, 8)))
    seqlens = torch.tensor([0, 1], dtype=torch.int32, device=device)
    out, lse = metagpt_fast.flash_attn_with_kvcache(
        q, kc, vc, cache_seqlens=seqlens, causal=True, return_softmax_lse=True, backend=backend
    )
    # Sequence 0 has no key; in sequence 1 the first query sits at position -1 (bottom-right causal): no key either.
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[1, 0], torch.zeros_like(out[1, 0]))
    assert (lse[0] == -math.inf).all() and (lse[1, :, 0] == -math.inf).all()
    torch.testing.assert_close(out[1, 1], vc[1, 0].expand(2, 8), atol=1e-6, rtol=0)


# -------------------------------------------------------------------------------------------------- bad input


def _good(device="cpu"):
    return dict(
        q=torch.randn(2, 1, 4, 8, device=device),
        k_cache=torch.randn(2, 16, 2, 8, device=device),
        v_cache=torch.randn(2, 16, 2, 8, device=device),
        k=torch.randn(2, 1, 2, 8, device=device),
        v=torch.randn(2, 1, 2, 8, device=device),
        cache_seqlens=torch.tensor([3, 15], dtype=torch.int32, device=device),
    )


def _paged_good():
    x = _good()
    x["k_cache"], x["v_cache"] = torch.randn(6, 8, 2, 8), torch.randn(6, 8, 2, 8)
    x["block_table"] = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32)
    return x


def _set(**changes):
    return lambda x: x.update(changes)


BAD_INPUTS = {
    "cache-too-small": (_set(cache_seqlens=torch.tensor([3, 16], dtype=torch.int32)), ValueError, "too small"),
    "cache-too-small-int": (_set(cache_seqlens=16), ValueError, "cache_seqlens"),
    "negative-seqlen": (_set(cache_seqlens=torch.tensor([-1, 2], dtype=torch.int32)), ValueError, "cache_seqlens"),
    "seqlens-int64": (_set(cache_seqlens=torch.tensor([1, 2])), TypeError, "cache_seqlens"),
    "seqlens-shape": (_set(cache_seqlens=torch.tensor([1], dtype=torch.int32)), ValueError, "cache_seqlens"),
    "no-seqlens-with-k": (_set(cache_seqlens=None), ValueError, "cache_seqlens"),
    "k-without-v": (_set(v=None), ValueError, "k and v"),
    "k-dtype": (lambda x: x.update(k=x["k"].double()), TypeError, "k: torch.float64"),
    "cache-dtype": (lambda x: x.update(v_cache=x["v_cache"].half()), TypeError, "v_cache"),
    "k-heads": (lambda x: x.update(k=torch.randn(2, 1, 3, 8), v=torch.randn(2, 1, 3, 8)), ValueError, "k must"),
    "v-shape": (lambda x: x.update(v=torch.randn(2, 2, 2, 8)), ValueError, "v must"),
    "cache-shapes": (lambda x: x.update(v_cache=torch.randn(2, 15, 2, 8)), ValueError, "v_cache"),
    "heads-divide": (lambda x: x.update(q=torch.randn(2, 1, 3, 8)), ValueError, "heads"),
    "head-dim": (lambda x: x.update(q=torch.randn(2, 1, 4, 6)), ValueError, "head dim"),
    "q-int": (lambda x: x.update(q=x["q"].int()), TypeError, "q must be"),
    "batch-idx-range": (_set(cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)), ValueError, "cache_batch_idx"),
    "batch-idx-dtype": (_set(cache_batch_idx=torch.tensor([0, 1])), TypeError, "cache_batch_idx"),
    "rotary-without-sin": (_set(rotary_cos=torch.ones(20, 4)), ValueError, "rotary_sin"),
    "rotary-dtype": (
        _set(rotary_cos=torch.ones(20, 4).double(), rotary_sin=torch.ones(20, 4).double()),
        TypeError,
        "rotary_cos",
    ),  # fmt: skip
    "rotary-too-short": (_set(rotary_cos=torch.ones(15, 4), rotary_sin=torch.ones(15, 4)), ValueError, "rotary_cos"),
    "rotary-too-wide": (_set(rotary_cos=torch.ones(20, 5), rotary_sin=torch.ones(20, 5)), ValueError, "rotary_dim"),
    "alibi-dtype": (_set(alibi_slopes=torch.ones(4).double()), TypeError, "alibi_slopes"),
    "alibi-shape": (_set(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
    "window": (_set(window_size=(-2, 0)), ValueError, "window_size"),
    "window-type": (_set(window_size=3), TypeError, "window_size"),
    "softcap": (_set(softcap=-1.0), ValueError, "softcap"),
    "num-splits": (_set(num_splits=-1), ValueError, "num_splits"),
    "causal-type": (_set(causal=1), TypeError, "causal"),
    "scale": (_set(softmax_scale=math.nan), ValueError, "softmax_scale"),
    "device": (lambda x: x.update(q=x["q"].to("meta")), ValueError, "q on meta"),
    "requires-grad": (lambda x: x.update(q=x["q"].requires_grad_()), ValueError, "q requires grad"),
    "broadcast-cache": (
        lambda x: x.update(k_cache=torch.randn(1, 16, 2, 8).expand(2, 16, 2, 8)),
        ValueError,
        "k_cache",
    ),  # fmt: skip
}

BAD_PAGED_INPUTS = {
    "table-out-of-range": (
        _set(block_table=torch.tensor([[4, 1], [0, 6]], dtype=torch.int32)),
        ValueError,
        "block_table",
    ),  # fmt: skip
    "table-negative": (
        _set(block_table=torch.tensor([[-1, 1], [0, 5]], dtype=torch.int32)),
        ValueError,
        "block_table",
    ),  # fmt: skip
    "table-dtype": (_set(block_table=torch.tensor([[4, 1], [0, 5]])), TypeError, "block_table"),
    "table-rows": (_set(block_table=torch.tensor([[4, 1]], dtype=torch.int32)), ValueError, "block_table"),
    "paged-too-small": (_set(cache_seqlens=torch.tensor([3, 16], dtype=torch.int32)), ValueError, "too small"),
    "paged-with-batch-idx": (
        _set(cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32)),
        ValueError,
        "cache_batch_idx",
    ),  # fmt: skip
}


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("case", list(BAD_INPUTS) + list(BAD_PAGED_INPUTS))
def test_bad_input_names_the_argument_and_leaves_the_cache_unchanged(case, paged):
    table = BAD_PAGED_INPUTS if case in BAD_PAGED_INPUTS else BAD_INPUTS
    if case in BAD_PAGED_INPUTS and not paged:
        pytest.skip("paged-only case")
    x = _paged_good() if paged else _good()
    if paged and case in ("cache-shapes", "broadcast-cache", "batch-idx-range", "batch-idx-dtype"):
        pytest.skip("contiguous-only case")
    change, error, match = table[case]
    change(x)
    before = [c.clone() for c in (x["k_cache"], x["v_cache"]) if c.device.type != "meta"]
    with pytest.raises(error, match=match):
        metagpt_fast.flash_attn_with_kvcache(**x)
    after = [c for c in (x["k_cache"], x["v_cache"]) if c.device.type != "meta"]
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a.view(torch.uint8), b.contiguous().view(torch.uint8)), "the cache was written"


def test_unused_block_table_entries_are_not_read():
    x = _paged_good()
    x["cache_seqlens"] = torch.tensor([3, 6], dtype=torch.int32)  # with the new token: one page each
    x["block_table"] = torch.tensor([[4, -7], [0, 10**6]], dtype=torch.int32)
    fresh = {**x, "k_cache": x["k_cache"].clone(), "v_cache": x["v_cache"].clone()}
    expected = metagpt_fast.flash_attn_with_kvcache(**fresh, backend="reference")
    for backend in _fast_backends():
        kc, vc = (c.clone().to(helpers.device_for(backend)) for c in (x["k_cache"], x["v_cache"]))
        args = {k: v.to(helpers.device_for(backend)) for k, v in x.items()}
        got = metagpt_fast.flash_attn_with_kvcache(**{**args, "k_cache": kc, "v_cache": vc}, backend=backend)
        torch.testing.assert_close(got.cpu(), expected, atol=1e-6, rtol=0)


def test_inference_mode_accepts_parameters():
    x = _good()
    x["q"].requires_grad_()
    with torch.no_grad():
        metagpt_fast.flash_attn_with_kvcache(**x)


# ------------------------------------------------------------------------------------- compiled extension: cpu

compiled_cpu = pytest.mark.skipif(not helpers.implements("decode_attention", "cpu"), reason="no cpu backend here")


@compiled_cpu
def test_cpu_op_passes_opcheck():
    q, kc, vc = torch.randn(2, 2, 4, 16), torch.randn(5, 8, 2, 16), torch.randn(5, 8, 2, 16)
    seqlens = torch.tensor([3, 13], dtype=torch.int32)
    table = torch.tensor([[1, 4], [0, 2]], dtype=torch.int32)
    torch.library.opcheck(
        torch.ops.metagpt_fast.decode_attention.default,
        (q, kc, vc, seqlens, None, table, 0.25, -1, 0, 0.0, torch.rand(2, 4), 2),
    )


@compiled_cpu
def test_cpu_refuses_strided_cache_rows():
    x = _good()
    x["k_cache"] = torch.randn(2, 16, 2, 16)[..., ::2]
    x["v_cache"] = torch.randn(2, 16, 2, 16)[..., ::2]
    with pytest.raises(ValueError, match="unit last stride"):
        metagpt_fast.flash_attn_with_kvcache(**x, backend="cpu")
    assert backends.select("decode_attention", None, **_registry_inputs(x)).backend == "reference"


def _registry_inputs(x):
    return dict(q=x["q"], k_cache=x["k_cache"], v_cache=x["v_cache"], seqlens=x["cache_seqlens"], batch_idx=None,
                block_table=None, scale=1.0, window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None,
                num_splits=0)  # fmt: skip


@compiled_cpu
def test_cpu_is_auto_choice_on_cpu():
    assert backends.select("decode_attention", None, **_registry_inputs(_good())).backend == "cpu"


@compiled_cpu
@pytest.mark.slow
def test_cpu_decode_step_compiles_fullgraph():
    x = _good()
    cos, sin = torch.randn(20, 4), torch.randn(20, 4)

    def step(q, k, v, k_cache, v_cache, seqlens):
        return metagpt_fast.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos, sin, cache_seqlens=seqlens,
                                                    causal=True, backend="cpu")  # fmt: skip

    caches = [(x["k_cache"].clone(), x["v_cache"].clone()) for _ in range(2)]
    eager = step(x["q"], x["k"], x["v"], *caches[0], x["cache_seqlens"])
    compiled = torch.compile(step, fullgraph=True)(x["q"], x["k"], x["v"], *caches[1], x["cache_seqlens"])
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
