"""CUDA positional kernels (csrc/positional/) against the reference on a GPU: float32 / float16 / bfloat16, the
vectorised and the element-wise paths, both rotary layouts, dropout replayed bit-exactly, deterministic embedding
backward, argument errors. Skipped without a CUDA GPU (the GPU suite runs them)."""

import types

import pytest
import torch
from helpers import check_against_reference, requires_cuda

from metagpt_fast import _extension
from metagpt_fast.ops import reference
from metagpt_fast.ops.reference.random import dropout_keep_mask
from metagpt_fast.testing import assert_parity

pytestmark = [pytest.mark.gpu, requires_cuda]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEED = 987654321987
DEVICE = "cuda"


@pytest.fixture(scope="module")
def cpp():
    assert _extension.load() is not None, f"extension failed to load: {_extension.unavailable_reason()}"
    assert _extension.has_cuda_kernels(), "extension built without its CUDA part"
    from metagpt_fast.backends.compiled import attention, positional, rotary

    return types.SimpleNamespace(
        ops=torch.ops.metagpt_fast,
        attention=attention.attention,
        embed_positions=positional.embed_positions,
        add_positional_encoding=positional.add_positional_encoding,
        rotary=rotary.rotary,
    )


def _seed(p):
    return torch.tensor([SEED], dtype=torch.int64, device=DEVICE) if p > 0 else None


# d = 64: 128-bit path for every dtype; d = 33: element-wise path.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sinusoidal,d,offset,p", [(True, 64, 0, 0.0), (True, 33, 9, 0.3), (False, 128, 0, 0.2)])
def test_embed_positions(cpp, dtype, sinusoidal, d, offset, p):
    gen = torch.Generator(device=DEVICE).manual_seed(d)
    tokens = torch.randint(0, 13, (4, 77), generator=gen, device=DEVICE)
    weight = torch.randn(13, d, generator=gen, device=DEVICE).to(dtype)
    keep = dropout_keep_mask(SEED, (4, 77, d), p, device=DEVICE) if p > 0 else None

    def fast(w):
        return cpp.embed_positions(tokens, w, 2.5, offset, p, sinusoidal, _seed(p))

    def ref(w):
        return reference.embed_positions(tokens, w, 2.5, offset, p, sinusoidal, dropout_mask=keep)

    check_against_reference(fast, ref, (weight,), ["out", "grad_weight"], DEVICE)


def test_embed_backward_is_deterministic(cpp):
    tokens = torch.randint(0, 7, (8, 512), device=DEVICE)
    weight = torch.randn(7, 256, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    grads = []
    for _ in range(3):
        out = cpp.embed_positions(tokens, weight, 1.0, 0, 0.1, True, _seed(0.1))
        grads.append(torch.autograd.grad(out, weight, torch.ones_like(out))[0])
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,offset,p", [("contiguous", 0, 0.0), ("strided", 5, 0.25), ("odd", 0, 0.1)])
def test_add_positional_encoding(cpp, dtype, layout, offset, p):
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    if layout == "strided":
        x = torch.randn(100, 3, 64, generator=gen, device=DEVICE).to(dtype).transpose(0, 1)
    elif layout == "odd":
        x = torch.randn(3, 100, 31, generator=gen, device=DEVICE).to(dtype)
    else:
        x = torch.randn(3, 100, 64, generator=gen, device=DEVICE).to(dtype)
    keep = dropout_keep_mask(SEED, tuple(x.shape), p, device=DEVICE) if p > 0 else None

    def fast(x):
        return cpp.add_positional_encoding(x, offset, p, _seed(p))

    def ref(x):
        return reference.add_positional_encoding(x, offset, p, dropout_mask=keep)

    check_against_reference(fast, ref, (x,), ["out", "grad_x"], DEVICE)


def test_cuda_and_cpu_draw_the_same_dropout_mask(cpp):
    x = torch.ones(2, 40, 24)
    cpu = cpp.ops.add_positional_encoding_fwd(x, 0, 0.5, _seed(0.5).cpu())
    gpu = cpp.ops.add_positional_encoding_fwd(x.to(DEVICE), 0, 0.5, _seed(0.5))
    assert torch.equal(cpu != 0, gpu.cpu() != 0)


ROTARY_CASES = [  # (B, Hq, Hk, T, D, rotary_dim, interleaved, positions)
    (2, 8, 2, 33, 64, 64, False, None),  # vectorised, half-split, GQA
    (2, 4, 4, 17, 128, 64, True, "shared"),  # vectorised, interleaved, pass-through features
    (3, 2, 1, 9, 36, 20, False, "batch"),  # element-wise path
    (1, 3, 3, 5, 18, 6, True, None),  # element-wise interleaved
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ROTARY_CASES)
def test_rotary(cpp, dtype, case):
    b, hq, hk, t, d, rd, interleaved, kind = case
    gen = torch.Generator(device=DEVICE).manual_seed(d)
    q = torch.randn(b, t, hq, d, generator=gen, device=DEVICE).to(dtype).transpose(1, 2)
    k = torch.randn(b, hk, t, d, generator=gen, device=DEVICE).to(dtype)
    pos = {
        None: None,
        "shared": torch.randperm(64, device=DEVICE)[:t],
        "batch": torch.randint(0, 4096, (b, t), device=DEVICE),
    }[kind]

    def fast(q, k):
        return cpp.rotary(q, k, pos, 2, rd, 10000.0, interleaved, False)

    def ref(q, k):
        return reference.apply_rotary(q, k, pos, 2, rd, 10000.0, interleaved)

    check_against_reference(fast, ref, (q, k), ["q_out", "k_out", "grad_q", "grad_k"], DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_inplace(cpp, dtype):
    q = torch.randn(2, 4, 21, 64, device=DEVICE).to(dtype)
    k = torch.randn(2, 21, 2, 64, device=DEVICE).to(dtype).transpose(1, 2)  # strided: rotated through a copy
    exact = reference.apply_rotary(q.float(), k.float(), None, 7, 32, 10000.0, False)
    lowp = reference.apply_rotary(q, k, None, 7, 32, 10000.0, False)
    q_out, k_out = cpp.rotary(q, k, None, 7, 32, 10000.0, False, True)
    assert q_out is q and k_out is k
    assert_parity(q, lowp[0], exact[0], name="q")
    assert_parity(k, lowp[1], exact[1], name="k")


def test_errors_name_the_argument(cpp):
    weight = torch.randn(5, 8, device=DEVICE)
    with pytest.raises(RuntimeError, match="tokens must be on"):
        cpp.ops.embed_positions_fwd(torch.zeros(1, 3, dtype=torch.long), weight, 1.0, 0, 0.0, True, None)
    with pytest.raises(RuntimeError, match="seed is required"):
        cpp.ops.add_positional_encoding_fwd(torch.randn(1, 2, 8, device=DEVICE), 0, 0.5, None)
    with pytest.raises(RuntimeError, match="rotary_dim must be even"):
        q = torch.randn(1, 1, 2, 8, device=DEVICE)
        cpp.ops.rotary(q, q, None, 0, 3, 10000.0, False, False)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        cpp.ops.add_positional_encoding_fwd(torch.randn(1, 2, 8, device=DEVICE, dtype=torch.float64), 0, 0.0, None)


def test_opcheck_cuda(cpp):
    tokens, weight = torch.randint(0, 6, (2, 5), device=DEVICE), torch.randn(6, 16, device=DEVICE)
    x = torch.randn(2, 5, 16, device=DEVICE)
    q, k = torch.randn(2, 3, 5, 16, device=DEVICE), torch.randn(2, 1, 5, 16, device=DEVICE)
    ops = torch.ops.metagpt_fast
    samples = [
        (ops.embed_positions_fwd, (tokens, weight.requires_grad_(True), 1.5, 2, 0.1, True, _seed(0.1))),
        (ops.embed_positions_bwd, (x, tokens, 6, 1.5, 0.1, _seed(0.1))),
        (ops.add_positional_encoding_fwd, (x.clone().requires_grad_(True), 3, 0.1, _seed(0.1))),
        (ops.add_positional_encoding_bwd, (x, 0.1, _seed(0.1))),
        (ops.rotary, (q.clone().requires_grad_(True), k.clone().requires_grad_(True), None, 1, 8, 1e4, True, False)),
        (ops.rotary_, (q.clone(), k.clone(), None, 1, 8, 1e4, False)),
    ]
    for op, args in samples:
        torch.library.opcheck(op.default, args)
