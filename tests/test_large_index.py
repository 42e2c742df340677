"""64-bit index math: kernels must compute element offsets in int64 where B·H·N·D or vocab·d exceed 2**31.

Without a GPU, a tensor whose offsets pass 2**31 costs no memory: ``torch.empty`` of a few GiB only reserves address
space, and views into it (``as_strided`` with a stride just over 2**30 or 2**29) touch only the pages of the few
elements they hold. Each test builds such views, so that ``index * stride`` exceeds 2**31 - 1 for the last batch /
head / row / token, and checks every backend (and the reference) against the reference run on small contiguous
copies, outputs and gradients. The views start 2**31 elements into the storage: an offset that wrapped around in
int32 (to about -2**31) then reads mapped zeros and fails the comparison instead of crashing the process.

GPU-only tests (skipped here) allocate dense tensors past 2**31 elements and dropout offsets past 2**32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import AVAILABLE_BACKENDS, backend_params, device_for, requires_cuda

import metagpt_fast
from metagpt_fast import backends
from metagpt_fast.ops import reference
from metagpt_fast.ops.reference.random import dropout_threshold, new_seed, philox_word
from metagpt_fast.testing import assert_parity

INT32_MAX = 2**31 - 1
PAD = 2**31  # elements before every view: room for an offset that wrapped to about -2**31
BIG = 2**30 + 64  # stride for an index that reaches 2: 2 * BIG > 2**31 (multiple of 8: aligned rows)
DTYPE = torch.float16  # 2 bytes: the storage reserves 8 GiB of address space, no memory


class Storage:
    """A lazily committed buffer of ``PAD + span`` elements; ``view`` places strided views past the pad."""

    def __init__(self, span: int, device: str, dtype=DTYPE):
        self.base = torch.empty(PAD + span, dtype=dtype, device=device)
        self.gen = torch.Generator().manual_seed(0)

    def view(self, shape, strides, offset: int = 0, fill: bool = True) -> torch.Tensor:
        t = self.base.as_strided(shape, strides, PAD + offset)
        last = offset + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
        assert last > INT32_MAX, f"view {shape} {strides} never passes 2**31 ({last})"
        if fill:
            if t.dtype == torch.bool:
                t.copy_(torch.rand(shape, generator=self.gen) < 0.7)
            else:
                t.copy_(torch.randn(shape, generator=self.gen).to(t.dtype))
        return t


def strides_for(shape, big_dim: int) -> tuple[int, ...]:
    """Contiguous strides for ``shape`` except dim ``big_dim``, whose stride is BIG."""
    strides, step = [0] * len(shape), 1
    for i in reversed(range(len(shape))):
        strides[i] = BIG if i == big_dim else step
        step = step * shape[i] if i != big_dim else step
    return tuple(strides)


def run(fn, backend, *args, **kwargs):
    """``fn(..., backend=backend)``; skips when the backend declares these inputs unsupported (auto falls back)."""
    try:
        return fn(*args, backend=backend, **kwargs)
    except ValueError as exc:
        if f"backend {backend!r} cannot run" not in str(exc):
            raise
        pytest.skip(str(exc))


def grads_of(out, leaves, grad_out):
    return torch.autograd.grad(out, leaves, grad_out)


def compare(name, fast, lo, hi):
    assert_parity(fast, lo, hi, name=name)


# ------------------------------------------------------------------------------------------------------- attention

ATTENTION_CASES = {  # which dim of (B, H, N, D) gets the huge stride, and the shapes
    "batch": ((3, 2, 5, 16), 0),
    "heads": ((1, 3, 5, 16), 1),
    "rows": ((1, 2, 3, 16), 2),
}


@pytest.mark.parametrize("backend", backend_params("attention"))
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("masking", ["causal", "key_padding", "gqa"])
def test_attention_offsets_past_2_31(backend, case, masking):
    device = device_for(backend)
    shape, big_dim = ATTENTION_CASES[case]
    kv_shape = shape
    if masking == "gqa":
        kv_shape = (shape[0], 1, *shape[2:]) if big_dim != 1 else shape
    storage = Storage(2 * BIG + 4096, device)
    # q, k and v share the storage, side by side inside each (b, h, n) block.
    q = storage.view(shape, strides_for(shape, big_dim), 0)
    k = storage.view(kv_shape, strides_for(kv_shape, big_dim), 1024)
    v = storage.view(kv_shape, strides_for(kv_shape, big_dim), 2048)
    kwargs = dict(is_causal=True) if masking == "causal" else {}
    if masking == "gqa":
        kwargs["enable_gqa"] = kv_shape[1] != shape[1]
        if not kwargs["enable_gqa"]:
            kwargs["is_causal"] = True
    if masking == "key_padding":
        if shape[0] == 3:  # the mask's batch stride passes 2**31 too
            mask = Storage(2 * BIG + 64, device, dtype=torch.bool).view((3, 1, 1, shape[2]), (BIG, 0, 0, 1))
        else:
            mask = (torch.rand(shape[0], 1, 1, shape[2], generator=torch.Generator().manual_seed(3)) < 0.7).to(device)
        mask[..., 0] = True
        kwargs["attn_mask"] = mask
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = run(metagpt_fast.scaled_dot_product_attention, backend, *leaves, **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DTYPE).to(device)
    fast = [out, *grads_of(out, leaves, grad_out)]
    refs = []
    for dtype in (DTYPE, torch.float32):
        small = [t.detach().contiguous().to(dtype).requires_grad_() for t in (q, k, v)]
        ref_kwargs = {k_: (v_.contiguous() if isinstance(v_, torch.Tensor) else v_) for k_, v_ in kwargs.items()}
        ref = reference.attention(*small, **ref_kwargs)
        refs.append([ref, *grads_of(ref, small, grad_out.to(dtype))])
    for name, f, lo, hi in zip(("output", "dq", "dk", "dv"), fast, *refs, strict=True):
        compare(f"attention {name}", f, lo, hi)


# ------------------------------------------------------------------------------------------------ positional ops


@pytest.mark.parametrize("backend", backend_params("add_positional_encoding"))
@pytest.mark.parametrize("big_dim", [0, 1], ids=["batch", "rows"])
def test_add_positional_encoding_offsets_past_2_31(backend, big_dim):
    device = device_for(backend)
    shape = (3, 5, 16) if big_dim == 0 else (2, 3, 16)
    x = Storage(2 * BIG + 4096, device).view(shape, strides_for(shape, big_dim))
    leaf = x.detach().requires_grad_()
    out = run(metagpt_fast.add_positional_encoding, backend, leaf, offset=7)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DTYPE).to(device)
    (dx,) = grads_of(out, (leaf,), grad_out)
    refs = []
    for dtype in (DTYPE, torch.float32):
        small = x.detach().contiguous().to(dtype).requires_grad_()
        ref = reference.add_positional_encoding(small, offset=7)
        refs.append((ref, *grads_of(ref, (small,), grad_out.to(dtype))))
    compare("add_positional_encoding output", out, refs[0][0], refs[1][0])
    compare("add_positional_encoding dx", dx, refs[0][1], refs[1][1])


@pytest.mark.parametrize("backend", backend_params("embed_positions"))
@pytest.mark.parametrize("token_dtype", [torch.int64, torch.int32])
def test_embedding_rows_past_2_31(backend, token_dtype):
    """A (6, 16) table whose rows are 2**29 + 64 elements apart: token 4 starts past 2**31."""
    device = device_for(backend)
    row_stride = 2**29 + 64
    weight = Storage(5 * row_stride + 64, device).view((6, 16), (row_stride, 1))
    tokens = torch.tensor([[4, 5, 0, 5], [1, 4, 4, 2]], dtype=token_dtype, device=device)
    leaf = weight.detach().requires_grad_()
    out = run(metagpt_fast.embed_positions, backend, tokens, leaf, 4.0, 3)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DTYPE).to(device)
    (dw,) = grads_of(out, (leaf,), grad_out)
    refs = []
    for dtype in (DTYPE, torch.float32):
        small = weight.detach().contiguous().to(dtype).requires_grad_()
        ref = reference.embed_positions(tokens, small, 4.0, 3)
        refs.append((ref, *grads_of(ref, (small,), grad_out.to(dtype))))
    compare("embed_positions output", out, refs[0][0], refs[1][0])
    compare("embed_positions dweight", dw, refs[0][1], refs[1][1])


@pytest.mark.parametrize("backend", backend_params("embed_positions"))
def test_contiguous_vocab_times_width_past_2_31(backend):
    """A contiguous (2**27 + 8, 16) table: vocab·d > 2**31 and int32 token ids near the top (forward only: the dense
    weight gradient would commit 4 GiB)."""
    device = device_for(backend)
    vocab, d = 2**27 + 8, 16
    weight = Storage(vocab * d, device).view((vocab, d), (d, 1), fill=False)
    tokens = torch.tensor([[vocab - 1, 3, vocab - 5], [vocab - 2, vocab - 1, 0]], dtype=torch.int32, device=device)
    rows = tokens.flatten().long().unique()
    weight[rows] = torch.randn(len(rows), d, generator=torch.Generator().manual_seed(2)).to(DTYPE).to(device)
    out = run(metagpt_fast.embed_positions, backend, tokens, weight, 1.0, 0)
    # The reference sees a small table holding the same rows, with remapped ids.
    remap = torch.searchsorted(rows, tokens.long())
    small = weight[rows]
    lo = reference.embed_positions(remap, small, 1.0, 0)
    hi = reference.embed_positions(remap, small.float(), 1.0, 0)
    compare("embed_positions output", out, lo, hi)


# ---------------------------------------------------------------------------------------------------------- rotary


@pytest.mark.parametrize("backend", backend_params("rotary"))
@pytest.mark.parametrize("big_dim", [0, 1, 2], ids=["batch", "heads", "rows"])
@pytest.mark.parametrize("inplace", [False, True])
def test_rotary_offsets_past_2_31(backend, big_dim, inplace):
    device = device_for(backend)
    shape = [(3, 2, 5, 16), (1, 3, 5, 16), (1, 2, 3, 16)][big_dim]
    storage = Storage(2 * BIG + 4096, device)
    q = storage.view(shape, strides_for(shape, big_dim), 0)
    k = storage.view(shape, strides_for(shape, big_dim), 1024)
    saved = q.detach().contiguous(), k.detach().contiguous()
    kwargs = dict(offset=11, rotary_dim=12, interleaved=big_dim == 1)
    refs = []
    for dtype in (DTYPE, torch.float32):
        small = [t.to(dtype).requires_grad_() for t in saved]
        ref = reference.apply_rotary(*small, **kwargs)
        refs.append((ref, small))
    if inplace:
        with torch.no_grad():
            out = run(metagpt_fast.apply_rotary, backend, q, k, inplace=True, **kwargs)
        for name, f, view, lo, hi in zip("qk", out, (q, k), refs[0][0], refs[1][0], strict=True):
            compare(f"rotary {name} (in place)", view, lo, hi)
            assert torch.equal(f, view)
        return
    leaves = [t.detach().requires_grad_() for t in (q, k)]
    out = run(metagpt_fast.apply_rotary, backend, *leaves, **kwargs)
    gen = torch.Generator().manual_seed(1)
    grad_outs = [torch.randn(t.shape, generator=gen).to(DTYPE).to(device) for t in out]
    fast_grads = grads_of(out, leaves, grad_outs)
    ref_grads = [grads_of(ref, small, [g.to(small[0].dtype) for g in grad_outs]) for ref, small in refs]
    for i, name in enumerate("qk"):
        compare(f"rotary {name}", out[i], refs[0][0][i], refs[1][0][i])
        compare(f"rotary d{name}", fast_grads[i], ref_grads[0][i], ref_grads[1][i])


# ---------------------------------------------------------------------------------------- dense tensors on a GPU


def _gpu_backends(op: str) -> list[str]:
    return [impl.backend for impl in backends.implementations(op) if "cuda" in impl.devices]


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends("attention") or ["none"])
def test_gpu_attention_past_2_31_elements_and_dropout_offsets_past_2_32(backend):
    """(2**14, 64, 72, 32) fp16 tensors: 2.4e9 elements each, 5.4e9 dropout offsets; the last (b, h) is checked."""
    if backend == "none":
        pytest.skip("no GPU backend implements attention")
    b, h, n, d, p = 2**14, 64, 72, 32, 0.25
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16).requires_grad_() for _ in range(3))
    torch.manual_seed(5)
    seed = int(new_seed("cuda").item())
    torch.manual_seed(5)
    out = metagpt_fast.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, backend=backend)
    grad_out = torch.zeros_like(out)
    grad_out[-1, -1] = torch.randn(n, d, device="cuda", dtype=torch.float16)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    first = ((b - 1) * h + (h - 1)) * n * n  # Philox offset of the last (b, h) block: past 2**32
    assert first > 2**32
    offsets = np.arange(first, first + n * n, dtype=np.uint64)
    keep = (philox_word(seed, offsets) >> np.uint64(8)) >= np.uint64(dropout_threshold(p))
    keep = torch.from_numpy(keep.reshape(1, 1, n, n)).cuda()
    fast = [out[-1:, -1:], dq[-1:, -1:], dk[-1:, -1:], dv[-1:, -1:]]
    refs = []
    for dtype in (torch.float16, torch.float32):
        small = [t.detach()[-1:, -1:].to(dtype).requires_grad_() for t in (q, k, v)]
        ref = reference.attention(*small, dropout_p=p, is_causal=True, dropout_mask=keep)
        refs.append([ref, *grads_of(ref, small, grad_out[-1:, -1:].to(dtype))])
    for name, f, lo, hi in zip(("output", "dq", "dk", "dv"), fast, *refs, strict=True):
        compare(f"attention {name} (last block)", f, lo, hi)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", _gpu_backends("embed_positions") or ["none"])
def test_gpu_embedding_vocab_times_width_past_2_31(backend):
    """A dense (2**21 + 3, 1024) fp16 table (2.1e9 elements) with its gradient; rows near the top are checked."""
    if backend == "none":
        pytest.skip("no GPU backend implements embed_positions")
    vocab, d = 2**21 + 3, 1024
    weight = torch.randn(vocab, d, device="cuda", dtype=torch.float16).requires_grad_()
    tokens = torch.tensor([[vocab - 1, 5, vocab - 2], [vocab - 1, vocab - 3, 0]], device="cuda")
    out = metagpt_fast.embed_positions(tokens, weight, 2.0, 0, backend=backend)
    grad_out = torch.randn(out.shape, device="cuda", dtype=torch.float16)
    (dw,) = torch.autograd.grad(out, (weight,), grad_out)
    rows = tokens.flatten().unique()
    remap = torch.searchsorted(rows, tokens)
    refs = []
    for dtype in (torch.float16, torch.float32):
        small = weight.detach()[rows].to(dtype).requires_grad_()
        ref = reference.embed_positions(remap, small, 2.0, 0)
        refs.append((ref, *grads_of(ref, (small,), grad_out.to(dtype))))
    compare("embed_positions output", out, refs[0][0], refs[1][0])
    compare("embed_positions dweight rows", dw[rows], refs[0][1], refs[1][1])
    untouched = torch.ones(vocab, dtype=torch.bool, device="cuda")
    untouched[rows] = False
    assert not dw[untouched].any(), "dW has values in rows no token used"


# ----------------------------------------------------------------------------------------------- the harness itself


@pytest.mark.skipif(
    "triton" not in AVAILABLE_BACKENDS or torch.cuda.is_available(), reason="needs the Triton interpreter"
)
def test_the_views_catch_int32_offset_math():
    """A kernel that multiplies an int32 program id by the stride reads the pad (zeros) for row 2, not the data:
    the views above do expose 32-bit offset math, without crashing."""
    import triton
    import triton.language as tl

    @triton.jit
    def copy_rows(src, dst, stride, WIDE: tl.constexpr, D: tl.constexpr):
        row = tl.program_id(0)
        if WIDE:
            row = row.to(tl.int64)
        cols = tl.arange(0, D)
        tl.store(dst + row * D + cols, tl.load(src + row * stride + cols))

    src = Storage(2 * BIG + 64, "cpu").view((3, 16), (BIG, 1))
    narrow, wide = torch.zeros(3, 16, dtype=DTYPE), torch.zeros(3, 16, dtype=DTYPE)
    copy_rows[(3,)](src, narrow, src.stride(0), False, 16)
    copy_rows[(3,)](src, wide, src.stride(0), True, 16)
    assert torch.equal(wide, src.contiguous())
    assert torch.equal(narrow[:2], src[:2]) and not torch.equal(narrow[2], src[2])
