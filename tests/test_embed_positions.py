"""The embed_positions op (token embedding times a scale, plus the sinusoidal encoding, then dropout) on every
backend that runs here, against the reference.

The parity test is written once and runs on every (backend, device) the registry reports (``kernel_params``): the
Triton kernels (interpreted on CPU tensors, compiled on CUDA ones), the compiled extension's ``cpu`` and ``cuda``
kernels, each with the cases listed for it below. The output and dW follow the parity rule of
``metagpt_fast.testing`` against the reference run one precision up. Dropout is compared by replaying the kernel's
Philox mask (``reference.dropout_keep_mask``) in the reference. Triton computes the sinusoid in float32 in registers:
its encoding is off by the rounding of its float32 angle, at most ``float32_angle_error(pos)`` (times the dropout scale
1/(1-p)), the slack its output gets on top of the rule (kernels/triton/positional.py); the compiled kernels reduce the
angle in float64 and get none. bfloat16 Triton runs on a GPU only (docs/testing.md).

After the parity test, one section per backend for its own machinery: the deterministic and atomic Triton embedding
backward, custom-op registration (opcheck), registry reasons, torch.compile, argument errors.
"""

import helpers
import pytest
import torch
from helpers import kernel_params, requires_cuda, skip_unless_supported

from metagpt_fast import _extension, backends
from metagpt_fast.ops import reference
from metagpt_fast.ops.reference import dropout_keep_mask
from metagpt_fast.testing import assert_parity, float32_angle_error, oracle_dtype

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPE_IDS = {F32: "float32", F16: "float16", BF16: "bfloat16"}
BASE = 10000.0

# ------------------------------------------------------------------------------------------------------- cases


def _case(b, t, d, vocab, dtype, *, scale=1.5, offset=0, sinusoidal=True, dropout_p=0.0, deterministic=False,
          tokens="contiguous", weight_layout="contiguous", grad_layout="contiguous"):  # fmt: skip
    """A case: tokens (B, T) below ``vocab`` ("contiguous", "strided": every other of (B, 2T), "int32"), weight
    (vocab, d) ("transposed": stored (d, vocab) like a tied output projection), the upstream gradient's layout, and
    ``torch.use_deterministic_algorithms(deterministic)`` around the kernel (Triton: the sorted backward)."""
    return dict(b=b, t=t, d=d, vocab=vocab, dtype=dtype, scale=scale, offset=offset, sinusoidal=sinusoidal,
                dropout_p=dropout_p, deterministic=deterministic, tokens=tokens, weight_layout=weight_layout,
                grad_layout=grad_layout)  # fmt: skip


def _cases(cases):
    named = {}
    for c in cases:
        name = (f"{c['b']}x{c['t']}x{c['d']}-v{c['vocab']}-{DTYPE_IDS[c['dtype']]}-scale{c['scale']:g}-off{c['offset']}"
                f"-{'sin' if c['sinusoidal'] else 'nosin'}-p{c['dropout_p']:g}"
                f"-{'det' if c['deterministic'] else 'nondet'}"
                f"-tokens_{c['tokens']}-w_{c['weight_layout']}-grad_{c['grad_layout']}")  # fmt: skip
        named[name] = c
    return named


EMBED_CASES = {
    # Interpreted Triton: odd sizes, tiny and large vocabularies, long runs of one id across the chunks of the
    # deterministic backward, with and without the sinusoid, dropout, strided tokens / weight / gradient, int32 ids.
    ("triton", "cpu"): _cases(
        [
            _case(b, t, d, vocab, dtype, offset=offset, deterministic=det)
            for b, t, d, vocab, dtype, offset in [
                (1, 1, 1, 1, F32, 0),
                (2, 17, 33, 50, F32, 0),
                (2, 17, 33, 50, F16, 7),
                (1, 77, 64, 7, F16, 0),  # ~11 rows per id: runs cross the chunks of the deterministic backward
                (3, 40, 5, 3, F32, 300),
                (1, 200, 7, 1000, F32, 1000),
            ]
            for det in (False, True)
        ]
        + [_case(2, 21, 40, 30, dtype, scale=1.0, sinusoidal=False) for dtype in (F32, F16)]
        + [
            _case(2, 30, 24, 9, dtype, offset=4, dropout_p=0.25, deterministic=det)
            for dtype in (F32, F16)
            for det in (False, True)
        ]
        + [
            _case(
                2,
                25,
                20,
                12,
                F32,
                tokens="strided",
                weight_layout="transposed",
                grad_layout="transposed",
                deterministic=det,
                dropout_p=0.1,
            )  # fmt: skip
            for det in (False, True)
        ]
        + [_case(2, 9, 16, 11, F32, tokens="int32", deterministic=True)]
    ),
    # Compiled Triton at training sizes (GPT-2's vocabulary), every dtype, both backward passes.
    ("triton", "cuda"): _cases(
        [
            _case(b, t, d, vocab, dtype, scale=d**0.5, offset=offset, dropout_p=p, deterministic=det)
            for b, t, d, vocab, offset, p in [
                (4, 1024, 768, 50257, 0, 0.0),
                (8, 512, 128, 256, 3000, 0.1),
                (2, 333, 100, 1000, 17, 0.0),
            ]
            for dtype in (BF16, F16, F32)
            for det in (False, True)
        ]
    ),
    # C++ kernels: a small vocabulary (many repeated tokens), odd and even widths, with and without the sinusoid.
    ("cpu", "cpu"): _cases(
        [
            _case(3, 37, d, 11, dtype, scale=1.7, offset=offset, sinusoidal=sin, dropout_p=p)
            for sin, d, offset, p in [(True, 33, 0, 0.0), (True, 64, 5, 0.25), (False, 20, 0, 0.4)]
            for dtype in (F32, BF16, F16)
        ]
    ),
    # CUDA kernels: d = 64 and 128 take the 128-bit path for every dtype, d = 33 the element-wise one.
    ("cuda", "cuda"): _cases(
        [
            _case(4, 77, d, 13, dtype, scale=2.5, offset=offset, sinusoidal=sin, dropout_p=p)
            for sin, d, offset, p in [(True, 64, 0, 0.0), (True, 33, 9, 0.3), (False, 128, 0, 0.2)]
            for dtype in (F32, F16, BF16)
        ]
    ),
}


# ------------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("backend, device, case", kernel_params("embed_positions", EMBED_CASES))
def test_embed_positions_matches_reference(backend, device, case):
    b, t, d, vocab, dtype = (case[n] for n in ("b", "t", "d", "vocab", "dtype"))
    if case["tokens"] == "strided":
        tokens = torch.randint(0, vocab, (b, 2 * t), device=device)[:, ::2]
    else:
        tokens = torch.randint(0, vocab, (b, t), device=device)
        tokens = tokens.int() if case["tokens"] == "int32" else tokens
    weight = torch.randn(vocab, d, device=device)
    if case["weight_layout"] == "transposed":
        weight = weight.t().contiguous().t()
    grad = torch.randn(b, t, d, device=device)
    if case["grad_layout"] == "transposed":
        grad = grad.transpose(1, 2).contiguous().transpose(1, 2)
    p = case["dropout_p"]
    seed = torch.tensor([77 + t], dtype=torch.int64, device=device) if p > 0 else None
    keep = dropout_keep_mask(seed, (b, t, d), p, device) if p > 0 else None
    args = dict(tokens=tokens, scale=case["scale"], offset=case["offset"], dropout_p=p, sinusoidal=case["sinusoidal"])
    impl = skip_unless_supported("embed_positions", backend, weight=weight.to(dtype), **args)

    def run(fn, dt, **kwargs):
        w = weight.to(dt).requires_grad_()
        out = fn(weight=w, **args, **kwargs)
        return [out.detach(), *torch.autograd.grad(out, w, grad.to(dt))]

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(case["deterministic"])
    try:
        fast = run(impl.fn, dtype, seed=seed)
    finally:
        torch.use_deterministic_algorithms(previous)
    lowp = run(reference.embed_positions, dtype, dropout_mask=keep)
    exact = run(reference.embed_positions, oracle_dtype(dtype), dropout_mask=keep)
    angle = float32_angle_error(case["offset"] + t - 1) / (1.0 - p)
    slack = angle if backend == "triton" and case["sinusoidal"] else 0.0
    for name, f, lo, ex, extra in zip(("out", "dW"), fast, lowp, exact, (slack, 0.0), strict=True):
        assert f.dtype == lo.dtype and torch.isfinite(f).all(), name
        assert_parity(f, lo, ex, name=name, extra=extra)


# ------------------------------------------------------------------------------------------- triton, interpreted

interpreted_triton = helpers.interpreted_triton("embed_positions")


def _triton():
    from metagpt_fast.backends.triton import positional as triton_positional
    from metagpt_fast.kernels.triton import positional as kernels

    return triton_positional, kernels


@interpreted_triton
def test_triton_deterministic_backward_is_bitwise_repeatable_and_exact_in_order():
    _, kernels = _triton()
    # One id holding most rows (a long run over many chunks), a few rare ids, one id never used.
    tokens = torch.where(torch.rand(2, 40) < 0.7, 4, torch.randint(0, 6, (2, 40)))
    tokens[0, 0] = 0
    tokens[tokens == 5] = 3
    grad = torch.randn(2, 40, 8, dtype=torch.float16)
    seed = torch.tensor([9], dtype=torch.int64)
    runs = [kernels.embed_grad_sorted(grad, tokens, 6, torch.float16, 2.0, 0.2, seed) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    keep = dropout_keep_mask(seed, (2, 40, 8), 0.2)
    expected = torch.zeros(6, 8, dtype=torch.float64).index_add_(
        0, tokens.flatten(), (grad.double() * keep / 0.8 * 2.0).flatten(0, 1)
    )
    assert torch.equal(runs[0][5], torch.zeros(8, dtype=torch.float16))
    assert_parity(runs[0], expected.half(), expected.float(), name="dW")
    atomic = kernels.embed_grad_atomic(grad, tokens, 6, torch.float16, 2.0, 0.2, seed)
    assert_parity(atomic, expected.half(), expected.float(), name="dW atomic")


@interpreted_triton
def test_triton_deterministic_algorithms_select_the_sorted_backward(monkeypatch):
    triton_positional, kernels = _triton()
    tokens = torch.randint(0, 5, (2, 13))
    weight = torch.randn(5, 8, requires_grad=True)

    def forbidden(*args, **kwargs):
        raise AssertionError("wrong embedding backward chosen")

    def grad_with(deterministic):
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            out = triton_positional.embed_positions(tokens, weight, 1.0, 0, 0.0, True, None)
            return torch.autograd.grad(out.sum(), weight)[0]
        finally:
            torch.use_deterministic_algorithms(previous)

    with monkeypatch.context() as patch:
        patch.setattr(kernels, "embed_grad_atomic", forbidden)
        sorted_grad = grad_with(True)
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "embed_grad_sorted", forbidden)
        atomic_grad = grad_with(False)
    counts = torch.bincount(tokens.flatten(), minlength=5).float()
    assert torch.allclose(sorted_grad, counts[:, None].expand(5, 8)) and torch.allclose(atomic_grad, sorted_grad)


@interpreted_triton
def test_triton_empty_sequence():
    triton_positional, _ = _triton()
    out = triton_positional.embed_positions(torch.zeros(2, 0, dtype=torch.int64), torch.randn(4, 8), 1.0, 0, 0.0,
                                            True, None)  # fmt: skip
    assert out.shape == (2, 0, 8)


@interpreted_triton
def test_triton_registered_with_priority_reasons_and_interpreter_flag():
    # The three positional ops of the Triton backend (embed_positions, add_positional_encoding, rotary).
    triton_positional, _ = _triton()
    from metagpt_fast.backends.triton import rotary as triton_rotary

    for op, fn in (
        ("embed_positions", triton_positional.embed_positions),
        ("add_positional_encoding", triton_positional.add_positional_encoding),
        ("rotary", triton_rotary.rotary),
    ):
        impl = backends.lookup(op, "triton")
        assert impl.fn is fn and impl.priority({}) == 30 and impl.slow  # slow: TRITON_INTERPRET is set here
    impl = backends.lookup("add_positional_encoding", "triton")

    def reasons(x, offset, dropout_p):
        return impl.not_supported_reasons(x=x, offset=offset, dropout_p=dropout_p)

    assert reasons(torch.randn(1, 4, 8), 0, 0.0) == []
    assert any("float64" in r for r in reasons(torch.randn(1, 4, 8, dtype=torch.float64), 0, 0.0))
    assert any("positions up to" in r for r in reasons(torch.randn(1, 4, 8), triton_positional.MAX_POSITION, 0.0))
    embed = backends.lookup("embed_positions", "triton")
    tokens = torch.zeros(1, 4, dtype=torch.int64)
    inputs = dict(tokens=tokens, weight=torch.randn(3, 8), scale=1.0, offset=triton_positional.MAX_POSITION)
    assert embed.not_supported_reasons(**inputs, dropout_p=0.0, sinusoidal=False) == []
    assert embed.not_supported_reasons(**inputs, dropout_p=0.0, sinusoidal=True)


@interpreted_triton
def test_triton_custom_ops_pass_opcheck():
    # The fake-tensor and compile checks trace the ops without data, which the interpreter cannot run (docs/testing.md):
    # the GPU section covers them and torch.compile.
    _triton()
    utils = ("test_schema", "test_autograd_registration")
    ops = torch.ops.metagpt_fast
    tokens = torch.randint(0, 7, (2, 5))
    weight = torch.randn(7, 12, requires_grad=True)
    seed = torch.tensor([5], dtype=torch.int64)
    torch.library.opcheck(ops.triton_embed_positions.default, (tokens, weight, 2.0, 3, 0.1, True, seed),
                          test_utils=utils)  # fmt: skip
    grad = torch.randn(2, 5, 12)
    backward_args = (grad, tokens, 7, torch.float32, 2.0, 0.1, seed, True)
    torch.library.opcheck(ops.triton_embed_positions_backward.default, backward_args, test_utils=("test_schema",))


# ---------------------------------------------------------------------------------------------- triton on a GPU


@pytest.mark.gpu
@requires_cuda
def test_triton_gpu_deterministic_embedding_backward_is_bitwise_repeatable():
    pytest.importorskip("triton")
    _, kernels = _triton()
    # Byte-level text: a few ids (space, 'e') hold a large share of 64 * 256 rows, runs span hundreds of chunks.
    probs = torch.full((256,), 1.0, device="cuda")
    probs[32], probs[101] = 2000.0, 800.0
    tokens = torch.multinomial(probs, 64 * 256, replacement=True).view(64, 256)
    grad = torch.randn(64, 256, 384, device="cuda", dtype=torch.bfloat16)
    seed = torch.tensor([7], dtype=torch.int64, device="cuda")
    runs = [kernels.embed_grad_sorted(grad, tokens, 256, torch.bfloat16, 1.0, 0.1, seed) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    keep = dropout_keep_mask(seed, (64, 256, 384), 0.1, "cuda")
    exact = torch.zeros(256, 384, dtype=torch.float64, device="cuda")
    exact.index_add_(0, tokens.flatten(), (grad.double() * keep / 0.9).flatten(0, 1))
    lowp = torch.zeros(256, 384, dtype=torch.bfloat16, device="cuda")
    lowp.index_add_(0, tokens.flatten(), (grad * keep / 0.9).flatten(0, 1))
    assert_parity(runs[0], lowp, exact.float(), name="dW sorted")
    atomic = kernels.embed_grad_atomic(grad, tokens, 256, torch.bfloat16, 1.0, 0.1, seed)
    assert_parity(atomic, lowp, exact.float(), name="dW atomic")


@pytest.mark.gpu
@requires_cuda
def test_triton_gpu_custom_ops_pass_opcheck():
    pytest.importorskip("triton")
    _triton()
    ops = torch.ops.metagpt_fast
    tokens = torch.randint(0, 50, (2, 33), device="cuda")
    weight = torch.randn(50, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    seed = torch.tensor([3], dtype=torch.int64, device="cuda")
    torch.library.opcheck(ops.triton_embed_positions.default, (tokens, weight, 8.0, 4, 0.1, True, seed))


@pytest.mark.gpu
@requires_cuda
def test_triton_gpu_torch_compile_fullgraph():
    # The three positional Triton ops in one compiled graph: embedding, encoding add, rotary.
    pytest.importorskip("triton")
    ops, _ = _triton()
    from metagpt_fast.backends.triton import rotary as triton_rotary

    tokens = torch.randint(0, 100, (2, 64), device="cuda")
    weight = torch.randn(100, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    seed = torch.tensor([11], dtype=torch.int64, device="cuda")

    def step(weight):
        x = ops.embed_positions(tokens, weight, 2.0, 0, 0.1, False, seed)
        x = ops.add_positional_encoding(x, 3, 0.1, seed)
        qk = x.view(2, 64, 4, 32).transpose(1, 2)
        q, k = triton_rotary.rotary(qk, qk * 2, None, 0, 32, BASE, False, False)
        return (q.float() * k.float()).sum()

    loss_eager = step(weight)
    grad_eager = torch.autograd.grad(loss_eager, weight)[0]
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(weight)
    grad = torch.autograd.grad(loss, weight)[0]
    torch.testing.assert_close(loss, loss_eager)
    torch.testing.assert_close(grad, grad_eager)


# ------------------------------------------------------------------------------------- compiled extension: cpu


@pytest.fixture(scope="module")
def compiled_embed():
    if _extension.find_cxx() is None:
        pytest.skip("no C++ compiler: the extension cannot exist")
    assert _extension.load() is not None, f"extension failed to load: {_extension.unavailable_reason()}"
    from metagpt_fast.backends.compiled import positional

    return positional.embed_positions


def test_cpu_embed_positions_backward_is_deterministic(compiled_embed):
    tokens = torch.randint(0, 5, (4, 300))
    weight = torch.randn(5, 48, requires_grad=True)
    seed = torch.tensor([1234567890123], dtype=torch.int64)
    grads = []
    for _ in range(2):
        out = compiled_embed(tokens, weight, 2.0, 0, 0.1, True, seed)
        (grad,) = torch.autograd.grad(out, weight, torch.ones_like(out))
        grads.append(grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("index", range(2))
def test_cpu_opcheck(compiled_embed, index):
    seed = torch.tensor([1234567890123], dtype=torch.int64)
    tokens, weight = torch.randint(0, 6, (2, 5)), torch.randn(6, 12)
    grad3 = torch.randn(2, 5, 12)
    ops = torch.ops.metagpt_fast
    op, args = [
        (ops.embed_positions_fwd, (tokens, weight.clone().requires_grad_(True), 1.5, 2, 0.1, True, seed)),
        (ops.embed_positions_bwd, (grad3, tokens, 6, 1.5, 0.1, seed)),
    ][index]
    torch.library.opcheck(op.default, args)


# ------------------------------------------------------------------------------------ compiled extension: cuda

CUDA_SEED = 987654321987


@pytest.fixture(scope="module")
def cuda_embed():
    assert _extension.load() is not None, f"extension failed to load: {_extension.unavailable_reason()}"
    assert _extension.has_cuda_kernels(), "extension built without its CUDA part"
    from metagpt_fast.backends.compiled import positional

    return positional.embed_positions


@pytest.mark.gpu
@requires_cuda
def test_cuda_embed_backward_is_deterministic(cuda_embed):
    tokens = torch.randint(0, 7, (8, 512), device="cuda")
    weight = torch.randn(7, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    seed = torch.tensor([CUDA_SEED], dtype=torch.int64, device="cuda")
    grads = []
    for _ in range(3):
        out = cuda_embed(tokens, weight, 1.0, 0, 0.1, True, seed)
        grads.append(torch.autograd.grad(out, weight, torch.ones_like(out))[0])
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.gpu
@requires_cuda
def test_cuda_errors_name_the_argument(cuda_embed):
    weight = torch.randn(5, 8, device="cuda")
    with pytest.raises(RuntimeError, match="tokens must be on"):
        torch.ops.metagpt_fast.embed_positions_fwd(torch.zeros(1, 3, dtype=torch.long), weight, 1.0, 0, 0.0, True, None)


@pytest.mark.gpu
@requires_cuda
def test_cuda_opcheck(cuda_embed):
    tokens, weight = torch.randint(0, 6, (2, 5), device="cuda"), torch.randn(6, 16, device="cuda")
    x = torch.randn(2, 5, 16, device="cuda")
    seed = torch.tensor([CUDA_SEED], dtype=torch.int64, device="cuda")
    ops = torch.ops.metagpt_fast
    torch.library.opcheck(
        ops.embed_positions_fwd.default, (tokens, weight.requires_grad_(True), 1.5, 2, 0.1, True, seed)
    )
    torch.library.opcheck(ops.embed_positions_bwd.default, (x, tokens, 6, 1.5, 0.1, seed))
