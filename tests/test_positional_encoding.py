"""The add_positional_encoding op (``dropout(x + PE[offset:offset+T])``) on every backend that runs here, against
the reference.

The parity test is written once and runs on every (backend, device) the registry reports (``kernel_params``): the
Triton kernels (interpreted on CPU tensors, compiled on CUDA ones), the compiled extension's ``cpu`` and ``cuda``
kernels, each with the cases listed for it below. The output and dx follow the parity rule of
``metagpt_fast.testing`` against the reference run one precision up; dropout is compared by replaying the kernel's
Philox mask. Triton computes the sinusoid in float32 (its angle off by at most ``float32_angle_error(pos)``, times the
dropout scale): that is its output's slack on top of the rule; the compiled kernels reduce the angle in float64 and
get none. bfloat16 Triton runs on a GPU only (docs/testing.md).

After the parity test, one section per backend for its own machinery: the sinusoid's error bound, the dropout stream,
custom-op registration (opcheck), registry reasons, argument errors.
"""

import dataclasses

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

# ------------------------------------------------------------------------------------------------------- cases


def _case(b, t, d, dtype, offset=0, dropout_p=0.0, layout="contiguous", grad_layout="contiguous", dropped=None):
    """A case: x (B, T, d) in ``layout`` ("contiguous"; "transposed": (B, d, T) memory order; "batch_transposed":
    (T, B, d) memory order), the upstream gradient's layout; ``dropped``: bounds on the fraction of zeros out."""
    return dict(b=b, t=t, d=d, dtype=dtype, offset=offset, dropout_p=dropout_p, layout=layout,
                grad_layout=grad_layout, dropped=dropped)  # fmt: skip


def _cases(cases):
    return {
        f"{c['b']}x{c['t']}x{c['d']}-{DTYPE_IDS[c['dtype']]}-off{c['offset']}-p{c['dropout_p']:g}-{c['layout']}"
        f"-grad_{c['grad_layout']}": c
        for c in cases
    }


ADD_CASES = {
    # Interpreted Triton: tiny and odd sizes, far offsets (where the float32 angle error dominates), dropout,
    # non-contiguous input and gradient.
    ("triton", "cpu"): _cases(
        [
            _case(b, t, d, dtype, offset)
            for b, t, d in [(1, 1, 1), (2, 17, 33), (3, 77, 64), (1, 200, 7)]
            for offset in (0, 1000)
            for dtype in (F32, F16)
        ]
        + [_case(2, 33, 20, dtype, offset=5, dropout_p=0.3, dropped=(0.2, 0.4)) for dtype in (F32, F16)]
        + [_case(2, 19, 24, F32, offset=3, dropout_p=0.1, layout="transposed", grad_layout="transposed")]
        # Positions near 20000: the float32 angle error (up to 2 * 20000 * 2**-24 = 2.4e-3) dominates.
        + [_case(1, 40, 16, F32, offset=20000)]
    ),
    # Compiled Triton at training sizes, every dtype, strided x.
    ("triton", "cuda"): _cases(
        [
            _case(b, t, d, dtype, offset, p, layout="transposed")
            for b, t, d, offset, p in [(8, 2048, 1024, 0, 0.0), (2, 4096, 96, 8000, 0.2)]
            for dtype in (BF16, F16, F32)
        ]
    ),
    # C++ kernels: non-contiguous x, with and without dropout.
    ("cpu", "cpu"): _cases(
        [
            _case(3, 41, 30, dtype, offset, p, layout="batch_transposed")
            for offset, p in [(0, 0.0), (7, 0.2)]
            for dtype in (F32, BF16, F16)
        ]
    ),
    # CUDA kernels: the vectorised path (d = 64, contiguous or strided) and the element-wise one (d = 31).
    ("cuda", "cuda"): _cases(
        [
            _case(3, 100, d, dtype, offset, p, layout=layout)
            for layout, d, offset, p in [
                ("contiguous", 64, 0, 0.0),
                ("batch_transposed", 64, 5, 0.25),
                ("contiguous", 31, 0, 0.1),
            ]
            for dtype in (F32, F16, BF16)
        ]
    ),
}


def _layout(shape, layout, device):
    b, t, d = shape
    if layout == "transposed":
        return torch.randn(b, d, t, device=device).transpose(1, 2)
    if layout == "batch_transposed":
        return torch.randn(t, b, d, device=device).transpose(0, 1)
    return torch.randn(b, t, d, device=device)


# ------------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("backend, device, case", kernel_params("add_positional_encoding", ADD_CASES))
def test_add_positional_encoding_matches_reference(backend, device, case):
    b, t, d, dtype, offset, p = (case[n] for n in ("b", "t", "d", "dtype", "offset", "dropout_p"))
    x = _layout((b, t, d), case["layout"], device)
    grad = _layout((b, t, d), case["grad_layout"], device)
    seed = torch.tensor([1000 + t * d], dtype=torch.int64, device=device) if p > 0 else None
    keep = dropout_keep_mask(seed, (b, t, d), p, device) if p > 0 else None
    impl = skip_unless_supported("add_positional_encoding", backend, x=x.to(dtype), offset=offset, dropout_p=p)

    def run(fn, dt, **kwargs):
        xi = x.to(dt).requires_grad_()
        out = fn(x=xi, offset=offset, dropout_p=p, **kwargs)
        return [out.detach(), *torch.autograd.grad(out, xi, grad.to(dt))]

    fast = run(impl.fn, dtype, seed=seed)
    lowp = run(reference.add_positional_encoding, dtype, dropout_mask=keep)
    exact = run(reference.add_positional_encoding, oracle_dtype(dtype), dropout_mask=keep)
    slack = float32_angle_error(offset + t - 1) / (1.0 - p) if backend == "triton" else 0.0
    for name, f, lo, ex, extra in zip(("out", "dx"), fast, lowp, exact, (slack, 0.0), strict=True):
        assert f.dtype == lo.dtype and torch.isfinite(f).all(), name
        assert_parity(f, lo, ex, name=name, extra=extra)
    if case["dropped"] is not None:
        low, high = case["dropped"]
        assert low < (fast[0] == 0).float().mean().item() < high


# ------------------------------------------------------------------------------------------- triton, interpreted

interpreted_triton = helpers.interpreted_triton("add_positional_encoding")


def _triton():
    from metagpt_fast.backends.triton import positional as triton_positional

    return triton_positional


@interpreted_triton
def test_triton_sinusoid_error_is_within_its_bound():
    triton_positional = _triton()
    x = torch.zeros(1, 64, 48)
    for offset in (0, 300, 5000):
        out = triton_positional.add_positional_encoding(x, offset, 0.0, None)
        exact = reference.sinusoidal_table(64, 48, offset, dtype=torch.float64)
        err = (out.double()[0] - exact).abs().max().item()
        assert err <= 2 * (offset + 63) * 2**-24 + 2e-7, (offset, err)


@interpreted_triton
def test_triton_empty_sequence():
    assert _triton().add_positional_encoding(torch.randn(3, 0, 5), 2, 0.0, None).shape == (3, 0, 5)


@interpreted_triton
def test_triton_cpu_tensors_need_the_interpreter():
    from metagpt_fast.ops.positional import ADD_POSITIONAL_ENCODING

    caps = backends.lookup("add_positional_encoding", "triton").capabilities
    assert caps.devices == ("cpu",)  # TRITON_INTERPRET is set here; compiled Triton takes CUDA tensors only
    reasons = backends.registry.generic_reasons(
        ADD_POSITIONAL_ENCODING, "triton", dataclasses.replace(caps, devices=("cuda",)),
        dict(x=torch.randn(1, 4, 8), offset=0, dropout_p=0.0),
    )  # fmt: skip
    assert any("takes cuda tensors" in r for r in reasons)


@interpreted_triton
def test_triton_public_ops_select_triton():
    # Both sinusoid ops through the public API (add_positional_encoding and embed_positions).
    import metagpt_fast

    x = torch.randn(2, 9, 10)
    out = metagpt_fast.add_positional_encoding(x, offset=3, backend="triton")
    lo, hi = (reference.add_positional_encoding(x.to(dt), 3) for dt in (torch.float32, torch.float64))
    assert_parity(out, lo, hi, name="out", extra=float32_angle_error(3 + 9 - 1))
    tokens = torch.randint(0, 6, (2, 9))
    weight = torch.randn(6, 10)
    out = metagpt_fast.embed_positions(tokens, weight, 2.0, 1, backend="triton")
    lo, hi = (reference.embed_positions(tokens, weight.to(dt), 2.0, 1) for dt in (torch.float32, torch.float64))
    assert_parity(out, lo, hi, name="out", extra=float32_angle_error(1 + 9 - 1))
    assert backends.select("add_positional_encoding", None, x=x, offset=0, dropout_p=0.0).backend != "triton"
    with pytest.raises(ValueError, match="float64"):
        metagpt_fast.add_positional_encoding(x.double(), backend="triton")


@interpreted_triton
def test_triton_custom_ops_pass_opcheck():
    # The fake-tensor and compile checks trace the ops without data, which the interpreter cannot run (docs/testing.md).
    _triton()
    utils = ("test_schema", "test_autograd_registration")
    ops = torch.ops.metagpt_fast
    seed = torch.tensor([5], dtype=torch.int64)
    x = torch.randn(2, 5, 12, requires_grad=True)
    torch.library.opcheck(ops.triton_add_positional_encoding.default, (x, 4, 0.2, seed), test_utils=utils)
    grad = torch.randn(2, 5, 12)
    torch.library.opcheck(ops.triton_positional_dropout.default, (grad, 0.2, seed), test_utils=("test_schema",))


# ---------------------------------------------------------------------------------------------- triton on a GPU


@pytest.mark.gpu
@requires_cuda
def test_triton_gpu_custom_ops_pass_opcheck():
    pytest.importorskip("triton")
    _triton()
    seed = torch.tensor([3], dtype=torch.int64, device="cuda")
    x = torch.randn(2, 33, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(torch.ops.metagpt_fast.triton_add_positional_encoding.default, (x, 4, 0.1, seed))


# ------------------------------------------------------------------------------------- compiled extension: cpu

CPU_SEED = 1234567890123


@pytest.fixture(scope="module")
def compiled_ops():
    if _extension.find_cxx() is None:
        pytest.skip("no C++ compiler: the extension cannot exist")
    assert _extension.load() is not None, f"extension failed to load: {_extension.unavailable_reason()}"
    from metagpt_fast.backends.compiled import positional  # noqa: F401  (registers the ops' autograd)

    return torch.ops.metagpt_fast


def test_cpu_dropout_is_the_reference_stream_bit_for_bit(compiled_ops):
    p = 0.37
    seed = torch.tensor([CPU_SEED], dtype=torch.int64)
    x = torch.ones(2, 50, 9)
    out = compiled_ops.add_positional_encoding_fwd(x, 0, p, seed)
    no_drop = compiled_ops.add_positional_encoding_fwd(x, 0, 0.0, None)
    assert torch.equal(out != 0, dropout_keep_mask(CPU_SEED, (2, 50, 9), p) & (no_drop != 0))


def test_cpu_sinusoid_table_far_positions(compiled_ops):
    # Angle reduced in float64 (metagpt_fast/sinusoid.h): float32-accurate at large positions too.
    x = torch.zeros(1, 8, 64)
    out = compiled_ops.add_positional_encoding_fwd(x, 100_000, 0.0, None)
    expected = reference.sinusoidal_table(8, 64, offset=100_000)
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("index", range(2))
def test_cpu_opcheck(compiled_ops, index):
    seed = torch.tensor([CPU_SEED], dtype=torch.int64)
    grad3 = torch.randn(2, 5, 12)
    op, args = [
        (compiled_ops.add_positional_encoding_fwd, (grad3.clone().requires_grad_(True), 3, 0.1, seed)),
        (compiled_ops.add_positional_encoding_bwd, (grad3, 0.1, seed)),
    ][index]
    torch.library.opcheck(op.default, args)


# ------------------------------------------------------------------------------------ compiled extension: cuda

CUDA_SEED = 987654321987


@pytest.fixture(scope="module")
def cuda_ops():
    assert _extension.load() is not None, f"extension failed to load: {_extension.unavailable_reason()}"
    assert _extension.has_cuda_kernels(), "extension built without its CUDA part"
    from metagpt_fast.backends.compiled import positional  # noqa: F401  (registers the ops' autograd)

    return torch.ops.metagpt_fast


@pytest.mark.gpu
@requires_cuda
def test_cuda_and_cpu_draw_the_same_dropout_mask(cuda_ops):
    seed = torch.tensor([CUDA_SEED], dtype=torch.int64)
    x = torch.ones(2, 40, 24)
    cpu = cuda_ops.add_positional_encoding_fwd(x, 0, 0.5, seed)
    gpu = cuda_ops.add_positional_encoding_fwd(x.to("cuda"), 0, 0.5, seed.to("cuda"))
    assert torch.equal(cpu != 0, gpu.cpu() != 0)


@pytest.mark.gpu
@requires_cuda
def test_cuda_errors_name_the_argument(cuda_ops):
    with pytest.raises(RuntimeError, match="seed is required"):
        cuda_ops.add_positional_encoding_fwd(torch.randn(1, 2, 8, device="cuda"), 0, 0.5, None)
    with pytest.raises(RuntimeError, match="x must be float32, float16 or bfloat16"):
        cuda_ops.add_positional_encoding_fwd(torch.randn(1, 2, 8, device="cuda", dtype=torch.float64), 0, 0.0, None)


@pytest.mark.gpu
@requires_cuda
def test_cuda_opcheck(cuda_ops):
    x = torch.randn(2, 5, 16, device="cuda")
    seed = torch.tensor([CUDA_SEED], dtype=torch.int64, device="cuda")
    torch.library.opcheck(cuda_ops.add_positional_encoding_fwd.default, (x.clone().requires_grad_(True), 3, 0.1, seed))
    torch.library.opcheck(cuda_ops.add_positional_encoding_bwd.default, (x, 0.1, seed))
