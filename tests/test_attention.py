"""The attention op (scaled dot-product attention, forward and backward) on every backend that runs here, against
the reference.

The parity test is written once and runs on every (backend, device) the registry reports (``kernel_params``): the
Triton kernels (interpreted on CPU tensors, compiled on CUDA ones), the compiled extension's C++ ``cpu`` kernels and
its CUDA ``cuda`` kernels, each with the cases listed for it below. The output and dQ, dK, dV follow the parity rule of
``metagpt_fast.testing``: at most twice as far from the reference run one precision up (float64 for float32, float32
for float16 / bfloat16) as the reference run in the kernel's own precision; where a case says so, plus the roundings
of a flash-style backward that the reference's autograd does not have (``attention_backward_slack``). Dropout is
compared by replaying the kernel's Philox mask (``reference.dropout_keep_mask``) in the reference. bfloat16 Triton
runs on a GPU only (docs/testing.md).

After the parity test, one section per backend for its own machinery: determinism of the backward pass, custom-op
registration (opcheck), torch.compile, the registry's reasons, the public op, and the CUDA kernels compiled for the
host with the CPU emulation of their warp primitives (slow).
"""

import ctypes
import math
import os
import shutil
import subprocess
from pathlib import Path

import helpers
import pytest
import torch
from helpers import kernel_params, requires_cuda, skip_unless_supported

import metagpt_fast
from metagpt_fast import _extension, backends
from metagpt_fast.ops import reference
from metagpt_fast.ops.reference import dropout_keep_mask
from metagpt_fast.ops.reference.attention import attention as reference_attention
from metagpt_fast.testing import assert_all_parity, assert_parity, attention_backward_slack, oracle_dtype

ROOT = Path(__file__).resolve().parents[1]
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPE_IDS = {F32: "float32", F16: "float16", BF16: "bfloat16"}
SEED = 20240611  # dropout seed of the CUDA kernels' cases (and their emulation)
NAMES = ("out", "dq", "dk", "dv")

# ------------------------------------------------------------------------------------------------------- cases


def _case(b, hq, hk, nq, nk, d, dtype, *, dv=None, causal=False, mask=None, dropout_p=0.0, scale=None,
          layout="contiguous", grad_layout="contiguous", seed=None, slack=False, post=None,
          float32_fixed=False):  # fmt: skip
    """A case: q (B, Hq, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv) in ``layout`` ("contiguous"; "strided": q in
    (B, N, H, D) memory order, k a slice of a wider head dim, v with a last stride of 2; "transposed": all three in
    (B, N, H, D) order; "fused_kv": k and v views of one (B, Nk, Hk, D + Dv) projection), a mask kind (``_mask``),
    dropout with the Philox ``seed`` (default ``SEED``), the upstream gradient's layout ("transposed": (B, N, H, Dv)
    order), whether the flash backward's slack applies, ``post``: a case-specific check (``_post``), and
    ``float32_fixed``: float32 results held to the fixed tolerance against the float32 reference (``assert_parity``
    without a reference run) instead of the rule against float64, as the C++ kernels' plain cases always were."""
    return dict(b=b, hq=hq, hk=hk, nq=nq, nk=nk, d=d, dv=dv or d, dtype=dtype, causal=causal, mask=mask,
                dropout_p=dropout_p, scale=1.0 / math.sqrt(d) if scale is None else scale, layout=layout,
                grad_layout=grad_layout, seed=SEED if seed is None else seed, slack=slack, post=post,
                float32_fixed=float32_fixed)  # fmt: skip


def _cases(cases):
    named = {}
    for c in cases:
        name = (f"{c['b']}x{c['hq']}x{c['hk']}x{c['nq']}x{c['nk']}x{c['d']}x{c['dv']}-{DTYPE_IDS[c['dtype']]}"
                f"-{'causal' if c['causal'] else 'full'}-mask_{c['mask']}-p{c['dropout_p']:g}-scale{c['scale']:.3g}"
                f"-{c['layout']}-grad_{c['grad_layout']}")  # fmt: skip
        assert name not in named, name
        named[name] = c
    return named


def _triton_interpreted_cases():
    """Every N in {1, 17, 77, 200}, every D in {16, 32, 48, 64, 80, 128}, causal and not, each mask kind, GQA and
    MQA, Nq != Nk, dropout, strided inputs and gradient; float32 and float16 (the interpreter's bfloat16 is wrong)."""

    def tri(nq=17, d=32, dtype=F32, *, b=1, hq=2, hk=None, nk=None, **kw):
        # torch's causal alignment when Nq != Nk is top-left: query i sees keys j <= i.
        return _case(b, hq, hk or hq, nq, nk or nq, d, dtype, seed=20240611 + nq * (nk or nq), slack=True, **kw)

    cases = [
        tri(n, d, dtype, causal=causal)
        for n, d, causal, dtype in [
            (1, 16, False, F32), (1, 64, True, F16), (17, 16, True, F16), (17, 128, False, F32), (77, 32, False, F16),
            (77, 48, True, F32), (77, 80, False, F16), (200, 64, True, F32), (200, 80, True, F16),
            (200, 128, False, F16),
        ]
    ]  # fmt: skip
    cases += [tri(nq, 32, nk=nk, causal=c) for nq, nk in [(17, 77), (77, 17), (1, 200), (200, 33)] for c in (0, 1)]
    cases += [tri(33, 48, nk=50, dv=16, scale=0.3, causal=True)]  # Dv != D, custom scale
    # (B, 1, 1, Nk) bool: batch 0 pads its last 20 keys, batch 1 masks every key -> its output rows are 0.
    cases += [tri(30, 32, b=2, nk=45, mask="key_padding_empty_batch", post="empty_batch")]
    cases += [tri(40, 64, dt, b=2, nk=77, mask="dense_per_head") for dt in (F32, F16)]
    cases += [tri(50, 32, dt, b=2, mask="additive_2d", post="row_7_empty") for dt in (F32, F16)]
    # finfo(float32).min must not overflow to -inf inside the kernel (base-2 scaling): such a row is uniform.
    cases += [tri(9, 16, b=2, nk=21, mask="additive_float32_min")]
    cases += [tri(33, 16, b=2, nk=40, mask="query_broadcast")]  # (1, Hq, Nq, 1): stride 0 along keys
    cases += [tri(37, 32, b=2, hq=hq, hk=hk, nk=70, causal=c) for hq, hk, c in [(4, 2, True), (4, 1, False)]]
    cases += [
        tri(45, 32, dt, b=2, hq=hq, hk=hk, nk=66, causal=c, dropout_p=p)
        for p, c, hq, hk, dt in [(0.2, False, 2, 2, F32), (0.5, True, 4, 2, F32), (0.1, True, 2, 1, F16)]
    ]
    cases += [tri(29, 16, b=2, nk=40, mask="key_padding_batch_1", dropout_p=0.3)]
    cases += [
        tri(40, 48, dt, b=2, hq=4, hk=2, nk=51, causal=True, layout="strided", grad_layout="transposed")
        for dt in (F32, F16)
    ]
    # Negative scales: the forward folds the scale into one FFMA only when it is >= 0.
    cases += [tri(70, 32, F32, causal=True, scale=-8.0), tri(40, 64, F16, nk=64, scale=-4.0)]
    # No boundary blocks (Nk a multiple of the key tile): the boundary loop is skipped.
    cases += [tri(64, 32), tri(64, 64, F16), tri(77, 32, nk=32, causal=True)]
    cases += [tri(33, 256, F32, causal=True), tri(20, 256, F16, nk=64)]  # D=256 tiles
    return _cases(cases)


def _cpu_cases():
    """C++ kernels: GQA with an odd length and head dim, Nq < Nk and Nq > Nk across several tiles, Dv != D, one
    token; no mask, causal, a boolean mask with an empty row, an additive mask; dropout; k and v strided views of one
    fused projection."""
    cases = [
        _case(
            b,
            hq,
            hk,
            nq,
            nk,
            d,
            dtype,
            dv=dv,
            causal=causal,
            mask=mask,
            scale=0.3,
            layout="fused_kv",
            float32_fixed=True,
        )
        for mask, causal in [(None, False), (None, True), ("bool", False), ("float", False)]
        for b, hq, hk, nq, nk, d, dv in [
            (2, 4, 2, 77, 77, 40, 40),  # GQA, odd length, non-power-of-2 head dim
            (1, 3, 3, 17, 200, 64, 32),  # Nq < Nk across several key tiles, Dv != D
            (1, 2, 1, 300, 17, 24, 24),  # Nq > Nk across several query tiles
            (2, 1, 1, 1, 1, 8, 8),
        ]
        for dtype in (F32, BF16, F16)
    ]
    cases += [
        _case(2, 4, 2, 33, 70, 16, dtype, causal=causal, dropout_p=0.3, scale=0.25, seed=1234567890123)
        for dtype in (F32, BF16)
        for causal in (False, True)
    ]
    return _cases(cases)


# (b, hq, hk, nq, nk, d, dtype, causal, mask, dropout_p, transposed): the CUDA kernels' cases, on a GPU and (CASES)
# in the CPU emulation.
CASES = {
    "d64-fp16": (1, 2, 2, 40, 40, 64, F16, False, None, 0.0, False),
    "d128-fp16-causal": (1, 2, 2, 77, 77, 128, F16, True, None, 0.0, False),
    "d64-bf16-causal-nq>nk": (1, 2, 2, 150, 33, 64, BF16, True, None, 0.0, False),
    "d64-fp16-causal-nq<nk": (1, 2, 2, 33, 150, 64, F16, True, None, 0.0, False),
    "d64-fp16-key-padding": (2, 2, 2, 17, 70, 64, F16, False, "key_padding", 0.0, False),
    "d128-bf16-dense-mask": (2, 2, 2, 40, 50, 128, BF16, False, "dense", 0.0, False),
    "d128-bf16-gqa-dropout": (1, 4, 2, 70, 90, 128, BF16, False, None, 0.3, False),
    "d64-fp16-gqa-causal-dropout": (1, 6, 2, 65, 65, 64, F16, True, None, 0.2, False),
    "d64-fp16-strided": (2, 2, 2, 50, 50, 64, F16, False, None, 0.0, True),
    "d64-bf16-n1": (1, 1, 1, 1, 1, 64, BF16, False, None, 0.0, False),
}
GPU_CASES = dict(CASES)
for _dtype in (F16, BF16):
    for _d in (64, 128):
        for _causal in (False, True):
            _name = f"grid-{str(_dtype)[6:]}-d{_d}-{'causal' if _causal else 'full'}"
            GPU_CASES[_name] = (2, 4, 4, 200, 200, _d, _dtype, _causal, None, 0.0, False)
GPU_CASES.update({
    "d64-fp16-n17": (3, 2, 2, 17, 17, 64, F16, True, None, 0.0, False),
    "d128-bf16-shared-key-padding": (2, 4, 2, 77, 130, 128, BF16, False, "key_padding_shared", 0.0, False),
    "d128-fp16-key-padding-dropout": (2, 2, 2, 90, 90, 128, F16, False, "key_padding", 0.1, False),
    "d128-bf16-long-causal-gqa": (1, 8, 2, 1031, 1031, 128, BF16, True, None, 0.0, True),
})  # fmt: skip


def _cuda_cases():
    cases = {}
    for name, (b, hq, hk, nq, nk, d, dtype, causal, mask, p, transposed) in GPU_CASES.items():
        layout = "transposed" if transposed else "contiguous"
        cases[f"{name}-{DTYPE_IDS[dtype]}"] = _case(
            b, hq, hk, nq, nk, d, dtype, causal=causal, mask=mask, dropout_p=p, layout=layout
        )
    return cases


ATTENTION_CASES = {
    ("triton", "cpu"): _triton_interpreted_cases(),
    # Compiled Triton at training sizes in both half precisions; float32 (which must not run in TF32) with the flash
    # backward's slack.
    ("triton", "cuda"): _cases(
        [_case(2, 8, 8, 1024, 1024, d, dt, causal=True, seed=1234) for d in (64, 128) for dt in (BF16, F16)]
        + [_case(2, 8, 2, 997, 1531, 80, dt, mask="key_padding_from_1000", seed=1234) for dt in (BF16, F16)]
        + [_case(1, 4, 4, 300, 700, 256, BF16, mask="additive_randn", seed=1234)]
        + [_case(2, 4, 4, 512, 512, 64, BF16, causal=True, dropout_p=0.1, seed=1234)]
        + [_case(1, 4, 4, 300, 300, 64, F32, causal=True, scale=0.125, slack=True)]
    ),
    ("cpu", "cpu"): _cpu_cases(),
    # CUDA kernels: both head dims and dtypes, causal with Nq != Nk, key-padding and dense boolean masks, GQA,
    # dropout, odd lengths, (B, N, H, D) storage.
    ("cuda", "cuda"): _cuda_cases(),
}


def _inputs(case, device):
    """q, k, v in float32 on ``device`` in the case's layout."""
    b, hq, hk, nq, nk, d, dv = (case[n] for n in ("b", "hq", "hk", "nq", "nk", "d", "dv"))
    layout = case["layout"]
    if layout == "strided":
        q = torch.randn(b, nq, hq, d, device=device).transpose(1, 2)
        k = torch.randn(b, hk, nk, d + 8, device=device)[..., 3 : 3 + d]
        v = torch.randn(b, hk, nk, 2 * dv, device=device)[..., ::2]
    elif layout == "transposed":
        q, k, v = (torch.randn(b, n, h, e, device=device).transpose(1, 2) for h, n, e in
                   ((hq, nq, d), (hk, nk, d), (hk, nk, dv)))  # fmt: skip
    elif layout == "fused_kv":
        q = torch.randn(b, hq, nq, d, device=device)
        kv = torch.randn(b, nk, hk, d + dv, device=device)
        k, v = kv[..., :d].transpose(1, 2), kv[..., d:].transpose(1, 2)
    else:
        q, k, v = (torch.randn(b, h, n, e, device=device) for h, n, e in ((hq, nq, d), (hk, nk, d), (hk, nk, dv)))
    return q, k, v


def _mask(kind, case, device):
    """The attention mask of kind ``kind`` (bool, or float32 additive) for the case's shapes."""
    b, hq, nq, nk = (case[n] for n in ("b", "hq", "nq", "nk"))
    if kind is None:
        return None
    if kind == "key_padding_empty_batch":  # batch 0 pads its last 20 keys, batch 1 masks every key
        mask = torch.ones(b, 1, 1, nk, dtype=torch.bool, device=device)
        mask[0, ..., 25:] = False
        mask[1] = False
    elif kind == "dense_per_head":
        mask = torch.rand(b, hq, nq, nk, device=device) > 0.3
        mask[0, 1, 5] = False  # one fully-masked row
    elif kind == "additive_2d":  # broadcast over batch and heads
        mask = torch.randn(nq, nk, device=device)
        mask[7] = float("-inf")  # fully masked row -> 0
        mask[:, 11] = float("-inf")
    elif kind == "additive_float32_min":
        mask = torch.zeros(b, 1, 1, nk, device=device)
        mask[0, ..., 15:] = torch.finfo(torch.float32).min
        mask[1] = torch.finfo(torch.float32).min
    elif kind == "query_broadcast":
        mask = torch.rand(1, hq, nq, 1, device=device) > 0.2
    elif kind == "key_padding_batch_1":
        mask = torch.ones(b, 1, 1, nk, dtype=torch.bool, device=device)
        mask[1, ..., 31:] = False
    elif kind == "key_padding_from_1000":
        mask = torch.ones(b, 1, 1, nk, dtype=torch.bool, device=device)
        mask[1, ..., 1000:] = False
    elif kind == "additive_randn":
        mask = torch.randn(1, 1, nq, nk, device=device)
    elif kind == "key_padding":  # (B, 1, 1, Nk); batch 0 has no visible key at all
        mask = torch.rand(b, 1, 1, nk, device=device) > 0.3
        mask[0] = False
    elif kind == "key_padding_shared":  # (1, 1, 1, Nk)
        mask = torch.rand(1, 1, 1, nk, device=device) > 0.3
    elif kind == "dense":  # (B, 1, Nq, Nk), a few rows fully masked
        mask = torch.rand(b, 1, nq, nk, device=device) > 0.5
        mask[:, :, ::7] = False
    elif kind == "bool":  # batch 0 keeps at least its first keys, a query row of the last batch sees none
        mask = torch.rand(b, 1, nq, nk, device=device) > 0.3
        mask[0, :, :, : max(1, nk // 2)] = True
        mask[-1, :, 0, :] = False
        mask = mask[:, :, :1] if nq == 1 else mask
    elif kind == "float":
        mask = torch.randn(1, hq, nq, nk, device=device)
    else:
        raise ValueError(kind)
    return mask


def _post(kind, fast):
    """Case-specific checks of the kernel's output and gradients."""
    out, dq, dk, _ = fast
    if kind == "empty_batch":
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.equal(dq[1], torch.zeros_like(dq[1])) and torch.equal(
            dk[0, :, 25:], torch.zeros_like(dk[0, :, 25:])
        )
    elif kind == "row_7_empty":
        assert torch.equal(out[:, :, 7], torch.zeros_like(out[:, :, 7]))


# ------------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("backend, device, case", kernel_params("attention", ATTENTION_CASES))
def test_attention_matches_reference(backend, device, case, monkeypatch):
    if device == "cuda":  # the float32 reference is the yardstick: it must not run its matmuls in TF32 either
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    dtype, p, causal, scale = case["dtype"], case["dropout_p"], case["causal"], case["scale"]
    b, hq, hk, nq, nk, dv = (case[n] for n in ("b", "hq", "hk", "nq", "nk", "dv"))
    q, k, v = (x.to(dtype) for x in _inputs(case, device))
    mask = _mask(case["mask"], case, device)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dtype)
    grad_out = torch.randn(b, hq, nq, dv, device=device).to(dtype)
    if case["grad_layout"] == "transposed":  # (B, N, H, Dv) memory order, as from a following projection
        grad_out = grad_out.transpose(1, 2).contiguous().transpose(1, 2)
    seed = torch.tensor([case["seed"]], dtype=torch.int64, device=device) if p > 0 else None
    keep = dropout_keep_mask(seed, (b, hq, nq, nk), p, device) if p > 0 else None
    args = dict(attn_mask=mask, dropout_p=p, is_causal=causal, scale=scale, enable_gqa=hq != hk)
    impl = skip_unless_supported("attention", backend, query=q, key=k, value=v, **args)

    def run(fn, dt, **kwargs):
        leaves = [x.detach().to(dt).requires_grad_() for x in (q, k, v)]  # keeps the layout of dense views
        m = mask.to(dt) if mask is not None and mask.is_floating_point() else mask
        out = fn(*leaves, **dict(args, attn_mask=m), **kwargs)
        return [out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(dt))]

    fast = run(lambda q, k, v, **kw: impl.fn(query=q, key=k, value=v, **kw), dtype, seed=seed)
    if case["float32_fixed"] and dtype == F32:
        lowp, exact = [None] * 4, run(reference_attention, F32, dropout_mask=keep)
    else:
        lowp = run(reference_attention, dtype, dropout_mask=keep)
        exact = run(reference_attention, oracle_dtype(dtype), dropout_mask=keep)
    for name, f in zip(NAMES, fast, strict=True):
        assert f.dtype == dtype and torch.isfinite(f).all(), name
    slack = (0.0, 0.0, 0.0)
    if case["slack"]:
        slack = attention_backward_slack(q, k, v, exact[0], grad_out, scale=scale, attn_mask=mask, is_causal=causal,
                                         dropout_mask=keep, dropout_p=p)  # fmt: skip
    assert_all_parity(fast, lowp, exact, NAMES, (0.0, *slack))
    _post(case["post"], fast)


# ------------------------------------------------------------------------------------------- triton, interpreted

interpreted_triton = helpers.interpreted_triton("attention")


def _triton_attention():
    from metagpt_fast.backends.triton import attention as triton_attention

    return triton_attention


def _grads(fn, q, k, v, grad_out, **kwargs):
    out = fn(q, k, v, **kwargs)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)]


@interpreted_triton
def test_triton_backward_is_bitwise_deterministic():
    q = torch.randn(1, 4, 40, 32, requires_grad=True)
    k, v = (torch.randn(1, 2, 50, 32, requires_grad=True) for _ in range(2))
    grad_out = torch.randn(1, 4, 40, 32)
    seed = torch.tensor([7], dtype=torch.int64)
    args = dict(attn_mask=None, dropout_p=0.25, is_causal=True, scale=0.2, enable_gqa=True, seed=seed)
    first = _grads(_triton_attention().attention, q, k, v, grad_out, **args)
    second = _grads(_triton_attention().attention, q, k, v, grad_out, **args)
    for name, a, b in zip(NAMES, first, second, strict=True):
        assert torch.equal(a, b), name


@interpreted_triton
def test_triton_registered_with_reasons():
    impl = backends.lookup("attention", "triton")
    assert impl.slow and impl.priority({}) == 20
    q = torch.randn(1, 2, 8, 16)
    ok = dict(query=q, key=q, value=q, attn_mask=None, dropout_p=0.0, is_causal=False, scale=0.25, enable_gqa=False)
    assert impl.not_supported_reasons(**ok) == []
    wide = torch.randn(1, 1, 4, 512)
    for bad in (
        dict(ok, query=q.double(), key=q.double(), value=q.double()),
        dict(ok, query=q.bfloat16(), key=q.bfloat16(), value=q.bfloat16()),
        dict(ok, query=wide, key=wide, value=wide),
        dict(ok, attn_mask=torch.zeros(8, 8, requires_grad=True)),
    ):
        assert impl.not_supported_reasons(**bad), bad


@interpreted_triton
def test_triton_custom_ops_pass_opcheck():
    _triton_attention()
    q, k, v = torch.randn(1, 2, 19, 16), torch.randn(1, 1, 23, 16), torch.randn(1, 1, 23, 16)
    mask = torch.rand(1, 1, 1, 23) > 0.2
    seed = torch.tensor([3], dtype=torch.int64)
    # The fake-tensor and compile checks trace the op without data, which the interpreter cannot run (docs/testing.md):
    # the GPU section covers torch.compile.
    utils = ("test_schema", "test_autograd_registration")
    forward = torch.ops.metagpt_fast.triton_attention_forward.default
    torch.library.opcheck(forward, (q.requires_grad_(), k, v, mask, 0.1, False, 0.25, seed), test_utils=utils)
    out, lse = forward(q, k, v, mask, 0.1, False, 0.25, seed)
    backward = torch.ops.metagpt_fast.triton_attention_backward.default
    torch.library.opcheck(
        backward, (torch.randn_like(out), q, k, v, out, lse, mask, 0.1, False, 0.25, seed), test_utils=("test_schema",)
    )


@interpreted_triton
def test_triton_public_api_selects_triton():
    q, k, v = (torch.randn(1, 2, 21, 16) for _ in range(3))
    out = metagpt_fast.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
    expected = reference_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert_parity(out, reference_attention(q, k, v, is_causal=True), expected, name="out")
    with pytest.raises(ValueError, match="float64"):
        metagpt_fast.scaled_dot_product_attention(q.double(), k.double(), v.double(), backend="triton")


# ---------------------------------------------------------------------------------------------- triton on a GPU


@pytest.mark.gpu
@requires_cuda
def test_triton_gpu_backward_bitwise_deterministic():
    pytest.importorskip("triton")
    q, k, v = (torch.randn(2, 8, 777, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    grad_out = torch.randn_like(q)
    args = dict(attn_mask=None, dropout_p=0.0, is_causal=True, scale=0.125, enable_gqa=False, seed=None)
    first = _grads(_triton_attention().attention, q, k, v, grad_out, **args)
    second = _grads(_triton_attention().attention, q, k, v, grad_out, **args)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@requires_cuda
def test_triton_gpu_torch_compile_fullgraph_matches_eager():
    pytest.importorskip("triton")
    attention = _triton_attention().attention
    mask = torch.ones(2, 1, 1, 300, dtype=torch.bool, device="cuda")
    mask[0, ..., 250:] = False

    def step(q, k, v):
        out = attention(q, k, v, mask, 0.0, False, 0.125, True, None)
        return out.float().square().sum()

    q = torch.randn(2, 8, 200, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2, 300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    compiled = torch.compile(step, fullgraph=True)
    loss_eager = step(q, k, v)
    grads_eager = torch.autograd.grad(loss_eager, (q, k, v))
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    torch.testing.assert_close(loss, loss_eager)
    for g, ge in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(g, ge)


@pytest.mark.gpu
@requires_cuda
def test_triton_gpu_public_api_and_opcheck():
    pytest.importorskip("triton")
    _triton_attention()
    q, k, v = (torch.randn(1, 2, 130, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    out = metagpt_fast.scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
    expected = reference_attention(q.float(), k.float(), v.float(), is_causal=True)
    assert_parity(out, reference_attention(q, k, v, is_causal=True), expected, name="out")
    forward = torch.ops.metagpt_fast.triton_attention_forward.default
    torch.library.opcheck(forward, (q.requires_grad_(), k, v, None, 0.0, True, 0.125, None))


# ------------------------------------------------------------------------------------- compiled extension: cpu

CPU_SEED = 1234567890123


@pytest.fixture(scope="module")
def compiled_attention():
    if _extension.find_cxx() is None:
        pytest.skip("no C++ compiler: the extension cannot exist")
    assert _extension.load() is not None, f"extension failed to load: {_extension.unavailable_reason()}"
    from metagpt_fast.backends.compiled import attention

    assert backends.available_backends()["cpu"] is None
    return attention.attention


def test_cpu_attention_lse_and_empty_rows(compiled_attention):
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask[..., 2, :] = False
    out, lse = torch.ops.metagpt_fast.attention_fwd(q, k, v, mask, 0.0, False, 0.5, None)
    scores = (q @ k.transpose(-1, -2)) * 0.5
    expected = torch.logsumexp(scores, dim=-1)
    torch.testing.assert_close(lse[..., [0, 1, 3, 4]], expected[..., [0, 1, 3, 4]], atol=1e-5, rtol=1e-5)
    assert torch.isinf(lse[..., 2]).all() and (lse[..., 2] > 0).all()  # +inf: recomputed weights are exactly 0
    assert (out[..., 2, :] == 0).all()


def test_cpu_attention_public_op_runs_on_cpu_backend(compiled_attention):
    q, k, v = (torch.randn(2, 3, 19, 16) for _ in range(3))
    out = metagpt_fast.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu")
    assert_parity(out, None, reference.attention(q, k, v, is_causal=True), name="out")


def test_cpu_float64_is_refused_with_a_reason(compiled_attention):
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        metagpt_fast.scaled_dot_product_attention(q, q, q, backend="cpu")
    inputs = dict(query=q, key=q, value=q, attn_mask=None, dropout_p=0.0, is_causal=False, scale=1.0, enable_gqa=False)
    assert "float64" in " ".join(backends.explain("attention", **inputs)["cpu"])


def test_cpu_mask_that_requires_grad_falls_back_to_the_reference(compiled_attention):
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    bias = torch.randn(5, 5, requires_grad=True)
    with pytest.raises(ValueError, match="attn_mask requires grad"):
        metagpt_fast.scaled_dot_product_attention(q, k, v, attn_mask=bias, backend="cpu")
    metagpt_fast.scaled_dot_product_attention(q, k, v, attn_mask=bias).sum().backward()  # auto: reference serves
    assert bias.grad is not None and torch.isfinite(bias.grad).all()


def _cpu_opcheck_samples():
    seed = torch.tensor([CPU_SEED], dtype=torch.int64)
    q, k, v = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8)
    mask = torch.rand(1, 1, 1, 11) > 0.2
    out, lse = torch.ops.metagpt_fast.attention_fwd(q, k, v, None, 0.2, True, 0.35, seed)
    return [
        ("attention_fwd", (q, k, v, None, 0.2, True, 0.35, seed), (q, k, v)),
        ("attention_fwd", (q, k, v, mask, 0.0, False, 0.35, None), (q, k, v)),
        ("attention_bwd", (torch.randn_like(out), q, k, v, out, lse, None, 0.2, True, 0.35, seed), ()),
    ]


@pytest.mark.parametrize("index", range(3))
def test_cpu_opcheck(compiled_attention, index):
    name, args, grad = _cpu_opcheck_samples()[index]
    args = list(args)
    for t in grad:
        i = next(i for i, a in enumerate(args) if a is t)
        args[i] = t.clone().requires_grad_(True)
    torch.library.opcheck(getattr(torch.ops.metagpt_fast, name).default, tuple(args))


@pytest.mark.parametrize("positional", ["sinusoidal", "rotary"])
def test_cpu_model_matches_reference(compiled_attention, positional):
    # The whole model (embedding, encoding or rotary, attention) on backend="cpu" against backend="reference".
    torch.manual_seed(0)
    ref_model = metagpt_fast.MetaGPT(61, 48, 2, 4, 0.0, 40, positional=positional, backend="reference")
    fast_model = metagpt_fast.MetaGPT(61, 48, 2, 4, 0.0, 40, positional=positional, backend="cpu")
    fast_model.load_state_dict(ref_model.state_dict())
    idx, targets = torch.randint(0, 61, (3, 29)), torch.randint(0, 61, (3, 29))
    results = []
    for model in (ref_model, fast_model):
        logits, loss = model(idx, targets)
        loss.backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_logits, ref_grads), (logits, grads) = results
    assert_parity(logits, None, ref_logits, name="logits")
    assert ref_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert_parity(grad, None, ref_grads[name], name=f"grad {name}")


# ------------------------------------------------------------------------------------ compiled extension: cuda


def test_cuda_not_supported_reasons_name_the_input():
    impl = backends.lookup("attention", "cuda")
    if impl is None:
        pytest.skip("the compiled extension is not loaded: no cuda implementation registered")

    def reasons(q, k, v, attn_mask):
        inputs = dict(query=q, key=k, value=v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False, scale=0.1)
        return impl.not_supported_reasons(**inputs, enable_gqa=False)

    q = torch.randn(1, 2, 8, 96)
    text = "; ".join(reasons(q, q, q, q.new_zeros(1, 1, 1, 8)))
    for expected in ("takes cuda tensors", "supports float16, bfloat16", "head dims", "additive attn_mask"):
        assert expected in text, text
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    v = torch.randn(1, 2, 8, 32, dtype=torch.float16)
    assert any("head dims" in r for r in reasons(q, q, v, None))


def _cuda_attention_or_skip():
    reason = backends.available_backends()["cuda"]  # loads the compiled ops (their autograd) and this backend
    if reason is not None:
        pytest.skip(f"cuda backend unavailable: {reason}")
    from metagpt_fast.backends.compiled import attention

    if not attention._CUDA_KERNELS:
        pytest.skip("the compiled extension was built without its CUDA attention kernels")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs compute capability >= 8.0")
    return attention


def _make_inputs(b, hq, hk, nq, nk, d, dtype, device, *, transposed=False):
    """q (b, hq, nq, d), k / v (b, hk, nk, d); ``transposed`` gives (B, N, H, D) storage viewed as (B, H, N, D)."""

    def one(h, n):
        if transposed:
            return torch.randn(b, n, h, d, device=device).to(dtype).transpose(1, 2)
        return torch.randn(b, h, n, d, device=device).to(dtype)

    return one(hq, nq), one(hk, nk), one(hk, nk)


def _references(q, k, v, mask, dropout_p, causal, scale, grad_out, keep):
    """(out, dq, dk, dv) of the reference run in q's dtype ("lowp") and one precision up ("oracle")."""
    results = {}
    for name, dtype in (("lowp", q.dtype), ("oracle", oracle_dtype(q.dtype))):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = reference_attention(*leaves, mask, dropout_p, causal, scale, q.shape[1] != k.shape[1], dropout_mask=keep)
        out.backward(grad_out.to(dtype))
        results[name] = (out.detach(), *(x.grad for x in leaves))
    return results


def _check_parity(fast, refs, label):
    """The parity rule for the output and the three gradients; returns their errors."""
    for name, f in zip(NAMES, fast, strict=True):
        assert torch.isfinite(f).all(), f"{label} {name}: non-finite values"
    errors = assert_all_parity(fast, refs["lowp"], refs["oracle"], [f"{label} {n}" for n in NAMES])
    return dict(zip(NAMES, errors, strict=True))


def _cuda_forward_backward(q, k, v, mask, dropout_p, causal, scale, seed, grad_out):
    cuda_attention = _cuda_attention_or_skip()
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]  # keeps the layout (strided cases stay strided)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=q.device) if dropout_p > 0 else None
    out = cuda_attention.attention(*leaves, mask, dropout_p, causal, scale, q.shape[1] != k.shape[1], seed_t)
    out.backward(grad_out)
    return (out.detach(), *(x.grad for x in leaves))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16], ids=["float16", "bfloat16"])
def test_cuda_backward_is_deterministic(dtype):
    q, k, v = _make_inputs(2, 8, 2, 300, 300, 128, dtype, "cuda")
    grad_out = torch.randn_like(q)
    first = _cuda_forward_backward(q, k, v, None, 0.1, True, 0.1, SEED, grad_out)
    for _ in range(3):
        again = _cuda_forward_backward(q, k, v, None, 0.1, True, 0.1, SEED, grad_out)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


@requires_cuda
@pytest.mark.gpu
def test_cuda_public_op_selects_cuda_and_matches_reference():
    _cuda_attention_or_skip()
    q, k, v = _make_inputs(2, 4, 4, 100, 100, 64, BF16, "cuda")
    mask = _mask("key_padding", dict(b=2, hq=4, nq=100, nk=100), "cuda")
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out = metagpt_fast.scaled_dot_product_attention(*leaves, attn_mask=mask, backend="cuda")
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    fast = (out.detach(), *(x.grad for x in leaves))
    _check_parity(fast, _references(q, k, v, mask, 0.0, False, 1 / 8, grad_out, None), "public op")


# ----------------------------------------------------------------- compiled extension: cuda kernels emulated on CPU
#
# The CUDA kernels compiled for the host with the CPU emulation of their warp primitives
# (csrc/attention/attention_emulation.h): the same kernel and launch-template code, fibers in place of CUDA threads.
# This checks the algorithm, the mma fragment bookkeeping, masking, GQA and dropout offsets; it cannot check what only
# hardware shows (timing, real mma rounding, memory ordering).


def _compile_emulation(tmp_dir: Path) -> ctypes.CDLL:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    cuda_home = Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")
    if cxx is None or not (cuda_home / "include" / "cuda_fp16.h").exists():
        pytest.skip("needs a host C++ compiler and the CUDA headers (cuda_fp16.h) to run the emulation")
    library = tmp_dir / "attention_emulation.so"
    subprocess.run(
        [cxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-DMGF_ATTENTION_EMULATION",
         f"-I{ROOT / 'csrc' / 'attention'}", f"-I{ROOT / 'csrc' / 'include'}", f"-I{cuda_home / 'include'}",
         str(ROOT / "csrc" / "attention" / "attention_emulation.cc"), "-o", str(library)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    return ctypes.CDLL(str(library))


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    return _compile_emulation(tmp_path_factory.mktemp("attention_emulation"))


def _int64s(values):
    return (ctypes.c_int64 * len(values))(*values)


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _strides(*tensors):
    return _int64s([s for t in tensors for s in t.stride()[:3]])


def _mask_args(mask, shape):
    if mask is None:
        return None, None, _int64s([0, 0, 0, 0])
    view = mask.expand(shape)
    return view, _ptr(view), _int64s(list(view.stride()))


def _window_args(window, softcap):
    """The emulation's window (left, right, bottom_right; None: unbounded) and softcap arguments."""
    return (None if window is None else (ctypes.c_int * 3)(*window)), ctypes.c_float(softcap)


def emulated_forward(lib, q, k, v, mask, dropout_p, causal, scale, seed, shared_per_sm, *, window=None, softcap=0.0):
    """out (B, Hq, Nq, D) and lse (B, Hq, Nq) of the CUDA forward kernel run by the emulation."""
    b, hq, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    sizes = (ctypes.c_int * 6)(b, hq, hk, nq, nk, d)
    seed_t = torch.tensor([seed], dtype=torch.int64)
    _, mask_ptr, mask_strides = _mask_args(mask, (b, hq, nq, nk))
    out = torch.empty(b, hq, nq, d, dtype=q.dtype)
    lse = torch.empty(b, hq, nq, dtype=torch.float32)
    rc = lib.mgf_emulated_attention_forward(
        int(q.dtype == torch.bfloat16), _ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(lse), mask_ptr,
        _strides(q, k, v, out), mask_strides, sizes, ctypes.c_float(scale), int(causal), ctypes.c_double(dropout_p),
        _ptr(seed_t), shared_per_sm, *_window_args(window, softcap),
    )  # fmt: skip
    assert rc == 0
    return out, lse


def emulated_forward_backward(lib, q, k, v, mask, dropout_p, causal, scale, seed, grad_out, shared_per_sm, *,
                              window=None, softcap=0.0):  # fmt: skip
    b, hq, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    sizes = (ctypes.c_int * 6)(b, hq, hk, nq, nk, d)
    bf16 = int(q.dtype == torch.bfloat16)
    seed_t = torch.tensor([seed], dtype=torch.int64)
    _, mask_ptr, mask_strides = _mask_args(mask, (b, hq, nq, nk))
    out, lse = emulated_forward(lib, q, k, v, mask, dropout_p, causal, scale, seed, shared_per_sm, window=window,
                                softcap=softcap)  # fmt: skip
    dq = torch.empty_like(out)
    dk, dv = torch.empty(b, hk, nk, d, dtype=q.dtype), torch.empty(b, hk, nk, d, dtype=q.dtype)
    delta = torch.empty_like(lse)
    rc = lib.mgf_emulated_attention_backward(
        bf16, _ptr(grad_out), _ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(lse), mask_ptr, _ptr(dq), _ptr(dk), _ptr(dv),
        _ptr(delta), _strides(q, k, v, out, grad_out, dq, dk, dv), mask_strides, sizes, ctypes.c_float(scale),
        int(causal), ctypes.c_double(dropout_p), _ptr(seed_t), shared_per_sm, *_window_args(window, softcap),
    )  # fmt: skip
    assert rc == 0
    return out, dq, dk, dv, lse


# Shared memory per SM: 228 KB (sm_90) selects the wide forward tile; 100 KB (sm_86/89) the narrow one, which
# differs only at D = 128.
SM90, SM86 = 233472, 102400
EMULATED = [(c, SM90) for c in CASES] + [(c, SM86) for c in CASES if CASES[c][5] == 128]
EMULATED_IDS = [f"{c}-{'sm90' if s == SM90 else 'sm86'}-tiles" for c, s in EMULATED]


@pytest.mark.slow  # builds the emulation with g++, then runs each CUDA thread as a fiber
@pytest.mark.parametrize("case,shared_per_sm", EMULATED, ids=EMULATED_IDS)
def test_cuda_emulated_kernels_match_reference(emulation, case, shared_per_sm):
    b, hq, hk, nq, nk, d, dtype, causal, mask_kind, dropout_p, transposed = CASES[case]
    q, k, v = _make_inputs(b, hq, hk, nq, nk, d, dtype, "cpu", transposed=transposed)
    mask = _mask(mask_kind, dict(b=b, hq=hq, nq=nq, nk=nk), "cpu")
    scale = 1.0 / math.sqrt(d)
    grad_out = torch.randn(b, hq, nq, d).to(dtype)
    keep = dropout_keep_mask(SEED, (b, hq, nq, nk), dropout_p) if dropout_p > 0 else None
    *fast, lse = emulated_forward_backward(emulation, q, k, v, mask, dropout_p, causal, scale, SEED, grad_out,
                                           shared_per_sm)  # fmt: skip
    _check_parity(fast, _references(q, k, v, mask, dropout_p, causal, scale, grad_out, keep), case)
    if mask_kind == "key_padding":  # batch 0 sees no key: output 0, lse +inf, zero gradients
        assert torch.equal(fast[0][0], torch.zeros_like(fast[0][0])) and torch.isinf(lse[0]).all()
        assert not fast[1][0].any() and not fast[2][0].any() and not fast[3][0].any()


# Windows (flash-attn's local attention, bottom-right aligned) and softcap of the forward kernel against the flash
# reference (metagpt_fast.ops.reference.flash): (b, h, hk, nq, nk, d, dtype, (left, right, bottom_right), softcap).
# Nq > Nk with a bottom-right window leaves the first rows without a key (out 0, lse +inf), and Nq >> Nk whole CTAs
# without a key tile to visit.
WINDOW_CASES = {
    "d64-fp16-window(16,0)-nq<nk": (1, 2, 2, 70, 90, 64, F16, (16, 0, 1), 0.0),
    "d128-bf16-window(8,8)-nq>nk-gqa": (1, 4, 2, 90, 70, 128, BF16, (8, 8, 1), 0.0),
    "d64-bf16-causal-bottom-right": (2, 2, 2, 33, 150, 64, BF16, (-1, 0, 1), 0.0),
    "d64-fp16-causal-bottom-right-nq>>nk": (1, 1, 1, 300, 40, 64, F16, (-1, 0, 1), 0.0),  # CTAs with no key tile
    "d128-fp16-softcap": (1, 2, 2, 50, 50, 128, F16, (-1, -1, 1), 1.5),
    "d64-fp16-window(5,0)-softcap": (1, 2, 1, 45, 45, 64, F16, (5, 0, 1), 2.0),
}


def _flash_reference(q, k, v, scale, window, softcap):
    """out (B, H, Nq, D) and lse (B, H, Nq) of the flash reference on dense (B, H, N, D) inputs."""
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    cu_q = torch.arange(b + 1, dtype=torch.int32) * nq
    cu_k = torch.arange(b + 1, dtype=torch.int32) * nk
    packed = [x.transpose(1, 2).reshape(-1, x.shape[1], d) for x in (q, k, v)]  # (B * N, H, D)
    out, lse = reference.flash.flash_attention(*packed, cu_q, cu_k, scale, window[0], window[1], softcap)
    return out.reshape(b, nq, hq, d).transpose(1, 2), lse.reshape(hq, b, nq).transpose(0, 1)


@pytest.mark.slow  # the emulation (see above)
@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_cuda_emulated_forward_windows_and_softcap(emulation, case):
    b, hq, hk, nq, nk, d, dtype, window, softcap = WINDOW_CASES[case]
    q, k, v = _make_inputs(b, hq, hk, nq, nk, d, dtype, "cpu")
    scale = 1.0 / math.sqrt(d)
    out, lse = emulated_forward(emulation, q, k, v, None, 0.0, False, scale, SEED, SM90, window=window, softcap=softcap)
    ref_out, ref_lse = _flash_reference(q, k, v, scale, window, softcap)
    oracle_out, oracle_lse = _flash_reference(q.double(), k.double(), v.double(), scale, window, softcap)
    assert_parity(out, ref_out, oracle_out, name=f"{case} out")
    empty = torch.isinf(oracle_lse)
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] > 0).all()
    assert not out[empty].any()
    if window[2] and nq > nk:
        assert empty.any()  # the case exercises rows without a key
    assert_parity(lse[~empty], ref_lse[~empty], oracle_lse[~empty], name=f"{case} lse")


@pytest.mark.slow  # the emulation (see above)
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_emulated_forward_skips_key_tiles_outside_the_window(emulation, d):
    """A window of w visits O(w) key tiles per query tile: keys no query can see are poisoned with NaN, which would
    reach the output through 0 * NaN in P V (and through the scores' maximum) if their tile were loaded."""
    nq, nk, window = 64, 320, (16, 0, 1)  # bottom-right: queries see keys [i + 240, i + 256]
    q, k, v = _make_inputs(1, 2, 2, nq, nk, d, F16, "cpu")
    scale = 1.0 / math.sqrt(d)
    ref_out, ref_lse = _flash_reference(q, k, v, scale, window, 0.0)
    oracle_out, _ = _flash_reference(q.double(), k.double(), v.double(), scale, window, 0.0)
    k[:, :, :192], v[:, :, :192] = float("nan"), float("nan")
    out, lse = emulated_forward(emulation, q, k, v, None, 0.0, False, scale, SEED, SM90, window=window)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_parity(out, ref_out, oracle_out, name=f"d{d} out")
