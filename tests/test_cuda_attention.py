"""CUDA C++ attention (csrc/attention/) against the reference: outputs and every gradient, by the parity rule.

Two ways to run the same kernels:

- on a GPU (the GPU suite): through ``torch.ops.metagpt_fast.attention_fwd`` and its autograd, over causal and
  non-causal, key-padding and dense boolean masks, GQA, dropout replayed with ``dropout_keep_mask``, odd lengths,
  both head dims and both dtypes, non-contiguous inputs, and bitwise determinism of the backward pass;
- without a GPU: the kernels compiled for the host with the CPU emulation of their warp primitives
  (csrc/attention/attention_emulation.h): the same kernel and launch-template code, fibers in place of CUDA threads.
  This checks the algorithm, the mma fragment bookkeeping, masking, GQA and dropout offsets; it cannot check what
  only hardware shows (timing, real mma rounding, memory ordering).
"""

import ctypes
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import requires_cuda

from metagpt_fast.ops.reference.attention import attention as reference_attention
from metagpt_fast.ops.reference.random import dropout_keep_mask
from metagpt_fast.testing import assert_all_parity, oracle_dtype

ROOT = Path(__file__).resolve().parents[1]
SEED = 20240611


# ----------------------------------------------------------------------------------------------------- helpers


def make_inputs(b, hq, hk, nq, nk, d, dtype, device, *, transposed=False):
    """q (b, hq, nq, d), k / v (b, hk, nk, d); ``transposed`` gives (B, N, H, D) storage viewed as (B, H, N, D)."""
    def one(h, n):
        if transposed:
            return torch.randn(b, n, h, d, device=device).to(dtype).transpose(1, 2)
        return torch.randn(b, h, n, d, device=device).to(dtype)

    return one(hq, nq), one(hk, nk), one(hk, nk)


def make_mask(kind, b, hq, nq, nk, device):
    if kind is None:
        return None
    if kind == "key_padding":  # (B, 1, 1, Nk); batch 0 has no visible key at all
        mask = torch.rand(b, 1, 1, nk, device=device) > 0.3
        mask[0] = False
        return mask
    if kind == "key_padding_shared":  # (1, 1, 1, Nk)
        return torch.rand(1, 1, 1, nk, device=device) > 0.3
    if kind == "dense":  # (B, 1, Nq, Nk), a few rows fully masked
        mask = torch.rand(b, 1, nq, nk, device=device) > 0.5
        mask[:, :, ::7] = False
        return mask
    raise ValueError(kind)


def references(q, k, v, mask, dropout_p, causal, scale, grad_out, keep):
    """(out, dq, dk, dv) of the reference run in q's dtype ("lowp") and one precision up ("oracle")."""
    results = {}
    for name, dtype in (("lowp", q.dtype), ("oracle", oracle_dtype(q.dtype))):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = reference_attention(
            *leaves, mask, dropout_p, causal, scale, q.shape[1] != k.shape[1], dropout_mask=keep
        )
        out.backward(grad_out.to(dtype))
        results[name] = (out.detach(), *(x.grad for x in leaves))
    return results


def check_parity(fast, refs, label):
    """The parity rule (metagpt_fast.testing) for the output and the three gradients; returns their errors."""
    names = ("out", "dq", "dk", "dv")
    for name, f in zip(names, fast, strict=True):
        assert torch.isfinite(f).all(), f"{label} {name}: non-finite values"
    errors = assert_all_parity(fast, refs["lowp"], refs["oracle"], [f"{label} {n}" for n in names])
    return dict(zip(names, errors, strict=True))


# Cases shared by both runs: (b, hq, hk, nq, nk, d, dtype, causal, mask, dropout_p, transposed).
CASES = {
    "d64-fp16": (1, 2, 2, 40, 40, 64, torch.float16, False, None, 0.0, False),
    "d128-fp16-causal": (1, 2, 2, 77, 77, 128, torch.float16, True, None, 0.0, False),
    "d64-bf16-causal-nq>nk": (1, 2, 2, 150, 33, 64, torch.bfloat16, True, None, 0.0, False),
    "d64-fp16-causal-nq<nk": (1, 2, 2, 33, 150, 64, torch.float16, True, None, 0.0, False),
    "d64-fp16-key-padding": (2, 2, 2, 17, 70, 64, torch.float16, False, "key_padding", 0.0, False),
    "d128-bf16-dense-mask": (2, 2, 2, 40, 50, 128, torch.bfloat16, False, "dense", 0.0, False),
    "d128-bf16-gqa-dropout": (1, 4, 2, 70, 90, 128, torch.bfloat16, False, None, 0.3, False),
    "d64-fp16-gqa-causal-dropout": (1, 6, 2, 65, 65, 64, torch.float16, True, None, 0.2, False),
    "d64-fp16-strided": (2, 2, 2, 50, 50, 64, torch.float16, False, None, 0.0, True),
    "d64-bf16-n1": (1, 1, 1, 1, 1, 64, torch.bfloat16, False, None, 0.0, False),
}


# ------------------------------------------------------------------------------------------- CPU emulation


def _compile_emulation(tmp_dir: Path) -> ctypes.CDLL:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    cuda_home = Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")
    if cxx is None or not (cuda_home / "include" / "cuda_fp16.h").exists():
        pytest.skip("needs a host C++ compiler and the CUDA headers (cuda_fp16.h) to run the emulation")
    library = tmp_dir / "attention_emulation.so"
    subprocess.run(
        [cxx, "-std=c++17", "-O2", "-shared", "-fPIC", "-DMGF_ATTENTION_EMULATION",
         f"-I{ROOT / 'csrc' / 'attention'}", f"-I{ROOT / 'csrc' / 'include'}", f"-I{cuda_home / 'include'}",
         str(ROOT / "csrc" / "attention" / "attention_emulation.cc"), "-o", str(library)],
        check=True, capture_output=True, timeout=600,
    )
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


def emulated_forward_backward(lib, q, k, v, mask, dropout_p, causal, scale, seed, grad_out, shared_per_sm):
    b, hq, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    sizes = (ctypes.c_int * 6)(b, hq, hk, nq, nk, d)
    bf16 = int(q.dtype == torch.bfloat16)
    seed_t = torch.tensor([seed], dtype=torch.int64)
    view, mask_ptr, mask_strides = _mask_args(mask, (b, hq, nq, nk))
    out = torch.empty(b, hq, nq, d, dtype=q.dtype)
    lse = torch.empty(b, hq, nq, dtype=torch.float32)
    rc = lib.mgf_emulated_attention_forward(
        bf16, _ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(lse), mask_ptr, _strides(q, k, v, out), mask_strides, sizes,
        ctypes.c_float(scale), int(causal), ctypes.c_double(dropout_p), _ptr(seed_t), shared_per_sm,
    )
    assert rc == 0
    dq = torch.empty_like(out)
    dk, dv = torch.empty(b, hk, nk, d, dtype=q.dtype), torch.empty(b, hk, nk, d, dtype=q.dtype)
    delta = torch.empty_like(lse)
    rc = lib.mgf_emulated_attention_backward(
        bf16, _ptr(grad_out), _ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(lse), mask_ptr, _ptr(dq), _ptr(dk), _ptr(dv),
        _ptr(delta), _strides(q, k, v, out, grad_out, dq, dk, dv), mask_strides, sizes, ctypes.c_float(scale),
        int(causal), ctypes.c_double(dropout_p), _ptr(seed_t), shared_per_sm,
    )
    assert rc == 0
    return out, dq, dk, dv, lse


# Shared memory per SM: 228 KB (sm_90) selects the wide forward tile; 100 KB (sm_86/89) the narrow one, which
# differs only at D = 128.
SM90, SM86 = 233472, 102400
EMULATED = [(c, SM90) for c in CASES] + [(c, SM86) for c in CASES if CASES[c][5] == 128]
EMULATED_IDS = [f"{c}-{'sm90' if s == SM90 else 'sm86'}-tiles" for c, s in EMULATED]


@pytest.mark.slow  # builds the emulation with g++, then runs each CUDA thread as a fiber
@pytest.mark.parametrize("case,shared_per_sm", EMULATED, ids=EMULATED_IDS)
def test_emulated_kernels_match_reference(emulation, case, shared_per_sm):
    b, hq, hk, nq, nk, d, dtype, causal, mask_kind, dropout_p, transposed = CASES[case]
    q, k, v = make_inputs(b, hq, hk, nq, nk, d, dtype, "cpu", transposed=transposed)
    mask = make_mask(mask_kind, b, hq, nq, nk, "cpu")
    scale = 1.0 / math.sqrt(d)
    grad_out = torch.randn(b, hq, nq, d).to(dtype)
    keep = dropout_keep_mask(SEED, (b, hq, nq, nk), dropout_p) if dropout_p > 0 else None
    *fast, lse = emulated_forward_backward(emulation, q, k, v, mask, dropout_p, causal, scale, SEED, grad_out,
                                           shared_per_sm)
    check_parity(fast, references(q, k, v, mask, dropout_p, causal, scale, grad_out, keep), case)
    if mask_kind == "key_padding":  # batch 0 sees no key: output 0, lse +inf, zero gradients
        assert torch.equal(fast[0][0], torch.zeros_like(fast[0][0])) and torch.isinf(lse[0]).all()
        assert not fast[1][0].any() and not fast[2][0].any() and not fast[3][0].any()


# --------------------------------------------------------------------------------------------------- registry


def _cuda_reasons(q, k, v, attn_mask):
    from metagpt_fast import backends

    impl = backends.lookup("attention", "cuda")
    if impl is None:
        pytest.skip("the compiled extension is not loaded: no cuda implementation registered")
    inputs = dict(query=q, key=k, value=v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False, scale=0.1)
    return impl.not_supported_reasons(**inputs, enable_gqa=False)


def test_not_supported_reasons_name_the_input():
    q = torch.randn(1, 2, 8, 96)
    text = "; ".join(_cuda_reasons(q, q, q, q.new_zeros(1, 1, 1, 8)))
    for expected in ("takes cuda tensors", "supports float16, bfloat16", "head dims", "additive attn_mask"):
        assert expected in text, text
    q = torch.randn(1, 2, 8, 64, dtype=torch.float16)
    v = torch.randn(1, 2, 8, 32, dtype=torch.float16)
    assert any("head dims" in r for r in _cuda_reasons(q, q, v, None))


# ------------------------------------------------------------------------------------------------------- GPU


def _cuda_ops_or_skip():
    from metagpt_fast import backends

    reason = backends.available_backends()["cuda"]  # loads the compiled ops (their autograd) and this backend
    if reason is not None:
        pytest.skip(f"cuda backend unavailable: {reason}")
    from metagpt_fast.backends.compiled import attention

    if not attention._CUDA_KERNELS:
        pytest.skip("the compiled extension was built without its CUDA attention kernels")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs compute capability >= 8.0")
    return attention


def cuda_forward_backward(q, k, v, mask, dropout_p, causal, scale, seed, grad_out):
    cuda_attention = _cuda_ops_or_skip()
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]  # keeps the layout (strided cases stay strided)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=q.device) if dropout_p > 0 else None
    out = cuda_attention.attention(*leaves, mask, dropout_p, causal, scale, q.shape[1] != k.shape[1], seed_t)
    out.backward(grad_out)
    return (out.detach(), *(x.grad for x in leaves))


GPU_CASES = dict(CASES)
for _dtype in (torch.float16, torch.bfloat16):
    for _d in (64, 128):
        for _causal in (False, True):
            _name = f"grid-{str(_dtype)[6:]}-d{_d}-{'causal' if _causal else 'full'}"
            GPU_CASES[_name] = (2, 4, 4, 200, 200, _d, _dtype, _causal, None, 0.0, False)
GPU_CASES.update({
    "d64-fp16-n17": (3, 2, 2, 17, 17, 64, torch.float16, True, None, 0.0, False),
    "d128-bf16-shared-key-padding": (2, 4, 2, 77, 130, 128, torch.bfloat16, False, "key_padding_shared", 0.0, False),
    "d128-fp16-key-padding-dropout": (2, 2, 2, 90, 90, 128, torch.float16, False, "key_padding", 0.1, False),
    "d128-bf16-long-causal-gqa": (1, 8, 2, 1031, 1031, 128, torch.bfloat16, True, None, 0.0, True),
})


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_cuda_kernels_match_reference(case):
    b, hq, hk, nq, nk, d, dtype, causal, mask_kind, dropout_p, transposed = GPU_CASES[case]
    q, k, v = make_inputs(b, hq, hk, nq, nk, d, dtype, "cuda", transposed=transposed)
    mask = make_mask(mask_kind, b, hq, nq, nk, "cuda")
    scale = 1.0 / math.sqrt(d)
    grad_out = torch.randn(b, hq, nq, d, device="cuda").to(dtype)
    keep = dropout_keep_mask(SEED, (b, hq, nq, nk), dropout_p, device="cuda") if dropout_p > 0 else None
    fast = cuda_forward_backward(q, k, v, mask, dropout_p, causal, scale, SEED, grad_out)
    errors = check_parity(fast, references(q, k, v, mask, dropout_p, causal, scale, grad_out, keep), case)
    print(f"{case}: " + ", ".join(f"{n} {e:.2e}" for n, e in errors.items()))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_backward_is_deterministic(dtype):
    q, k, v = make_inputs(2, 8, 2, 300, 300, 128, dtype, "cuda")
    grad_out = torch.randn_like(q)
    first = cuda_forward_backward(q, k, v, None, 0.1, True, 0.1, SEED, grad_out)
    for _ in range(3):
        again = cuda_forward_backward(q, k, v, None, 0.1, True, 0.1, SEED, grad_out)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@requires_cuda
@pytest.mark.gpu
def test_public_op_selects_cuda_and_matches_reference():
    from metagpt_fast.ops.attention import scaled_dot_product_attention

    _cuda_ops_or_skip()
    q, k, v = make_inputs(2, 4, 4, 100, 100, 64, torch.bfloat16, "cuda")
    mask = make_mask("key_padding", 2, 4, 100, 100, "cuda")
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out = scaled_dot_product_attention(*leaves, attn_mask=mask, backend="cuda")
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    fast = (out.detach(), *(x.grad for x in leaves))
    check_parity(fast, references(q, k, v, mask, 0.0, False, 1 / 8, grad_out, None), "public op")
