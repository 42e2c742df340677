"""The CUDA attention backward kernels under local windows and a softcap (issue 14), run on CPU through the emulation
of their warp primitives (csrc/attention/attention_emulation.h): dQ, dK and dV against the reference by the parity
rule, for windows aligned bottom-right (flash-attn's) and top-left, causal with Nq > Nk (rows without a visible key:
zero gradients; key tiles no query sees: zero dK / dV), GQA, and a softcap with and without a window.

The forward's out and lse come from the reference one precision up (out rounded to the input dtype, as a forward
stores it), so these cases check the backward alone. Slow: builds the emulation with g++, then runs every CUDA thread
of each block as a fiber.
"""

import ctypes
import math

import pytest
import torch
from test_attention import SEED, SM86, SM90, _compile_emulation, _int64s, _ptr, _strides, emulated_forward_backward

from metagpt_fast.testing import assert_all_parity, oracle_dtype

F16, BF16 = torch.float16, torch.bfloat16

# (b, hq, hk, nq, nk, d, dtype, window_left, window_right, bottom_right, causal, softcap). The launch tiles are 32-64
# rows, so these lengths span several tiles and the windows skip whole ones.
CASES = {
    "d64-fp16-window-bottom-right-nq<nk-gqa": (1, 4, 2, 40, 150, 64, F16, 12, 5, True, False, 0.0),
    "d128-bf16-causal-bottom-right-nq>nk": (1, 2, 2, 100, 37, 128, BF16, -1, -1, True, True, 0.0),
    "d64-bf16-window-top-left-nq>nk": (2, 2, 1, 90, 70, 64, BF16, 20, 3, False, False, 0.0),
    "d64-fp16-softcap": (1, 2, 2, 50, 70, 64, F16, -1, -1, False, False, 5.0),
    "d128-fp16-softcap-left-window-causal": (1, 2, 1, 77, 77, 128, F16, 24, -1, True, True, 8.0),
}
EMULATED = [(c, SM90) for c in CASES] + [(c, SM86) for c in CASES if CASES[c][5] == 128]


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    return _compile_emulation(tmp_path_factory.mktemp("attention_emulation_backward"))


def _visible(nq, nk, left, right, bottom_right, causal):
    """(nq, nk) bool: key j is visible to query i when j - (i + offset) lies in [-left, right] (-1: unbounded)."""
    rel = torch.arange(nk)[None, :] - (torch.arange(nq)[:, None] + (nk - nq if bottom_right else 0))
    right = 0 if causal else right
    allowed = torch.ones(nq, nk, dtype=torch.bool)
    if right >= 0:
        allowed &= rel <= right
    if left >= 0:
        allowed &= rel >= -left
    return allowed


def _reference(q, k, v, allowed, softcap, scale, grad_out, dtype):
    """out, lse and (dq, dk, dv) of the written-out attention in ``dtype``: matmuls in ``dtype``, the capped scores
    and the softmax in float32 (or ``dtype`` when wider); rows with no visible key give 0 and lse = +inf."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    qd, kd, vd = leaves
    group = q.shape[1] // k.shape[1]
    kd, vd = kd.repeat_interleave(group, dim=1), vd.repeat_interleave(group, dim=1)
    acc = torch.promote_types(dtype, torch.float32)
    scores = (qd @ kd.transpose(-2, -1)).to(acc) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed, -math.inf)
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    out = (weights / torch.where(denom > 0, denom, torch.ones_like(denom))).to(vd.dtype) @ vd
    out.backward(grad_out.to(dtype))
    lse = torch.where(denom > 0, row_max + torch.log(denom), math.inf).squeeze(-1)
    return out.detach(), lse.detach().float(), [x.grad for x in leaves]


def emulated_backward(lib, q, k, v, out, lse, grad_out, scale, window, causal, softcap, shared_per_sm):
    b, hq, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    sizes = (ctypes.c_int * 6)(b, hq, hk, nq, nk, d)
    dq = torch.empty_like(q)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    seed = torch.zeros(1, dtype=torch.int64)
    rc = lib.mgf_emulated_attention_backward(
        int(q.dtype == torch.bfloat16), _ptr(grad_out), _ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(lse), None,
        _ptr(dq), _ptr(dk), _ptr(dv), _ptr(delta), _strides(q, k, v, out, grad_out, dq, dk, dv), _int64s([0] * 4),
        sizes, ctypes.c_float(scale), int(causal), ctypes.c_double(0.0), _ptr(seed), shared_per_sm,
        (ctypes.c_int * 3)(*window), ctypes.c_float(softcap),
    )  # fmt: skip
    assert rc == 0
    return dq, dk, dv


@pytest.mark.slow  # builds the emulation with g++, then runs each CUDA thread as a fiber
@pytest.mark.parametrize("case,shared_per_sm", EMULATED, ids=[f"{c}-{s}" for c, s in EMULATED])
def test_emulated_backward_windows_and_softcap_match_reference(emulation, case, shared_per_sm):
    b, hq, hk, nq, nk, d, dtype, left, right, bottom_right, causal, softcap = CASES[case]
    torch.manual_seed(0)
    q = torch.randn(b, hq, nq, d).to(dtype)
    k, v = torch.randn(b, hk, nk, d).to(dtype), torch.randn(b, hk, nk, d).to(dtype)
    grad_out = torch.randn(b, hq, nq, d).to(dtype)
    scale = 1.0 / math.sqrt(d)
    allowed = _visible(nq, nk, left, right, bottom_right, causal)
    _, _, lowp = _reference(q, k, v, allowed, softcap, scale, grad_out, dtype)
    out, lse, oracle = _reference(q, k, v, allowed, softcap, scale, grad_out, oracle_dtype(dtype))
    fast = emulated_backward(
        emulation, q, k, v, out.to(dtype), lse, grad_out, scale, (left, right, int(bottom_right)), causal, softcap,
        shared_per_sm,
    )  # fmt: skip
    for name, f in zip(("dq", "dk", "dv"), fast, strict=True):
        assert torch.isfinite(f).all(), f"{case} {name}: non-finite values"
    assert_all_parity(fast, lowp, oracle, [f"{case} {n}" for n in ("dq", "dk", "dv")])
    # Rows that see no key and keys no row sees get exactly zero gradients.
    empty_rows, unseen_keys = ~allowed.any(dim=1), ~allowed.any(dim=0)
    assert not fast[0][:, :, empty_rows].any()
    assert not fast[1][:, :, unseen_keys].any() and not fast[2][:, :, unseen_keys].any()


@pytest.mark.slow  # the emulation (see above)
@pytest.mark.parametrize("d", [64, 128])
def test_emulated_backward_skips_tiles_outside_the_window(emulation, d):
    """A window of w visits O(w) tiles: rows 256.. of q, dO, k and v are poisoned with NaN after the reference ran,
    and any tile of them a kernel loaded would spread NaN through its products (0 * NaN) into gradients whose
    window never reaches them: dQ of rows < 256 (the CTAs of those rows see keys < 256) and dK, dV of keys < 192
    (the CTAs of those keys see rows < 208)."""
    n, window, dtype = 320, (16, 0, 0), F16  # top-left: query i sees keys [i - 16, i]
    torch.manual_seed(1)
    q, k, v, grad_out = (torch.randn(1, 2, n, d).to(dtype) for _ in range(4))
    scale = 1.0 / math.sqrt(d)
    allowed = _visible(n, n, window[0], window[1], False, False)
    _, _, lowp = _reference(q, k, v, allowed, 0.0, scale, grad_out, dtype)
    out, lse, oracle = _reference(q, k, v, allowed, 0.0, scale, grad_out, torch.float32)
    for x in (q, k, v, grad_out):
        x[:, :, 256:] = float("nan")
    dq, dk, dv = emulated_backward(emulation, q, k, v, out.to(dtype), lse, grad_out, scale, window, False, 0.0, SM90)
    parts = ((dq, 256), (dk, 192), (dv, 192))
    fast = [g[:, :, :rows] for g, rows in parts]
    assert all(torch.isfinite(f).all() for f in fast)
    assert_all_parity(
        fast, [g[:, :, :rows] for g, (_, rows) in zip(lowp, parts, strict=True)],
        [g[:, :, :rows] for g, (_, rows) in zip(oracle, parts, strict=True)], [f"d{d} {n}" for n in ("dq", "dk", "dv")],
    )  # fmt: skip


@pytest.mark.slow  # the emulation (see above)
@pytest.mark.parametrize("case", ["d64-fp16-window-bottom-right-nq<nk-gqa", "d128-fp16-softcap-left-window-causal"])
def test_emulated_forward_then_backward(emulation, case):
    """The backward fed by the CUDA forward's own out and lse (windows and softcap on both sides)."""
    b, hq, hk, nq, nk, d, dtype, left, right, bottom_right, causal, softcap = CASES[case]
    torch.manual_seed(2)
    q = torch.randn(b, hq, nq, d).to(dtype)
    k, v = torch.randn(b, hk, nk, d).to(dtype), torch.randn(b, hk, nk, d).to(dtype)
    grad_out = torch.randn(b, hq, nq, d).to(dtype)
    scale = 1.0 / math.sqrt(d)
    allowed = _visible(nq, nk, left, right, bottom_right, causal)
    low_out, _, lowp = _reference(q, k, v, allowed, softcap, scale, grad_out, dtype)
    out, _, oracle = _reference(q, k, v, allowed, softcap, scale, grad_out, oracle_dtype(dtype))
    *fast, _ = emulated_forward_backward(
        emulation, q, k, v, None, 0.0, causal, scale, SEED, grad_out, SM90, window=(left, right, int(bottom_right)),
        softcap=softcap,
    )  # fmt: skip
    assert_all_parity(fast, [low_out, *lowp], [out, *oracle], [f"{case} {n}" for n in ("out", "dq", "dk", "dv")])


@pytest.mark.slow  # the emulation (see above)
def test_emulated_backward_is_the_same_under_every_warp_schedule(emulation):
    """No atomics and no order-dependent sums: the gradients are bitwise equal whatever order the emulation runs the
    warps in between barriers (seeded), with GQA, a window and a softcap."""
    b, hq, hk, nq, nk, d, dtype, left, right, bottom_right, causal, _ = CASES["d64-fp16-window-bottom-right-nq<nk-gqa"]
    torch.manual_seed(3)
    q = torch.randn(b, hq, nq, d).to(dtype)
    k, v = torch.randn(b, hk, nk, d).to(dtype), torch.randn(b, hk, nk, d).to(dtype)
    grad_out = torch.randn(b, hq, nq, d).to(dtype)
    scale, window = 1.0 / math.sqrt(d), (left, right, int(bottom_right))
    allowed = _visible(nq, nk, left, right, bottom_right, causal)
    out, lse, _ = _reference(q, k, v, allowed, 2.0, scale, grad_out, torch.float32)
    runs = []
    for seed in (1, 2, 3):
        emulation.mgf_emulation_set_seed(ctypes.c_uint64(seed))
        runs.append(
            emulated_backward(emulation, q, k, v, out.to(dtype), lse, grad_out, scale, window, causal, 2.0, SM90)
        )
    for run in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(runs[0], run, strict=True))
