"""The fused Triton attention backward (kernels/triton/attention_fused_bwd.py): one kernel per key block for dK, dV
and the dQ contributions, dQ reduced in a fixed order (default) or with atomics (opt-in).

Parity of the output and of dQ, dK, dV against the reference with ``metagpt_fast.testing``'s rule (float64 oracle for
float32, float32 for float16; plus the flash backward's slack, ``attention_backward_slack``) on odd shapes with
causal masking, boolean and additive masks, dropout (the reference replays the kernels' Philox mask), GQA and
``Nq != Nk``, in both dQ modes; bitwise repeatability of the deterministic mode; the mode selection. Under the
interpreter (bfloat16 runs on a GPU only, docs/testing.md): the interpreter tile (16 queries x 32 keys) with at most
two splits, so a program takes several key blocks in turn and the reduction sums several slices.
"""

import math

import helpers
import pytest
import torch

from metagpt_fast.ops.reference import dropout_keep_mask
from metagpt_fast.ops.reference.attention import attention as reference_attention
from metagpt_fast.testing import assert_all_parity, attention_backward_slack, oracle_dtype

pytest.importorskip("triton")

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
NAMES = ("out", "dq", "dk", "dv")
interpreted_triton = helpers.interpreted_triton("attention")


def _modules():
    from metagpt_fast.backends.triton import attention as backend
    from metagpt_fast.kernels.triton import attention_fused_bwd as fused

    return backend, fused


def _mask(kind, b, hq, nq, nk, device):
    if kind is None:
        return None
    if kind == "key_padding_empty_batch":  # (B, 1, 1, Nk) bool: batch 1 sees no key at all
        mask = torch.ones(b, 1, 1, nk, dtype=torch.bool, device=device)
        mask[0, ..., nk // 2 :] = False
        mask[1] = False
    elif kind == "dense_per_head":  # (B, Hq, Nq, Nk) bool with one fully masked row
        mask = torch.rand(b, hq, nq, nk, device=device) > 0.3
        mask[0, 1, 5] = False
    elif kind == "additive_2d":  # (Nq, Nk) float, a row of -inf and a column of -inf
        mask = torch.randn(nq, nk, device=device)
        mask[7] = float("-inf")
        mask[:, 11] = float("-inf")
    elif kind == "additive_float32_min":  # huge finite biases: rows of very negative scores must stay finite
        mask = torch.zeros(b, 1, 1, nk, device=device)
        mask[0, ..., 15:] = torch.finfo(torch.float32).min
        mask[1] = torch.finfo(torch.float32).min
    else:
        raise ValueError(kind)
    return mask


def _inputs(b, hq, hk, nq, nk, d, dv, dtype, mask, dropout_p, seed, transposed=False):
    """q, k, v, the upstream gradient, the mask and the seed tensor; ``transposed``: all four in (B, N, H, D) memory
    order, as views (B, H, N, D)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = ((hq, nq, d), (hk, nk, d), (hk, nk, dv), (hq, nq, dv))
    if transposed:
        q, k, v, grad_out = (torch.randn(b, n, h, e, generator=gen).transpose(1, 2) for h, n, e in shapes)
    else:
        q, k, v, grad_out = (torch.randn(b, h, n, e, generator=gen) for h, n, e in shapes)
    grad_out = grad_out.to(dtype)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    attn_mask = _mask(mask, b, hq, nq, nk, "cpu")
    seed_t = torch.tensor([seed], dtype=torch.int64) if dropout_p > 0 else None
    return q, k, v, grad_out, attn_mask, seed_t


def _run(fn, q, k, v, grad_out, attn_mask, dt, **kwargs):
    """(out, dq, dk, dv) of ``fn`` on inputs cast to ``dt``."""
    leaves = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
    m = attn_mask.to(dt) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    out = fn(*leaves, attn_mask=m, **kwargs)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(dt))]


def _run_case(monkeypatch, mode, *, b=1, hq=2, hk=None, nq=17, nk=None, d=32, dv=None, dtype=F32, causal=False,
              mask=None, dropout_p=0.0, scale=None, seed=20240611, transposed=False, parity=True):  # fmt: skip
    """Runs the Triton attention forward and backward under ``mode`` (asserting the fused kernel ran) and, with
    ``parity``, checks the output and the three gradients against the reference. Returns the Triton results and the
    fused launch's (tile, n_splits, atomic)."""
    backend, fused = _modules()
    hk, nk, dv = hk or hq, nk or nq, dv or d
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    monkeypatch.setenv(fused.ENV_VAR, mode)
    calls = []
    launch = fused.attention_backward
    monkeypatch.setattr(fused, "attention_backward", lambda *a, **kw: calls.append(a[-3:]) or launch(*a, **kw))
    # The deterministic scratch is not zeroed: NaN there shows up in dQ if a row is read before it is written.
    monkeypatch.setattr(fused, "_scratch", lambda shape, device: torch.full(shape, math.nan, device=device))

    q, k, v, grad_out, attn_mask, seed_t = _inputs(b, hq, hk, nq, nk, d, dv, dtype, mask, dropout_p, seed, transposed)
    args = dict(dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=hq != hk)
    fast = _run(backend.attention, q, k, v, grad_out, attn_mask, dtype, seed=seed_t, **args)
    assert len(calls) == 1 and calls[0][-1] == (mode == "fused_atomic"), "the fused backward did not run"
    for name, f in zip(NAMES, fast, strict=True):
        assert f.dtype == dtype and torch.isfinite(f).all(), name
    if not parity:
        return fast, calls[0]
    keep = dropout_keep_mask(seed_t, (b, hq, nq, nk), dropout_p, "cpu") if dropout_p > 0 else None
    lowp = _run(reference_attention, q, k, v, grad_out, attn_mask, dtype, dropout_mask=keep, **args)
    exact = _run(reference_attention, q, k, v, grad_out, attn_mask, oracle_dtype(dtype), dropout_mask=keep, **args)
    m = attn_mask.to(dtype) if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
    slack = attention_backward_slack(q, k, v, exact[0], grad_out, scale=scale, attn_mask=m, is_causal=causal,
                                     dropout_mask=keep, dropout_p=dropout_p)  # fmt: skip
    assert_all_parity(fast, lowp, exact, NAMES, (0.0, *slack))
    return fast, calls[0]


def _case(**kw):
    name = "-".join(f"{k}{v}" for k, v in kw.items()).replace("torch.", "")
    return pytest.param(kw, id=name)


QUICK = [
    _case(nq=37, nk=70, d=32, causal=True, hq=2, hk=1),  # GQA, odd N, Nq < Nk across several key blocks
    _case(nq=77, nk=17, d=48, dtype=F16, causal=True),  # Nq > Nk, padded head dim, float16
    _case(nq=25, nk=40, d=16, hq=4, hk=2, causal=True, dropout_p=0.5),
    _case(nq=29, nk=40, d=32, b=2, dtype=F16, mask="dense_per_head"),
    _case(nq=9, nk=21, d=16, b=2, mask="additive_float32_min"),
    _case(nq=30, nk=45, d=32, b=2, mask="key_padding_empty_batch"),
    _case(nq=33, nk=50, d=48, dv=16, scale=0.3, causal=True),  # Dv != D, custom scale
]
SLOW = [
    _case(nq=1, d=16),
    _case(nq=64, nk=64, d=32, causal=True),  # no boundary block
    _case(nq=40, nk=64, d=64, dtype=F16, scale=-4.0),  # a negative scale
    _case(nq=45, nk=66, d=32, hq=4, hk=2, causal=True, dropout_p=0.5),
    _case(nq=50, d=32, b=2, mask="additive_2d", dropout_p=0.2),
    _case(nq=37, nk=70, d=32, hq=4, hk=1, causal=False, dropout_p=0.1, dtype=F16),  # MQA
    _case(nq=33, d=256, causal=True),  # D=256
    _case(nq=20, nk=64, d=256, dtype=F16),
    _case(nq=40, nk=51, d=48, b=2, hq=4, hk=2, dtype=F16, causal=True, transposed=True),  # (B, N, H, D) storage
]


@interpreted_triton
@pytest.mark.parametrize("case", QUICK)
def test_fused_backward_matches_reference(case, monkeypatch):
    _run_case(monkeypatch, "fused", **case)


@interpreted_triton
@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW)
def test_fused_backward_matches_reference_more_shapes(case, monkeypatch):
    _run_case(monkeypatch, "fused", **case)


@interpreted_triton
@pytest.mark.parametrize(
    "case",
    [
        _case(nq=29, nk=40, d=16, b=2, mask="dense_per_head", dtype=F16),
        pytest.param(dict(nq=37, nk=70, d=32, hq=4, hk=2, causal=True, dropout_p=0.3), marks=pytest.mark.slow),
    ],
)
def test_atomic_backward_matches_reference(case, monkeypatch):
    """The opt-in atomic dQ: not bitwise repeatable on a GPU, but within the same parity rule."""
    _run_case(monkeypatch, "fused_atomic", **case)


@interpreted_triton
def test_fused_backward_is_bitwise_deterministic(monkeypatch):
    """Two runs of the deterministic mode give the same bits (several key blocks per split, two slices summed), and
    the first matches the reference."""
    # Causal with Nk > Nq: split 1's key blocks (1 and 3) start past the last query and write no dQ row.
    kw = dict(hq=2, hk=1, nq=21, nk=100, d=16, causal=True, dropout_p=0.25, seed=7)
    first, (tile, n_splits, atomic) = _run_case(monkeypatch, "fused", **kw)
    assert (n_splits, atomic) == (2, False) and math.ceil(100 / tile[1]) > n_splits
    second, _ = _run_case(monkeypatch, "fused", **kw, parity=False)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), name


@interpreted_triton
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fused", "fused_atomic"])
def test_backward_op_passes_opcheck_with_the_fused_kernel(mode, monkeypatch):
    """The backward custom op's schema holds with the fused kernel (no input mutated; the fake-tensor checks need
    data the interpreter cannot trace, as for the split kernels)."""
    backend, fused = _modules()
    monkeypatch.setenv(fused.ENV_VAR, mode)
    q, k, v = torch.randn(1, 2, 19, 16), torch.randn(1, 1, 40, 16), torch.randn(1, 1, 40, 16)
    mask, seed = torch.rand(1, 1, 1, 40) > 0.2, torch.tensor([3], dtype=torch.int64)
    out, lse = backend.attention_forward(q, k, v, mask, 0.1, True, 0.25, seed)
    backward = torch.ops.metagpt_fast.triton_attention_backward.default
    args = (torch.randn_like(out), q, k, v, out, lse, mask, 0.1, True, 0.25, seed)
    assert fused.select(q, k, v, mask, 0.1) is not None
    torch.library.opcheck(backward, args, test_utils=("test_schema",))


@interpreted_triton
def test_backward_mode_selection(monkeypatch):
    _, fused = _modules()
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    monkeypatch.delenv(fused.ENV_VAR, raising=False)
    assert fused.backward_mode() == "split"  # the default
    assert fused.select(q, k, v, None, 0.0) is None
    assert fused.select(q, k, v, None, 0.0, "split") is None
    tile, n_splits, atomic = fused.select(q, k, v, None, 0.0, "fused")
    assert (tile, n_splits, atomic) == (fused.INTERPRETER_TILE, 1, False)
    assert fused.select(q, k, v, None, 0.0, "fused_atomic")[2] is True
    # Atomics are not used while torch asks for deterministic algorithms.
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert fused.select(q, k, v, None, 0.0, "fused_atomic")[2] is False
    monkeypatch.setenv(fused.ENV_VAR, "Fused_Atomic ")
    assert fused.backward_mode() == "fused_atomic"
    monkeypatch.setenv(fused.ENV_VAR, "atomics")
    with pytest.raises(ValueError, match=fused.ENV_VAR):
        fused.backward_mode()


def test_fused_tiles_and_splits_on_a_gpu(monkeypatch):
    """What :func:`plan` picks on a GPU (capability and multiprocessors mocked): a tile only for the spill-free
    families (sm_90, 16-bit, D <= 128), splits bounded by the scratch budget, the split kernels when too few programs
    would be left."""
    _, fused = _modules()
    monkeypatch.setattr(fused, "INTERPRETED", False)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: type("P", (), {"multi_processor_count": 132})
    )
    capability = {"cc": 90}
    monkeypatch.setattr(fused, "_capability", lambda device: capability["cc"])

    def tensors(b, hq, hk, n, d, dtype=F16):
        return (
            torch.empty(b, hq, n, d, dtype=dtype),
            torch.empty(b, hk, n, d, dtype=dtype),
            torch.empty(b, hk, n, d, dtype=dtype),
        )

    plain, heavy = fused.FUSED_TILES[90][(16, 64, False)], fused.FUSED_TILES[90][(16, 64, True)]
    assert fused.plan(*tensors(2, 4, 4, 1000, 64), None, 0.0, False) == (plain, math.ceil(1000 / plain[1]))
    assert fused.plan(*tensors(2, 4, 4, 1000, 48), None, 0.1, False)[0] == heavy  # dropout: the heavy family
    # D=128: one key block per program only (the loop over several spills): where the budget has a slice for each
    plain_128 = fused.FUSED_TILES[90][(16, 128, False)]
    assert fused.plan(*tensors(2, 4, 4, 1000, 128), None, 0.0, False) == (plain_128, math.ceil(1000 / plain_128[1]))
    assert fused.plan(*tensors(1, 32, 8, 8192, 128), None, 0.0, False) is None  # 8 of 64 slices fit
    assert fused.plan(*tensors(1, 32, 8, 8192, 128), None, 0.0, True) == (plain_128, 64)
    assert fused.plan(*tensors(2, 4, 4, 1000, 256), None, 0.0, False) is None  # D=256: split kernels
    assert fused.plan(*tensors(2, 4, 4, 1000, 64, F32), None, 0.0, False) is None  # float32: split kernels
    # 64 key blocks, dQ in float32 is 64 MiB: 16 splits fill the 1 GiB budget, 128 programs
    assert fused.plan(*tensors(1, 32, 8, 8192, 64), None, 0.0, False) == (plain, 16)
    assert fused.plan(*tensors(1, 32, 8, 8192, 64), None, 0.0, True) == (plain, 64)  # atomic: every key block
    assert fused.plan(*tensors(1, 32, 2, 8192, 64), None, 0.0, False) is None  # 32 programs: split kernels
    capability["cc"] = 80
    assert fused.plan(*tensors(2, 4, 4, 1000, 64), None, 0.0, False) is None  # sm_80: mma.sync tiles repeat or spill


# ------------------------------------------------------------------------------------------------------------ GPU


def _gpu_grads(mode, monkeypatch, q, k, v, grad_out, **kwargs):
    backend, fused = _modules()
    monkeypatch.setenv(fused.ENV_VAR, mode)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = backend.attention(*leaves, **kwargs)
    return [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]


@pytest.mark.gpu
@helpers.requires_cuda
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("splits", [None, 3], ids=["planned_splits", "3_splits"])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_fused_backward_matches_reference_and_repeats(dtype, splits, d, monkeypatch):
    """On sm_90 (the fused tiles' architecture): parity of both dQ modes, and bitwise repetition of the deterministic
    one, with the planned splits (one key block each here) and with 3 splits of 3 key blocks."""
    backend, fused = _modules()
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the fused backward has tiles for sm_90 only (docs/triton-attention.md)")
    b, hq, hk, n = 2, 8, 2, 1031
    q = torch.randn(b, hq, n, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(b, hk, n, d, device="cuda", dtype=dtype) for _ in range(2))
    grad_out = torch.randn(b, hq, n, d, device="cuda", dtype=dtype)
    kwargs = dict(attn_mask=None, dropout_p=0.0, is_causal=True, scale=d**-0.5, enable_gqa=True, seed=None)
    tile, n_splits, _ = fused.select(q, k, v, None, 0.0, "fused")
    assert n_splits == math.ceil(n / tile[1])
    if splits is not None:
        plan = fused.plan
        monkeypatch.setattr(fused, "plan", lambda *a: (plan(*a)[0], splits) if not a[-1] else plan(*a))
    first = _gpu_grads("fused", monkeypatch, q, k, v, grad_out, **kwargs)
    second = _gpu_grads("fused", monkeypatch, q, k, v, grad_out, **kwargs)
    for name, a, c in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, c), name
    atomic = _gpu_grads("fused_atomic", monkeypatch, q, k, v, grad_out, **kwargs)
    args = dict(is_causal=True, scale=d**-0.5, enable_gqa=True)

    def ref(dt):
        leaves = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]
        out = reference_attention(*leaves, **args)
        return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(dt))]

    lowp, exact = ref(dtype), ref(F32)
    slack = attention_backward_slack(q, k, v, exact[0], grad_out, scale=d**-0.5, is_causal=True)
    assert_all_parity(first, lowp, exact, NAMES, (0.0, *slack))
    assert_all_parity(atomic, lowp, exact, NAMES, (0.0, *slack))
