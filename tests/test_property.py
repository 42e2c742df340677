"""Property tests: every public op on every available fast backend matches the reference on random inputs.

For each op and backend, hypothesis draws shapes (0 and 1 lengths where torch accepts them), strides (transposed,
sliced, broadcast), masks (random boolean with all-false rows, key padding, additive with -inf and finfo.min),
dtypes (float32 and float16; bfloat16 on CUDA only: the Triton interpreter's bf16 dot is wrong), dropout 0 or p (a
fast kernel's Philox mask is replayed in the reference with ``dropout_keep_mask``) and GQA ratios. Outputs and every
gradient must satisfy the parity rule (``metagpt_fast.testing.assert_parity``, with the documented slacks of a
flash-style backward and of float32 angles) and inputs must be left untouched. The reference backend is not run
against itself: that comparison cannot fail. An input a backend declares unsupported must raise a ValueError listing
the reasons when that backend is requested explicitly and be served by ``auto``; nothing may raise anything else.

Profiles (``HYPOTHESIS_PROFILE``): tests/hypothesis_profiles.py.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TRITON_INTERPRETED, backend_params, device_for, implements
from hypothesis import given, note, reject, settings
from hypothesis import strategies as st
from hypothesis_profiles import limits

import metagpt_fast
from metagpt_fast.ops import reference
from metagpt_fast.ops.reference.random import new_seed
from metagpt_fast.testing import (
    FLOAT32_ATOL_ULPS,
    UNIT_ROUNDOFF,
    assert_parity,
    attention_backward_slack,
    float32_angle_error,
    oracle_dtype,
)

AVAILABLE = [name for name, reason in metagpt_fast.available_backends().items() if reason is None]
LAYOUTS = ("contiguous", "transposed", "sliced", "broadcast")


def dtypes_for(backend: str) -> list[torch.dtype]:
    dtypes = [torch.float32, torch.float16]
    if backend == "reference" or device_for(backend) == "cuda":
        dtypes.append(torch.bfloat16)
    return dtypes


def fast_backend_params(op: str) -> list:
    """``backend_params(op)`` without the reference backend: the reference against itself cannot fail.

    Interpreted Triton is marked ``slow``: its 300-example sweeps are most of the property suite's time (about 110 s
    of 165 s on 2 cores), so they run in the full suite but not in the quick tier, where the per-op Triton parity tests
    still cover the kernels."""
    params = []
    for param in backend_params(op):
        if param.values[0] == "reference":
            continue
        if param.values[0] == "triton" and TRITON_INTERPRETED:
            param = pytest.param(*param.values, marks=[*param.marks, pytest.mark.slow])
        params.append(param)
    return params or [pytest.param("none", marks=pytest.mark.skip(reason="no fast backend here"))]


# ---------------------------------------------------------------------------------------------------------- inputs


def make(shape, layout: str, gen: torch.Generator, dtype: torch.dtype, device: str, low=None, high=None):
    """A tensor of ``shape`` whose memory layout is ``layout``: contiguous, transposed (dims 0/1 for 3-D and 2-D
    tensors, 1/2 for 4-D ones: the (B, N, H, D) storage of a fused projection), sliced (every other row of a wider
    buffer) or broadcast (stride 0 on dim 0)."""
    shape = tuple(shape)

    def values(s):
        if low is not None:
            return torch.randint(low, high, s, generator=gen)
        return torch.randn(s, generator=gen).to(dtype)

    if layout == "transposed" and len(shape) >= 2:
        i, j = (1, 2) if len(shape) == 4 else (0, 1)
        alloc = list(shape)
        alloc[i], alloc[j] = alloc[j], alloc[i]
        t = values(tuple(alloc)).transpose(i, j)
    elif layout == "sliced" and len(shape) >= 2:
        wide = values(shape[:-2] + (2 * shape[-2], shape[-1] + 3))
        t = wide[..., ::2, : shape[-1]]
    elif layout == "broadcast" and len(shape) >= 2:
        t = values((1,) + shape[1:]).expand(shape)
    else:
        t = values(shape)
    assert t.shape == shape
    return t.to(device)


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A leaf that requires grad and keeps ``t``'s strides."""
    return t.detach().requires_grad_()


def upcast(t: torch.Tensor | None, dtype: torch.dtype):
    if t is None or not t.dtype.is_floating_point:
        return t
    return t.detach().to(dtype).requires_grad_(t.requires_grad)


def grads(outputs, inputs, grad_outputs):
    """Gradients of ``outputs`` (a tensor or a tuple) w.r.t. ``inputs``; unused inputs get zeros."""
    gs = torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs, strict=True)]


def seeded_call(fn, seed: int, device: str):
    """Runs ``fn`` with torch's generators at ``seed``; returns its result and the dropout seed the op drew."""
    torch.manual_seed(seed)
    dropout_seed = int(new_seed(device).item())
    torch.manual_seed(seed)
    return fn(), dropout_seed


def serve(fn, backend: str, **kwargs):
    """``fn(**kwargs, backend=backend)``, or None when the backend declares these inputs unsupported (then the
    explicit request must have raised a ValueError listing the reasons, and ``auto`` must serve them)."""
    try:
        return fn(**kwargs, backend=backend)
    except ValueError as exc:
        if f"backend {backend!r} cannot run" not in str(exc):
            raise
        note(f"unsupported: {exc}")
        fn(**kwargs)  # auto falls back
        return None


def run_property(op: str, backend: str, strategy, check, max_examples: int | None = None) -> None:
    """Runs ``check(backend, case)`` on examples of ``strategy``; asserts that most were served, reports counts.
    ``max_examples`` overrides the profile's count (ops whose examples are expensive)."""
    stats = collections.Counter()

    @given(case=strategy)
    def run(case):
        note(repr(case))
        served = check(backend, case)
        stats["served" if served else "unsupported"] += 1
        if not served:
            reject()

    if max_examples is not None:
        run = settings(max_examples=max_examples)(run)
    run()
    print(f"\n{op}/{backend}: {stats['served']} inputs served and matched, {stats['unsupported']} unsupported")
    total = stats["served"] + stats["unsupported"]
    assert stats["served"] >= max(1, total // 2), f"{backend} refused most {op} inputs: {dict(stats)}"


def lengths(lo: int, hi: int):
    """Sizes in [lo, hi] with the odd and edge values the kernels' tiling cares about."""
    special = [v for v in (1, 16, 17) if lo <= v <= hi]
    return st.one_of(st.integers(lo, hi), st.sampled_from(special)) if special else st.integers(lo, hi)


ZERO_NAMES = ("batch", "heads", "rows", "keys", "features")
ZERO = st.sampled_from([None] * 12 + list(ZERO_NAMES))  # which dim is 0 (rarely any)
DROPOUT = st.sampled_from([0.0, 0.0, 0.0, 0.1, 0.5, 0.9])


def dropout_for(backend: str):
    # The reference draws dropout from torch's generator: there is no kernel mask to replay, nothing to compare.
    return st.just(0.0) if backend == "reference" else DROPOUT


# ------------------------------------------------------------------------------------------------------- attention


@dataclasses.dataclass
class AttentionCase:
    dtype: torch.dtype
    b: int
    hk: int
    group: int
    enable_gqa: bool
    nq: int
    nk: int
    d: int
    dv: int
    layouts: tuple[str, str, str]
    rank3: bool
    mask: str
    mask_shape: tuple[int, ...]
    mask_layout: str
    density: float
    dead_rows: int
    scale: float | None
    dropout_p: float
    seed: int


@st.composite
def attention_cases(draw, backend: str):
    lim = limits()
    b, hk, nq, nk = (draw(lengths(1, n)) for n in (lim.batch, lim.heads, lim.seq, lim.seq))
    d = draw(lengths(1, lim.head_dim))
    dv = d if draw(st.booleans()) or draw(st.booleans()) else draw(lengths(1, lim.head_dim))
    group = draw(st.sampled_from([1, 1, 2, 3]))
    enable_gqa = group > 1 or draw(st.booleans())
    zero = draw(ZERO)
    b, hk, nq, nk, dv = (0 if zero == z else v for z, v in zip(ZERO_NAMES, (b, hk, nq, nk, dv), strict=True))
    if hk == 0:
        enable_gqa, group = False, 1  # 0 key heads "dividing" 0 query heads is refused like torch refuses it
    mask = draw(st.sampled_from(["none", "none", "causal", "bool", "key_padding", "additive"]))
    # The mask's shape: each of (B, H, Nq, Nk) full or broadcast (1), with 0-2 leading dims left out.
    full = (b, hk * group, nq, nk)
    mask_shape = tuple(n if draw(st.booleans()) else 1 for n in full)
    mask_shape = mask_shape[draw(st.integers(0, 2)) :]
    rank3 = hk * group == 1 and mask in ("none", "causal") and draw(st.integers(0, 3)) == 0
    return AttentionCase(
        dtype=draw(st.sampled_from(dtypes_for(backend))),
        b=b,
        hk=hk,
        group=group,
        enable_gqa=enable_gqa,
        nq=nq,
        nk=nk,
        d=d,
        dv=dv,
        layouts=tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(3)),
        rank3=rank3,
        mask=mask,
        mask_shape=mask_shape,
        mask_layout=draw(st.sampled_from(["contiguous", "expanded", "transposed"])),
        density=draw(st.sampled_from([0.2, 0.5, 0.9])),
        dead_rows=draw(st.integers(0, 2)),
        scale=draw(st.one_of(st.none(), st.sampled_from([0.1, 0.5, 2.0, -1.0]), st.floats(-3, 3))),
        dropout_p=draw(dropout_for(backend)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def attention_mask(case: AttentionCase, gen: torch.Generator, device: str):
    """The case's mask (or None), with ``dead_rows`` query rows fully masked."""
    if case.mask in ("none", "causal"):
        return None
    b, hq = case.b, case.hk * case.group
    if case.mask == "key_padding":  # (B, 1, 1, Nk): the first len_b keys of batch b are real
        lens = torch.randint(0, case.nk + 1, (b,), generator=gen)
        if case.dead_rows == 0:
            lens = lens.clamp(min=min(1, case.nk))
        return (torch.arange(case.nk)[None, :] < lens[:, None]).view(b, 1, 1, case.nk).to(device)
    shape = case.mask_shape
    alloc = shape[:-2] + shape[-2:][::-1] if case.mask_layout == "transposed" and len(shape) >= 2 else shape
    if case.mask == "bool":
        m = torch.rand(alloc, generator=gen) < case.density
    else:  # additive: finite values, some -inf, and torch.finfo.min "soft" masking
        m = torch.randn(alloc, generator=gen).to(case.dtype) * 3
        m = m.masked_fill(torch.rand(alloc, generator=gen) > case.density, float("-inf"))
        m = m.masked_fill(torch.rand(alloc, generator=gen) < 0.1, torch.finfo(case.dtype).min)
    if case.mask_layout == "transposed" and len(shape) >= 2:
        m = m.transpose(-2, -1)
    if len(shape) >= 2 and shape[-2] > 0:  # whole rows masked
        rows = torch.randperm(shape[-2], generator=gen)[: case.dead_rows]
        m[..., rows, :] = False if m.dtype == torch.bool else float("-inf")
    if case.mask_layout == "expanded":
        m = m.expand((b, hq, case.nq, case.nk)[4 - len(shape) :])
    return m.to(device)


def attention_oracle(q, k, v, mask, case, scale, keep, dtype, grad_out):
    q, k, v = (upcast(t, dtype) for t in (q, k, v))
    mask = upcast(mask, dtype)
    if case.nk == 0:  # no keys: torch's math path gives 0 (the reference's softmax needs at least one key)
        out = F.scaled_dot_product_attention(
            q, k, v, mask, is_causal=case.mask == "causal", scale=scale, enable_gqa=case.enable_gqa
        )
    else:
        out = reference.attention(
            q, k, v, mask, case.dropout_p, case.mask == "causal", scale, case.enable_gqa, dropout_mask=keep
        )
    return out, grads(out, (q, k, v), grad_out.to(dtype))


def check_attention(backend: str, case: AttentionCase) -> bool:
    device = device_for(backend)
    gen = torch.Generator().manual_seed(case.seed)
    b, hq, hk = case.b, case.hk * case.group, case.hk
    shapes = ((b, hq, case.nq, case.d), (b, hk, case.nk, case.d), (b, hk, case.nk, case.dv))
    q, k, v = (make(s, lay, gen, case.dtype, device) for s, lay in zip(shapes, case.layouts, strict=True))
    mask = attention_mask(case, gen, device)
    if case.rank3:
        q, k, v = (t.squeeze(1) for t in (q, k, v))
    q, k, v = leaf(q), leaf(k), leaf(v)
    saved = [t.detach().clone() for t in (q, k, v, mask) if t is not None]
    kwargs = dict(
        query=q,
        key=k,
        value=v,
        attn_mask=mask,
        dropout_p=case.dropout_p,
        is_causal=case.mask == "causal",
        scale=case.scale,
        enable_gqa=case.enable_gqa,
    )
    out, dropout_seed = seeded_call(
        lambda: serve(metagpt_fast.scaled_dot_product_attention, backend, **kwargs), case.seed, device
    )
    if out is None:
        return False
    for before, after in zip(saved, [t for t in (q, k, v, mask) if t is not None], strict=True):
        assert torch.equal(before, after), "attention modified its inputs"
    assert out.dtype == case.dtype and out.device == q.device
    keep = None
    if case.dropout_p > 0:
        keep = reference.dropout_keep_mask(dropout_seed, (b, hq, case.nq, case.nk), case.dropout_p, device)
        keep = keep.squeeze(1) if case.rank3 else keep
    grad_out = torch.randn(out.shape, generator=gen).to(case.dtype).to(device)
    fast_grads = grads(out, (q, k, v), grad_out)
    lo = attention_oracle(q, k, v, mask, case, case.scale, keep, case.dtype, grad_out)
    hi = attention_oracle(q, k, v, mask, case, case.scale, keep, oracle_dtype(case.dtype), grad_out)
    assert_parity(out, lo[0], hi[0], name="attention output")
    slack = attention_backward_slack(
        q, k, v, hi[0], grad_out, scale=case.scale, attn_mask=mask, is_causal=case.mask == "causal",
        dropout_mask=keep, dropout_p=case.dropout_p,
    )  # fmt: skip
    for name, g, g_lo, g_hi, extra in zip(("dq", "dk", "dv"), fast_grads, lo[1], hi[1], slack, strict=True):
        assert_parity(g, g_lo, g_hi, name=f"attention {name}", extra=extra)
    return True


@pytest.mark.parametrize("backend", fast_backend_params("attention"))
def test_attention_matches_reference(backend):
    run_property("attention", backend, attention_cases(backend), check_attention)


# ------------------------------------------------------------------------------------------------- flash attention


@dataclasses.dataclass
class FlashCase:
    dtype: torch.dtype
    lens: tuple[tuple[int, int], ...]  # (query, key) length of each packed sequence
    hk: int
    group: int
    d: int
    dv: int
    layouts: tuple[str, str, str]
    causal: bool
    window: tuple[int, int]
    softcap: float
    alibi: str | None  # None, "h" (one slope per head) or "bh" (per sequence and head)
    scale: float | None
    seed: int


WINDOW_SIDE = st.one_of(st.sampled_from([-1, -1, 0, 1, 3]), st.integers(-1, 24))


@st.composite
def flash_cases(draw, backend: str):
    lim = limits()
    seqs = draw(st.integers(1, 3))
    d = draw(lengths(1, lim.head_dim))
    return FlashCase(
        dtype=draw(st.sampled_from(dtypes_for(backend))),
        lens=tuple((draw(lengths(0, lim.seq)), draw(lengths(0, lim.seq))) for _ in range(seqs)),
        hk=draw(st.integers(1, lim.heads)),
        group=draw(st.sampled_from([1, 1, 2, 3])),
        d=d,
        dv=d if draw(st.booleans()) or draw(st.booleans()) else draw(lengths(1, lim.head_dim)),
        layouts=tuple(draw(st.sampled_from(("contiguous", "transposed", "sliced"))) for _ in range(3)),
        causal=draw(st.booleans()),
        window=(draw(WINDOW_SIDE), draw(WINDOW_SIDE)),
        softcap=draw(st.sampled_from([0.0, 0.0, 0.5, 5.0])),
        alibi=draw(st.sampled_from([None, None, "h", "bh"])),
        scale=draw(st.one_of(st.none(), st.sampled_from([0.1, 2.0, -1.0]))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def check_flash(backend: str, case: FlashCase) -> bool:
    from metagpt_fast.ops.reference import flash as reference_flash

    device = device_for(backend)
    gen = torch.Generator().manual_seed(case.seed)
    hq, hk = case.hk * case.group, case.hk
    tq, tk = sum(n for n, _ in case.lens), sum(n for _, n in case.lens)
    shapes = ((tq, hq, case.d), (tk, hk, case.d), (tk, hk, case.dv))
    q, k, v = (leaf(make(s, lay, gen, case.dtype, device)) for s, lay in zip(shapes, case.layouts, strict=True))
    cu_q, cu_k = (
        torch.tensor([0, *[sum(p[i] for p in case.lens[: j + 1]) for j in range(len(case.lens))]], dtype=torch.int32,
                     device=device)
        for i in (0, 1)
    )  # fmt: skip
    alibi = None
    if case.alibi is not None:
        alibi = torch.rand(hq if case.alibi == "h" else (len(case.lens), hq), generator=gen).to(device)
    saved = [t.detach().clone() for t in (q, k, v, cu_q, cu_k)]
    max_q, max_k = max(n for n, _ in case.lens), max(n for _, n in case.lens)
    args = dict(softmax_scale=case.scale, causal=case.causal, window_size=case.window, softcap=case.softcap,
                alibi_slopes=alibi)  # fmt: skip
    out = serve(metagpt_fast.flash_attn_varlen_func, backend, q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                max_seqlen_q=max_q, max_seqlen_k=max_k, **args)  # fmt: skip
    if out is None:
        return False
    for before, after in zip(saved, (q, k, v, cu_q, cu_k), strict=True):
        assert torch.equal(before, after), "flash attention modified its inputs"
    assert out.dtype == case.dtype and out.shape == (tq, hq, case.dv)
    grad_out = torch.randn(out.shape, generator=gen).to(case.dtype).to(device)
    fast_grads = grads(out, (q, k, v), grad_out)
    left, right = case.window[0], 0 if case.causal else case.window[1]
    scale = case.d**-0.5 if case.scale is None else case.scale

    def oracle(dtype):
        inputs = [upcast(t, dtype) for t in (q, k, v)]
        o, _ = reference_flash.flash_attention(*inputs, cu_q, cu_k, scale, left, right, case.softcap, alibi)
        return o, grads(o, inputs, grad_out.to(dtype))

    lo, hi = oracle(case.dtype), oracle(oracle_dtype(case.dtype))
    assert_parity(out, lo[0], hi[0], name="flash attention output")
    mask = torch.zeros(tq, tk, dtype=torch.bool, device=device)  # the packed batch as one block-diagonal problem
    for (q0, q1, k0, k1) in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist(),
                                strict=True):  # fmt: skip
        mask[q0:q1, k0:k1] = reference_flash.allowed_mask(q1 - q0, k1 - k0, left, right, device)
    slack = attention_backward_slack(
        *(t.transpose(0, 1)[None] for t in (q, k, v)), hi[0].transpose(0, 1)[None],
        grad_out.to(hi[0].dtype).transpose(0, 1)[None], scale=scale, attn_mask=mask,
    )  # fmt: skip
    for name, g, g_lo, g_hi, extra in zip(("dq", "dk", "dv"), fast_grads, lo[1], hi[1], slack, strict=True):
        assert_parity(g, g_lo, g_hi, name=f"flash attention {name}", extra=extra)
    return True


@pytest.mark.parametrize("backend", fast_backend_params("flash_attention"))
def test_flash_attention_matches_reference(backend):
    # A fifth of the profile's examples: each runs the reference twice over up to 3 sequences and the backward slack
    # on the packed batch (the ci profile's 300 took 150 s for the cpu kernel on 2 busy cores).
    run_property("flash_attention", backend, flash_cases(backend), check_flash, settings.default.max_examples // 5)


# ------------------------------------------------------------------------------------------------ positional ops


@dataclasses.dataclass
class PositionalCase:
    dtype: torch.dtype
    b: int
    t: int
    d: int
    layout: str
    offset: int
    dropout_p: float
    seed: int
    # embed_positions only
    vocab: int = 1
    token_layout: str = "contiguous"
    token_dtype: torch.dtype = torch.int64
    scale: float = 1.0
    sinusoidal: bool = True


@st.composite
def positional_cases(draw, backend: str, embedding: bool):
    lim = limits()
    b, t, d = draw(lengths(1, lim.batch + 1)), draw(lengths(1, lim.seq)), draw(lengths(1, lim.head_dim))
    zero = draw(ZERO)
    b, t, d = (0 if zero == z else v for z, v in zip(("batch", "rows", "features"), (b, t, d), strict=True))
    case = PositionalCase(
        dtype=draw(st.sampled_from(dtypes_for(backend))),
        b=b,
        t=t,
        d=d,
        layout=draw(st.sampled_from(LAYOUTS)),
        offset=draw(st.one_of(st.sampled_from([0, 0, 1, 7]), st.integers(0, lim.position - t))),
        dropout_p=draw(dropout_for(backend)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    if embedding:
        # Small vocabularies make many tokens share a row: the weight gradient is a scatter-add with collisions.
        case.vocab = draw(st.one_of(st.integers(1, 4), st.integers(1, lim.vocab)))
        case.token_layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
        case.token_dtype = draw(st.sampled_from([torch.int64, torch.int32]))
        case.scale = draw(st.one_of(st.sampled_from([1.0, math.sqrt(max(d, 1))]), st.floats(-4, 4)))
        case.sinusoidal = draw(st.booleans())
        if case.layout == "broadcast":
            case.layout = "contiguous"  # a (vocab, d) table is not broadcast
    return case


def positional_slack(case: PositionalCase) -> float:
    """The float32-angle slack of the sinusoid at positions up to offset + t - 1, times the dropout scale."""
    return float32_angle_error(case.offset + case.t - 1) / (1.0 - case.dropout_p)


def check_add_positional_encoding(backend: str, case: PositionalCase) -> bool:
    device = device_for(backend)
    gen = torch.Generator().manual_seed(case.seed)
    x = leaf(make((case.b, case.t, case.d), case.layout, gen, case.dtype, device))
    saved = x.detach().clone()
    kwargs = dict(x=x, offset=case.offset, dropout_p=case.dropout_p)
    out, dropout_seed = seeded_call(
        lambda: serve(metagpt_fast.add_positional_encoding, backend, **kwargs), case.seed, device
    )
    if out is None:
        return False
    assert torch.equal(x, saved), "add_positional_encoding modified its input"
    assert out.dtype == case.dtype
    keep = None
    if case.dropout_p > 0:
        keep = reference.dropout_keep_mask(dropout_seed, (case.b, case.t, case.d), case.dropout_p, device)
    grad_out = torch.randn(out.shape, generator=gen).to(case.dtype).to(device)
    (dx,) = grads(out, (x,), grad_out)
    results = []
    for dtype in (case.dtype, oracle_dtype(case.dtype)):
        xr = upcast(x, dtype)
        ref = reference.add_positional_encoding(xr, case.offset, case.dropout_p, dropout_mask=keep)
        results.append((ref, grads(ref, (xr,), grad_out.to(dtype))[0]))
    (lo, dlo), (hi, dhi) = results
    assert_parity(out, lo, hi, name="add_positional_encoding output", extra=positional_slack(case))
    assert_parity(dx, dlo, dhi, name="add_positional_encoding dx")
    return True


def check_embed_positions(backend: str, case: PositionalCase) -> bool:
    device = device_for(backend)
    gen = torch.Generator().manual_seed(case.seed)
    weight = leaf(make((case.vocab, case.d), case.layout, gen, case.dtype, device))
    shape = (case.b, case.t)
    tokens = make(shape, case.token_layout, gen, case.token_dtype, device, low=0, high=case.vocab).to(case.token_dtype)
    saved = weight.detach().clone(), tokens.clone()
    kwargs = dict(
        tokens=tokens,
        weight=weight,
        scale=case.scale,
        offset=case.offset,
        dropout_p=case.dropout_p,
        sinusoidal=case.sinusoidal,
    )
    out, dropout_seed = seeded_call(lambda: serve(metagpt_fast.embed_positions, backend, **kwargs), case.seed, device)
    if out is None:
        return False
    assert torch.equal(weight, saved[0]) and torch.equal(tokens, saved[1]), "embed_positions modified its inputs"
    assert out.dtype == case.dtype and out.shape == (case.b, case.t, case.d)
    keep = None
    if case.dropout_p > 0:
        keep = reference.dropout_keep_mask(dropout_seed, (case.b, case.t, case.d), case.dropout_p, device)
    grad_out = torch.randn(out.shape, generator=gen).to(case.dtype).to(device)
    (dw,) = grads(out, (weight,), grad_out)
    results = []
    for dtype in (case.dtype, oracle_dtype(case.dtype)):
        w = upcast(weight, dtype)
        ref = reference.embed_positions(
            tokens, w, case.scale, case.offset, case.dropout_p, case.sinusoidal, dropout_mask=keep
        )
        results.append((ref, grads(ref, (w,), grad_out.to(dtype))[0]))
    (lo, dlo), (hi, dhi) = results
    slack = positional_slack(case) if case.sinusoidal else 0.0
    assert_parity(out, lo, hi, name="embed_positions output", extra=slack)
    assert_parity(dw, dlo, dhi, name="embed_positions dweight")
    return True


@pytest.mark.parametrize("backend", fast_backend_params("add_positional_encoding"))
def test_add_positional_encoding_matches_reference(backend):
    strategy = positional_cases(backend, embedding=False)
    run_property("add_positional_encoding", backend, strategy, check_add_positional_encoding)


@pytest.mark.parametrize("backend", fast_backend_params("embed_positions"))
def test_embed_positions_matches_reference(backend):
    run_property("embed_positions", backend, positional_cases(backend, embedding=True), check_embed_positions)


# ---------------------------------------------------------------------------------------------------------- rotary


@dataclasses.dataclass
class RotaryCase:
    dtype: torch.dtype
    b: int
    hq: int
    hk: int
    t: int
    d: int
    rotary_dim: int | None
    layouts: tuple[str, str]
    positions: str
    position_dtype: torch.dtype
    offset: int
    base: float
    interleaved: bool
    inplace: bool
    seed: int


@st.composite
def rotary_cases(draw, backend: str):
    lim = limits()
    b, hq, hk, t = (draw(lengths(1, n)) for n in (lim.batch, lim.heads + 1, lim.heads, lim.seq))
    d = draw(lengths(2, lim.head_dim))
    zero = draw(ZERO)
    b, hq, t = (0 if zero == z else v for z, v in zip(("batch", "heads", "rows"), (b, hq, t), strict=True))
    hk = 0 if zero == "keys" else hk
    rotary_dim = draw(st.one_of(st.none(), st.integers(1, d // 2).map(lambda r: 2 * r)))
    if rotary_dim is None and d % 2:
        rotary_dim = d - 1
    inplace = draw(st.booleans())
    layouts = tuple(draw(st.sampled_from(LAYOUTS[:3] if inplace else LAYOUTS)) for _ in range(2))
    return RotaryCase(
        dtype=draw(st.sampled_from(dtypes_for(backend))),
        b=b,
        hq=hq,
        hk=hk,
        t=t,
        d=d,
        rotary_dim=rotary_dim,
        layouts=layouts,
        positions=draw(st.sampled_from(["offset", "offset", "(T,)", "(1, T)", "(B, T)"])),
        position_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        offset=draw(st.one_of(st.sampled_from([0, 0, 5]), st.integers(0, lim.position - t))),
        base=draw(st.sampled_from([10000.0, 10000.0, 500000.0, 100.0])),
        interleaved=draw(st.booleans()),
        inplace=inplace,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def check_rotary(backend: str, case: RotaryCase) -> bool:
    device = device_for(backend)
    gen = torch.Generator().manual_seed(case.seed)
    q = make((case.b, case.hq, case.t, case.d), case.layouts[0], gen, case.dtype, device)
    k = make((case.b, case.hk, case.t, case.d), case.layouts[1], gen, case.dtype, device)
    position_ids, max_pos = None, case.offset + case.t
    if case.positions != "offset":
        rows = case.b if case.positions == "(B, T)" else 1
        position_ids = torch.randint(0, max(limits().position, 1), (rows, case.t), generator=gen)
        position_ids = (position_ids[0] if case.positions == "(T,)" else position_ids).to(case.position_dtype)
        position_ids = position_ids.to(device)
        max_pos = limits().position
    if not case.inplace:
        q, k = leaf(q), leaf(k)
    saved = q.detach().clone(), k.detach().clone()
    kwargs = dict(
        q=q,
        k=k,
        position_ids=position_ids,
        offset=case.offset,
        rotary_dim=case.rotary_dim,
        base=case.base,
        interleaved=case.interleaved,
        inplace=case.inplace,
    )
    if case.inplace:
        with torch.no_grad():
            result = serve(metagpt_fast.apply_rotary, backend, **kwargs)
        if result is None:
            return False
        # The op wrote into q and k; the reference runs on the saved inputs.
        assert torch.equal(result[0], q) and torch.equal(result[1], k), "inplace rotary did not write into q and k"
        q, k = saved
    else:
        result = serve(metagpt_fast.apply_rotary, backend, **kwargs)
        if result is None:
            return False
        assert torch.equal(q, saved[0]) and torch.equal(k, saved[1]), "rotary modified its inputs"
    assert all(r.dtype == case.dtype for r in result)
    grad_outs = [torch.randn(r.shape, generator=gen).to(case.dtype).to(device) for r in result]
    fast_grads = None if case.inplace else grads(result, (q, k), grad_outs)
    # A rotated pair (x1, x2) moves by the angle error times |x1| + |x2| <= 2 * magnitude.
    magnitude = max([float(t.abs().max()) for t in (*saved, *grad_outs) if t.numel()] + [0.0])
    slack = 2 * magnitude * float32_angle_error(max_pos - 1)
    runs = []
    for dtype in (case.dtype, oracle_dtype(case.dtype)):
        qr, kr = upcast(q, dtype), upcast(k, dtype)
        ref = reference.apply_rotary(qr, kr, position_ids, case.offset, case.rotary_dim, case.base, case.interleaved)
        ref_grads = None
        if not case.inplace:
            ref_grads = grads(ref, (qr, kr), [g.to(dtype) for g in grad_outs])
        runs.append((ref, ref_grads))
    for i, name in enumerate(("q", "k")):
        assert_parity(result[i], runs[0][0][i], runs[1][0][i], name=f"rotary {name} output", extra=slack)
        if fast_grads is not None:
            assert_parity(fast_grads[i], runs[0][1][i], runs[1][1][i], name=f"rotary d{name}", extra=slack)
    return True


@pytest.mark.parametrize("backend", fast_backend_params("rotary"))
def test_rotary_matches_reference(backend):
    run_property("rotary", backend, rotary_cases(backend), check_rotary)


# ----------------------------------------------------------------------------------------------- decode attention


@dataclasses.dataclass
class DecodeCase:
    dtype: torch.dtype
    b: int
    nq: int
    hk: int
    group: int
    d: int
    capacity: int
    new: int
    page: int | None  # paged cache with pages of this many tokens, or contiguous
    batch_idx: bool
    rotary: str | None  # None, "neox" or "gptj"
    causal: bool
    window: tuple[int, int]
    softcap: float
    alibi: bool
    num_splits: int
    q_layout: str
    seed: int


@st.composite
def decode_cases(draw, backend: str):
    lim = limits()
    d = draw(lengths(2, lim.head_dim))
    new = draw(st.integers(0, 2))
    page = draw(st.sampled_from([None, None, 1, 3, 16]))
    return DecodeCase(
        dtype=draw(st.sampled_from(dtypes_for(backend))),
        b=draw(lengths(1, lim.batch)),
        nq=draw(st.integers(1, 3)),
        hk=draw(lengths(1, lim.heads)),
        group=draw(st.sampled_from([1, 1, 2, 3])),
        d=d,
        capacity=draw(st.integers(new, lim.seq + new)),
        new=new,
        page=page,
        batch_idx=page is None and draw(st.booleans()),
        rotary=draw(st.sampled_from([None, None, "neox", "gptj"])) if new and d >= 2 else None,
        causal=draw(st.booleans()),
        window=draw(st.sampled_from([(-1, -1), (-1, -1), (0, 0), (3, -1), (-1, 2), (5, 1)])),
        softcap=draw(st.sampled_from([0.0, 0.0, 2.0])),
        alibi=draw(st.booleans()),
        num_splits=draw(st.sampled_from([0, 0, 1, 2, 5])),
        q_layout=draw(st.sampled_from(["contiguous", "sliced"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def check_decode(backend: str, case: DecodeCase) -> bool:
    device = device_for(backend)
    gen = torch.Generator().manual_seed(case.seed)
    b, hq, hk, d = case.b, case.hk * case.group, case.hk, case.d
    rows = b + 1 if case.batch_idx else b
    q = make((b, case.nq, hq, d), case.q_layout, gen, case.dtype, device)
    k_cache, v_cache = (make((rows, case.capacity, hk, d), "contiguous", gen, case.dtype, device) for _ in range(2))
    seqlens = torch.randint(0, case.capacity - case.new + 1, (b,), generator=gen, dtype=torch.int32).to(device)
    kwargs = dict(
        cache_seqlens=seqlens,
        causal=case.causal,
        window_size=case.window,
        softcap=case.softcap,
        rotary_interleaved=case.rotary == "gptj",
        num_splits=case.num_splits,
        return_softmax_lse=True,
    )
    if case.new:
        kwargs["k"], kwargs["v"] = (make((b, case.new, hk, d), "contiguous", gen, case.dtype, device) for _ in range(2))
    if case.batch_idx:
        kwargs["cache_batch_idx"] = torch.randperm(rows, generator=gen)[:b].to(torch.int32).to(device)
    if case.rotary:
        half = max(1, d // 4)
        angle = torch.rand(case.capacity + case.nq, half, generator=gen, dtype=torch.float64) * 6
        kwargs["rotary_cos"], kwargs["rotary_sin"] = torch.cos(angle).to(device), torch.sin(angle).to(device)
    if case.alibi:
        kwargs["alibi_slopes"] = (torch.rand(hq, generator=gen) * 0.5).to(device)
    if case.page:
        blocks = max(1, -(-case.capacity // case.page))
        pad = torch.zeros(b, blocks * case.page - case.capacity, hk, d, dtype=case.dtype, device=device)
        order = torch.randperm(b * blocks + 1, generator=gen)[: b * blocks].to(device)
        pages = [torch.zeros(b * blocks + 1, case.page, hk, d, dtype=case.dtype, device=device) for _ in range(2)]
        for p, c in zip(pages, (k_cache, v_cache), strict=True):
            p[order] = torch.cat((c, pad), 1).reshape(b * blocks, case.page, hk, d)
        k_cache, v_cache = pages
        kwargs["block_table"] = order.view(b, blocks).to(torch.int32)
    saved = {n: t.clone() for n, t in kwargs.items() if isinstance(t, torch.Tensor) and n != "cache_seqlens"}

    def call(dtype, backend=None):
        args = {n: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and n != "alibi_slopes"
                else t for n, t in kwargs.items()}  # fmt: skip
        caches = [c.clone().to(dtype) for c in (k_cache, v_cache)]
        if backend is None:
            return (*metagpt_fast.flash_attn_with_kvcache(q.to(dtype), *caches, **args, backend="reference"), *caches)
        result = serve(metagpt_fast.flash_attn_with_kvcache, backend, q=q, k_cache=caches[0], v_cache=caches[1],
                       **args)  # fmt: skip
        return None if result is None else (*result, *caches)

    with torch.no_grad():
        fast = call(case.dtype, backend)
        if fast is None:
            return False
        lowp, exact, exact64 = call(case.dtype), call(oracle_dtype(case.dtype)), call(torch.float64)
    for n, t in saved.items():
        assert torch.equal(kwargs[n], t), f"decode modified {n}"
    assert fast[0].dtype == case.dtype and fast[1].dtype == torch.float32
    assert_parity(fast[0], lowp[0], exact[0], name="decode output")
    empty = torch.isinf(exact64[1])
    assert torch.equal(torch.isinf(fast[1]), empty), "decode lse: rows with no visible key differ"
    # The lse's floor: roundings at the size of the score terms, not of the lse (see tests/test_kvcache.py lse_floor).
    qa = q.abs().double().flatten(0, 2) * (2 if case.rotary else 1)
    products = qa @ fast[2].abs().double().flatten(0, 2).T
    terms = float(products.max()) * d**-0.5 if products.numel() else 0.0
    floor = FLOAT32_ATOL_ULPS * UNIT_ROUNDOFF[torch.float32] * terms
    assert_parity(*(t.masked_fill(empty, 0) for t in (fast[1], lowp[1], exact64[1])), name="decode lse", atol=floor)
    assert torch.equal(fast[2], lowp[2]) and torch.equal(fast[3], lowp[3]), "decode wrote other cache contents"
    return True


@pytest.mark.parametrize("backend", fast_backend_params("decode_attention"))
def test_decode_attention_matches_reference(backend):
    # 100 examples: each runs the op and three reference passes (low precision, float32/float64 oracles), ~3x a
    # rotary example; the per-op parity tests of tests/test_kvcache.py cover the option grid.
    run_property("decode_attention", backend, decode_cases(backend), check_decode, max_examples=100)


# ------------------------------------------------------------------------------------------ unsupported inputs


FAST = [b for b in AVAILABLE if b != "reference"]


@pytest.mark.parametrize("backend", FAST or [pytest.param("none", marks=pytest.mark.skip("no fast backend here"))])
def test_inputs_beyond_a_backend_fall_back_or_raise_with_reasons(backend):
    """float64 and head dims past every kernel's tile: served with parity, or refused cleanly (auto falls back)."""
    seen = collections.Counter()

    @settings(max_examples=12)
    @given(st.sampled_from([torch.float64, torch.float32]), st.sampled_from([257, 300, 512]), st.integers(0, 99))
    def run(dtype, d, seed):
        device = device_for(backend)
        gen = torch.Generator().manual_seed(seed)
        q, k, v = (leaf(make((1, 2, 5, d), "contiguous", gen, dtype, device)) for _ in range(3))
        out = serve(metagpt_fast.scaled_dot_product_attention, backend, query=q, key=k, value=v, is_causal=True)
        seen["served" if out is not None else "refused"] += 1
        if out is not None:
            lo, hi = (
                reference.attention(*(upcast(t, dt) for t in (q, k, v)), is_causal=True)
                for dt in (dtype, oracle_dtype(dtype))
            )
            assert_parity(out, lo, hi, name=f"attention {dtype} D={d}")

    if not implements("attention", backend):
        pytest.skip(f"{backend} has no attention")
    run()
    print(f"\nattention/{backend} beyond limits: {dict(seen)}")


# ------------------------------------------------------------------------------------------------- invalid inputs


def _attention_args(**change):
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    return metagpt_fast.scaled_dot_product_attention, {"query": q, "key": k, "value": v, **change}


def _embed_args(**change):
    return metagpt_fast.embed_positions, {"tokens": torch.tensor([[1, 2]]), "weight": torch.randn(4, 6), **change}


def _rotary_args(**change):
    return metagpt_fast.apply_rotary, {"q": torch.randn(1, 2, 3, 8), "k": torch.randn(1, 1, 3, 8), **change}


META = torch.device("meta")
INVALID = {  # name: (op and arguments, error, words the message must contain)
    "mask not a tensor": (_attention_args(attn_mask=[[True]]), TypeError, "attn_mask must be a torch.Tensor"),
    "mask on another device": (
        _attention_args(attn_mask=torch.ones(5, 5, dtype=torch.bool, device=META)),
        ValueError,
        "attn_mask on meta",
    ),
    "key on another device": (_attention_args(key=torch.randn(2, 2, 5, 8, device=META)), ValueError, "key on meta"),
    "mask of another float dtype": (
        _attention_args(attn_mask=torch.zeros(5, 5, dtype=torch.float64)),
        TypeError,
        "attn_mask must be bool or torch.float32",
    ),
    "infinite scale": (_attention_args(scale=math.inf), ValueError, "scale must be a finite"),
    "enable_gqa not a bool": (_attention_args(enable_gqa="yes"), TypeError, "enable_gqa must be a bool"),
    "dropout NaN": (_attention_args(dropout_p=math.nan), ValueError, "dropout_p must be in"),
    "tokens on another device": (
        _embed_args(tokens=torch.tensor([[1, 2]], device=META)),
        ValueError,
        "tokens on meta",
    ),
    "uint8 tokens": (_embed_args(tokens=torch.tensor([[1, 2]], dtype=torch.uint8)), TypeError, "int64 or int32"),
    "token past the vocabulary": (_embed_args(tokens=torch.tensor([[1, 4]])), ValueError, "tokens must lie in [0, 4)"),
    "sinusoidal not a bool": (_embed_args(sinusoidal="no"), TypeError, "sinusoidal must be a bool"),
    "position ids not a tensor": (_rotary_args(position_ids=[0, 1, 2]), TypeError, "position_ids must be a torch"),
    "interleaved not a bool": (_rotary_args(interleaved=1), TypeError, "interleaved must be a bool"),
    "in place into a broadcast tensor": (
        _rotary_args(q=torch.randn(1, 1, 3, 8).expand(2, 2, 3, 8), k=torch.randn(2, 1, 3, 8), inplace=True),
        ValueError,
        "q is written in place but has a broadcast",
    ),
    "in place with q and k aliased": (
        (lambda t: _rotary_args(q=t, k=t, inplace=True))(torch.randn(1, 2, 3, 8)),
        ValueError,
        "separate memory",
    ),
    "non-finite base": (_rotary_args(base=math.nan), ValueError, "base must be a finite positive"),
}


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_inputs_raise_errors_naming_the_argument(case, backend):
    (fn, kwargs), error, words = INVALID[case]
    with pytest.raises(error) as info:
        fn(**kwargs, backend=backend)
    assert words in str(info.value)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_empty_inputs_never_reach_a_kernel_and_match_torch(backend):
    torch.set_default_device(device_for(backend))
    try:
        check_empty_inputs(backend)
    finally:
        torch.set_default_device(None)


def check_empty_inputs(backend):
    q = torch.randn(2, 3, 4, 8, requires_grad=True)
    k, v = (torch.randn(2, 3, 0, 8, requires_grad=True) for _ in range(2))
    out = metagpt_fast.scaled_dot_product_attention(q, k, v, backend=backend)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=0, rtol=0)
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q)) and k.grad.shape == k.shape
    empty_tokens = torch.zeros(3, 0, dtype=torch.long)
    assert metagpt_fast.embed_positions(empty_tokens, torch.randn(5, 4), backend=backend).shape == (3, 0, 4)
    assert metagpt_fast.add_positional_encoding(torch.randn(0, 3, 4), backend=backend).shape == (0, 3, 4)
    q_out, k_out = metagpt_fast.apply_rotary(torch.randn(1, 2, 3, 8), torch.randn(1, 0, 3, 8), backend=backend)
    assert q_out.shape == (1, 2, 3, 8) and k_out.shape == (1, 0, 3, 8)
