"""The rotary op (rotary embedding of q and k) on every backend that runs here, against the reference.

The parity test is written once and runs on every (backend, device) the registry reports (``kernel_params``): the
Triton kernels (interpreted on CPU tensors, compiled on CUDA ones), the compiled extension's ``cpu`` and ``cuda``
kernels. Each (backend, device) runs the cases listed for it below. Outputs and dq, dk follow the parity rule of
``metagpt_fast.testing`` against the reference run one precision up. Triton computes the angle
``pos * base^(-2i/R)`` in float32: off from the exact one by at most ``float32_angle_error(pos)`` rad, which moves
each output by that much times ``|x1| + |x2|`` (kernels/triton/positional.py): that is its slack on top of the rule.
bfloat16 Triton runs on a GPU only (docs/testing.md).

After the parity test, one section per backend for what is about that backend's own machinery: custom-op registration
(opcheck), in-place rotation, the registry's reasons, argument errors.
"""

import helpers
import pytest
import torch
from helpers import (
    kernel_params,
    requires_cuda,
    skip_unless_supported,
)

from metagpt_fast import _extension, backends
from metagpt_fast.ops import reference
from metagpt_fast.testing import ATOL, assert_parity, float32_angle_error, oracle_dtype

BASE = 10000.0
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPE_IDS = {F32: "float32", F16: "float16", BF16: "bfloat16"}

# ------------------------------------------------------------------------------------------------------- cases

# A case: shapes (B, Hq, Hk, T, D, rotary_dim), dtype, positions (("offset",): offset + t; ("T" | "1T" | "BT", high):
# random ids below high of that shape; ("perm", high): T distinct ids below high), offset, base, interleaved, the
# layout of q / k ("contiguous"; "packed": views of a (B, T, Hq + Hk, D) projection; "qkv": of (B, T, Hq + 2 Hk, D);
# "sliced": a slice of a wider head dim; "q_strided": q viewed from (B, T, Hq, D)) and of the upstream gradients.


def _case(b, hq, hk, t, d, rd, dtype, positions, offset=0, interleaved=False, base=BASE, layout="contiguous",
          grad_layout="contiguous"):  # fmt: skip
    return dict(b=b, hq=hq, hk=hk, t=t, d=d, rotary_dim=rd or d, dtype=dtype, positions=positions, offset=offset,
                interleaved=interleaved, base=base, layout=layout, grad_layout=grad_layout)  # fmt: skip


def _cases(rows, **fixed):
    cases = {}
    for row in rows:
        case = _case(*row, **fixed) if isinstance(row, tuple) else row
        pos = "-".join(str(p) for p in case["positions"])
        name = (f"{case['b']}x{case['hq']}x{case['hk']}x{case['t']}x{case['d']}-rd{case['rotary_dim']}-"
                f"{DTYPE_IDS[case['dtype']]}-{pos}-off{case['offset']}-{'gptj' if case['interleaved'] else 'neox'}"
                f"-{case['layout']}-grad_{case['grad_layout']}")  # fmt: skip
        cases[name] = case
    return cases


def _both_layouts(rows):
    return [
        _case(*row[:8], offset=row[8], interleaved=interleaved, **(row[9] if len(row) > 9 else {}))
        for row in rows
        for interleaved in (False, True)
    ]


ROTARY_CASES = {
    # Interpreted Triton: both rotation layouts, partial rotary_dim with odd head dims, offsets and position ids of
    # shape (T,), (1, T), (B, T), GQA head counts, strided q / k / gradients. No bfloat16 (docs/testing.md).
    ("triton", "cpu"): _cases(
        _both_layouts(
            [
                (2, 4, 2, 17, 32, None, F32, ("offset",), 0),
                (2, 4, 2, 17, 32, None, F16, ("offset",), 5),
                (1, 3, 1, 9, 40, None, F32, ("T", 3000), 0),  # 20 pairs: several frequency blocks
                (1, 3, 1, 9, 40, None, F16, ("1T", 3000), 0),
                (2, 2, 2, 5, 33, 16, F32, ("BT", 3000), 0),  # odd head dim, partial rotary
                (2, 2, 2, 5, 33, 16, F16, ("offset",), 100),
                (1, 1, 1, 1, 8, 2, F32, ("offset",), 7),
                (3, 2, 1, 33, 12, 8, F32, ("offset",), 1000),
                (2, 3, 2, 11, 24, 16, F32, ("BT", 3000), 0, dict(layout="packed", grad_layout="transposed")),
                (1, 2, 2, 7, 20, None, F16, ("offset",), 3, dict(layout="sliced")),
            ]
        )
    ),  # fmt: skip
    # Compiled Triton at training sizes, every dtype, views of a fused qkv projection.
    ("triton", "cuda"): _cases(
        _both_layouts(
            [
                (b, hq, hk, t, d, rd, dtype, positions, offset, dict(layout="qkv"))
                for b, hq, hk, t, d, rd, positions, offset in [
                    (4, 32, 8, 2048, 128, 128, ("offset",), 100),
                    (2, 16, 16, 1000, 256, 256, ("BT", 32768), 0),
                    (3, 12, 4, 777, 80, 32, ("T", 32768), 0),
                ]
                for dtype in (BF16, F16, F32)
            ]
        )
    ),  # fmt: skip
    # C++ kernels: GQA, interleaved with partial rotary_dim, per-batch positions; q strided like the model's heads.
    ("cpu", "cpu"): _cases(
        [
            _case(
                b, hq, hk, t, d, rd, dtype, positions, offset=3, interleaved=interleaved, base=500.0, layout="q_strided"
            )
            for b, hq, hk, t, d, rd, interleaved, positions in [
                (2, 4, 2, 13, 32, 32, False, ("offset",)),
                (2, 3, 1, 9, 40, 24, True, ("perm", 50)),
                (3, 2, 2, 7, 18, 10, False, ("BT", 1000)),
            ]
            for dtype in (F32, BF16, F16)
        ]
    ),  # fmt: skip
    # CUDA kernels: the vectorised and the element-wise paths, both layouts.
    ("cuda", "cuda"): _cases(
        [
            _case(b, hq, hk, t, d, rd, dtype, positions, offset=2, interleaved=interleaved, layout="q_strided")
            for b, hq, hk, t, d, rd, interleaved, positions in [
                (2, 8, 2, 33, 64, 64, False, ("offset",)),  # vectorised, half-split, GQA
                (2, 4, 4, 17, 128, 64, True, ("perm", 64)),  # vectorised, interleaved, pass-through features
                (3, 2, 1, 9, 36, 20, False, ("BT", 4096)),  # element-wise path
                (1, 3, 3, 5, 18, 6, True, ("offset",)),  # element-wise interleaved
            ]
            for dtype in (F32, F16, BF16)
        ]
    ),  # fmt: skip
}


def _inputs(case, device):
    """q (B, Hq, T, D), k (B, Hk, T, D) in float32 in the case's layout; position ids (or None) and the last
    position."""
    b, hq, hk, t, d = (case[n] for n in ("b", "hq", "hk", "t", "d"))
    layout = case["layout"]
    if layout in ("packed", "qkv"):
        qk = torch.randn(b, t, hq + (2 * hk if layout == "qkv" else hk), d, device=device)
        q, k = qk[:, :, :hq].transpose(1, 2), qk[:, :, hq : hq + hk].transpose(1, 2)
    elif layout == "sliced":
        q = torch.randn(b, hq, t, d + 6, device=device)[..., 2 : 2 + d]
        k = torch.randn(b, hk, t, d + 6, device=device)[..., 2 : 2 + d]
    elif layout == "q_strided":
        q = torch.randn(b, t, hq, d, device=device).transpose(1, 2)
        k = torch.randn(b, hk, t, d, device=device)
    else:
        q, k = torch.randn(b, hq, t, d, device=device), torch.randn(b, hk, t, d, device=device)
    kind, *high = case["positions"]
    if kind == "offset":
        return q, k, None, case["offset"] + t - 1
    if kind == "perm":
        ids = torch.randperm(high[0], device=device)[:t]
    else:
        ids = torch.randint(0, high[0], {"T": (t,), "1T": (1, t), "BT": (b, t)}[kind], device=device)
    return q, k, ids, int(ids.max())


# ------------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("backend, device, case", kernel_params("rotary", ROTARY_CASES))
def test_rotary_matches_reference(backend, device, case):
    dtype = case["dtype"]
    q, k, position_ids, last = _inputs(case, device)
    args = dict(position_ids=position_ids, offset=case["offset"], rotary_dim=case["rotary_dim"], base=case["base"],
                interleaved=case["interleaved"])  # fmt: skip
    impl = skip_unless_supported("rotary", backend, q=q.to(dtype), k=k.to(dtype), **args, inplace=False)
    grads = [torch.randn(case["b"], h, case["t"], case["d"], device=device) for h in (case["hq"], case["hk"])]
    if case["grad_layout"] == "transposed":
        grads = [g.transpose(1, 2).contiguous().transpose(1, 2) for g in grads]

    def run(fn, dt, **kwargs):
        qi, ki = (x.to(dt).requires_grad_() for x in (q, k))
        outs = fn(q=qi, k=ki, **args, **kwargs)
        return [o.detach() for o in outs] + list(torch.autograd.grad(outs, (qi, ki), [g.to(dt) for g in grads]))

    fast = run(impl.fn, dtype, inplace=False)
    lowp = run(reference.apply_rotary, dtype)
    exact = run(reference.apply_rotary, oracle_dtype(dtype))
    # Triton's float32 angle: float32_angle_error(last) rad, times the largest |x1| + |x2| it rotates.
    magnitude = max(x.abs().max().item() for x in (q, k, *grads))
    slack = 2 * magnitude * float32_angle_error(last) if backend == "triton" else 0.0
    for name, f, lo, ex in zip(("q_out", "k_out", "dq", "dk"), fast, lowp, exact, strict=True):
        assert f.dtype == dtype and torch.isfinite(f).all(), name
        assert_parity(f, lo, ex, name=name, extra=slack)


# ------------------------------------------------------------------------------------------- triton, interpreted

interpreted_triton = helpers.interpreted_triton("rotary")


def _triton():
    from metagpt_fast.backends.triton import positional as triton_positional
    from metagpt_fast.backends.triton import rotary as triton_rotary

    return triton_positional, triton_rotary


@interpreted_triton
def test_triton_int32_position_ids_and_large_positions():
    _, triton_rotary = _triton()
    b, t = 2, 6
    q, k = torch.randn(b, 2, t, 16), torch.randn(b, 1, t, 16)
    ids = torch.tensor([[0, 1, 2, 40000, 40001, 3], [9, 8, 7, 6, 5, 4]], dtype=torch.int32)
    q_out, k_out = triton_rotary.rotary(q, k, ids, 0, 16, BASE, False, False)
    q_ref, k_ref = reference.apply_rotary(q.double(), k.double(), ids, 0, 16, BASE, False)
    magnitude = max(q.abs().max().item(), k.abs().max().item())
    atol = ATOL[torch.float32] + 2 * magnitude * float32_angle_error(40001)
    assert_parity(q_out, q_out, q_ref, name="q_out", atol=atol)
    assert_parity(k_out, k_out, k_ref, name="k_out", atol=atol)


@interpreted_triton
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_triton_conjugate_rotation_inverts(interleaved):
    _triton()
    q, k = torch.randn(2, 3, 13, 18), torch.randn(2, 1, 13, 18)
    ops = torch.ops.metagpt_fast
    q_out, k_out = ops.triton_rotary(q, k, None, 11, 14, BASE, interleaved, False)
    q_back, k_back = ops.triton_rotary(q_out, k_out, None, 11, 14, BASE, interleaved, True)
    torch.testing.assert_close(q_back, q, atol=2e-6, rtol=0)
    torch.testing.assert_close(k_back, k, atol=2e-6, rtol=0)
    assert not torch.equal(q_out[..., :14], q[..., :14]) and torch.equal(q_out[..., 14:], q[..., 14:])


@interpreted_triton
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_triton_inplace_matches_out_of_place_and_leaves_the_rest(interleaved):
    _, triton_rotary = _triton()
    qk = torch.randn(2, 9, 5, 10)  # packed (B, T, H, D): q heads 0-2, k heads 3-4, strided views
    q, k = qk[:, :, :3].transpose(1, 2), qk[:, :, 3:].transpose(1, 2)
    ids = torch.randint(0, 50, (2, 9))
    expected = triton_rotary.rotary(q, k, ids, 0, 6, BASE, interleaved, False)
    before = qk.clone()
    q_out, k_out = triton_rotary.rotary(q, k, ids, 0, 6, BASE, interleaved, True)
    assert q_out is q and k_out is k
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])
    assert torch.equal(qk[..., 6:], before[..., 6:])


@interpreted_triton
def test_triton_empty_inputs():
    _, triton_rotary = _triton()
    q, k = torch.randn(2, 3, 0, 8), torch.randn(2, 1, 0, 8)
    q_out, k_out = triton_rotary.rotary(q, k, None, 0, 8, BASE, False, False)
    assert q_out.shape == q.shape and k_out.shape == k.shape


@interpreted_triton
def test_triton_reasons():
    triton_positional, _ = _triton()
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    impl = backends.lookup("rotary", "triton")

    def reasons(q, k, position_ids, offset, rotary_dim, base, interleaved, inplace):
        return impl.not_supported_reasons(
            q=q, k=k, position_ids=position_ids, offset=offset, rotary_dim=rotary_dim, base=base,
            interleaved=interleaved, inplace=inplace,
        )  # fmt: skip

    assert reasons(q, k, None, 0, 8, BASE, False, False) == []
    assert any("float64" in r for r in reasons(q.double(), k.double(), None, 0, 8, BASE, False, False))
    assert any("positions up to" in r for r in reasons(q, k, None, triton_positional.MAX_POSITION, 8, BASE, False,
                                                        False))  # fmt: skip
    assert any("same tensor" in r for r in reasons(q, q, None, 0, 8, BASE, False, True))


@interpreted_triton
def test_triton_public_op_selects_triton():
    import metagpt_fast

    q, k = torch.randn(1, 2, 7, 16), torch.randn(1, 1, 7, 16)
    q_out, k_out = metagpt_fast.apply_rotary(q, k, offset=2, rotary_dim=8, interleaved=True, backend="triton")
    q_ref, k_ref = reference.apply_rotary(q.double(), k.double(), None, 2, 8, BASE, True)
    assert_parity(q_out, q_out, q_ref, name="q_out")
    assert_parity(k_out, k_out, k_ref, name="k_out")


@interpreted_triton
def test_triton_custom_ops_pass_opcheck():
    # The fake-tensor and compile checks trace the ops without data, which the interpreter cannot run (docs/testing.md):
    # the GPU section below covers them.
    _triton()
    q = torch.randn(2, 3, 5, 12, requires_grad=True)
    k = torch.randn(2, 1, 5, 12, requires_grad=True)
    ids = torch.randint(0, 20, (2, 5))
    ops = torch.ops.metagpt_fast
    torch.library.opcheck(ops.triton_rotary.default, (q, k, ids, 0, 8, BASE, True, False),
                          test_utils=("test_schema", "test_autograd_registration"))  # fmt: skip
    torch.library.opcheck(ops.triton_rotary_.default, (q.detach().clone(), k.detach().clone(), None, 3, 12, BASE,
                                                       False), test_utils=("test_schema",))  # fmt: skip


# ---------------------------------------------------------------------------------------------- triton on a GPU


@pytest.mark.gpu
@requires_cuda
def test_triton_gpu_inplace_rotary_matches_out_of_place():
    pytest.importorskip("triton")
    _, triton_rotary = _triton()
    qkv = torch.randn(2, 300, 12, 64, device="cuda", dtype=torch.bfloat16)
    q, k = qkv[:, :, :8].transpose(1, 2), qkv[:, :, 8:].transpose(1, 2)
    expected = triton_rotary.rotary(q, k, None, 5, 32, BASE, False, False)
    rest = qkv[..., 32:].clone()
    triton_rotary.rotary(q, k, None, 5, 32, BASE, False, True)
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1]) and torch.equal(qkv[..., 32:], rest)


@pytest.mark.gpu
@requires_cuda
def test_triton_gpu_custom_ops_pass_opcheck():
    pytest.importorskip("triton")
    _triton()
    ops = torch.ops.metagpt_fast
    q = torch.randn(2, 4, 33, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 33, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(ops.triton_rotary.default, (q, k, None, 3, 32, BASE, True, False))
    ids = torch.randint(0, 100, (2, 33), device="cuda")
    torch.library.opcheck(ops.triton_rotary_.default, (q.detach().clone(), k.detach().clone(), ids, 0, 64, BASE, False))


# ------------------------------------------------------------------------------------- compiled extension: cpu


@pytest.fixture(scope="module")
def compiled_rotary():
    if _extension.find_cxx() is None:
        pytest.skip("no C++ compiler: the extension cannot exist")
    assert _extension.load() is not None, f"extension failed to load: {_extension.unavailable_reason()}"
    from metagpt_fast.backends.compiled import rotary

    return rotary.rotary


def test_cpu_rotary_inplace(compiled_rotary):
    q, k = torch.randn(2, 4, 11, 16), torch.randn(2, 2, 11, 16).transpose(-1, -2).contiguous().transpose(-1, -2)
    expected = reference.apply_rotary(q, k, None, 4, 12, 10000.0, True)
    q_out, k_out = compiled_rotary(q, k, None, 4, 12, 10000.0, True, True)
    assert q_out is q and k_out is k
    assert_parity(q, None, expected[0], name="q")
    assert_parity(k, None, expected[1], name="k")


def _opcheck_grad(args, grad):
    """``args`` with the tensors in ``grad`` replaced by clones that require grad."""
    args = list(args)
    for t in grad:
        i = next(i for i, a in enumerate(args) if a is t)
        args[i] = t.clone().requires_grad_(True)
    return tuple(args)


def _cpu_opcheck_samples():
    rq, rk = torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 8)
    return [
        ("rotary", (rq, rk, None, 2, 8, 10000.0, False, False), (rq, rk)),
        ("rotary", (rq, rk, torch.arange(5), 0, 4, 100.0, True, True), (rq, rk)),
        ("rotary_", (rq.clone(), rk.clone(), None, 2, 6, 10000.0, True), ()),
    ]


@pytest.mark.parametrize("index", range(3))
def test_cpu_opcheck(compiled_rotary, index):
    name, args, grad = _cpu_opcheck_samples()[index]
    torch.library.opcheck(getattr(torch.ops.metagpt_fast, name).default, _opcheck_grad(args, grad))


# ------------------------------------------------------------------------------------ compiled extension: cuda


@pytest.fixture(scope="module")
def cuda_rotary():
    assert _extension.load() is not None, f"extension failed to load: {_extension.unavailable_reason()}"
    assert _extension.has_cuda_kernels(), "extension built without its CUDA part"
    from metagpt_fast.backends.compiled import rotary

    return rotary.rotary


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cuda_rotary_inplace(cuda_rotary, dtype):
    q = torch.randn(2, 4, 21, 64, device="cuda").to(dtype)
    k = torch.randn(2, 21, 2, 64, device="cuda").to(dtype).transpose(1, 2)  # strided: rotated through a copy
    exact = reference.apply_rotary(q.float(), k.float(), None, 7, 32, 10000.0, False)
    lowp = reference.apply_rotary(q, k, None, 7, 32, 10000.0, False)
    q_out, k_out = cuda_rotary(q, k, None, 7, 32, 10000.0, False, True)
    assert q_out is q and k_out is k
    assert_parity(q, lowp[0], exact[0], name="q")
    assert_parity(k, lowp[1], exact[1], name="k")


@pytest.mark.gpu
@requires_cuda
def test_cuda_errors_name_the_argument(cuda_rotary):
    with pytest.raises(RuntimeError, match="rotary_dim must be even"):
        q = torch.randn(1, 1, 2, 8, device="cuda")
        torch.ops.metagpt_fast.rotary(q, q, None, 0, 3, 10000.0, False, False)


@pytest.mark.gpu
@requires_cuda
def test_cuda_opcheck(cuda_rotary):
    q, k = torch.randn(2, 3, 5, 16, device="cuda"), torch.randn(2, 1, 5, 16, device="cuda")
    ops = torch.ops.metagpt_fast
    samples = [
        (ops.rotary, (q.clone().requires_grad_(True), k.clone().requires_grad_(True), None, 1, 8, 1e4, True, False)),
        (ops.rotary_, (q.clone(), k.clone(), None, 1, 8, 1e4, False)),
    ]
    for op, args in samples:
        torch.library.opcheck(op.default, args)
