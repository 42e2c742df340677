"""Triton rotary embedding of q and k in one launch, under TRITON_INTERPRET=1 on CPU.

Outputs and dq, dk are compared with ``metagpt_fast.testing.assert_parity``: float32 against the reference run in
float64, float16 by the parity rule against float32 and float16 reference runs (bfloat16 runs in the GPU suite).
Both layouts (GPT-NeoX halves, GPT-J pairs), partial rotary_dim with odd head dims, position offsets and explicit
position ids of shape (T,), (1, T) and (B, T), GQA head counts, strided q/k/gradients and in-place rotation.

Tolerance: the kernel's float32 angle ``pos * base^(-2i/R)`` is off from the exact (float64) one by at most
``2 * pos * 2**-24`` (kernels/triton/positional.py), which moves each output by that much times ``|x1| + |x2|``.
"""

import pytest
import torch

from metagpt_fast import backends
from metagpt_fast.ops import reference
from metagpt_fast.testing import ATOL, assert_parity, float32_angle_error

pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("interpreter tests: the GPU suite runs tests/test_triton_positional_gpu.py", allow_module_level=True)

from metagpt_fast.backends.triton import positional as triton_positional  # noqa: E402
from metagpt_fast.backends.triton import rotary as triton_rotary  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
BASE = 10000.0


def rotation_atol(last_position: int, magnitude: float, dtype: torch.dtype) -> float:
    """``ATOL[dtype]`` plus the float32-angle error (2 * pos * 2**-24 rad) times the largest |x1| + |x2|."""
    return ATOL[dtype] + 2 * magnitude * float32_angle_error(last_position)


def _positions(kind, b, t, offset):
    if kind == "offset":
        return None, offset + t - 1
    shape = {"T": (t,), "1T": (1, t), "BT": (b, t)}[kind]
    ids = torch.randint(0, 3000, shape)
    return ids, int(ids.max())


def _inputs(b, hq, hk, t, d, layout):
    """q (b, hq, t, d), k (b, hk, t, d); ``layout="packed"`` views them in a (B, T, H, D) projection output like the
    model's fused qkv, ``"sliced"`` slices the head dim of a wider buffer."""
    if layout == "packed":
        qk = torch.randn(b, t, hq + hk, d)
        q, k = qk[:, :, :hq].transpose(1, 2), qk[:, :, hq:].transpose(1, 2)
    elif layout == "sliced":
        q = torch.randn(b, hq, t, d + 6)[..., 2 : 2 + d]
        k = torch.randn(b, hk, t, d + 6)[..., 2 : 2 + d]
    else:
        q, k = torch.randn(b, hq, t, d), torch.randn(b, hk, t, d)
    return q, k


def check_rotary(b=2, hq=4, hk=2, t=17, d=32, rotary_dim=None, dtype="fp32", interleaved=False, positions="offset",
                 offset=0, layout="contiguous", grad_layout="contiguous"):  # fmt: skip
    """Runs the Triton rotary op forward and backward; asserts parity of q_out, k_out, dq and dk."""
    dtype, rotary_dim = DTYPES[dtype], rotary_dim or d
    q, k = _inputs(b, hq, hk, t, d, layout)
    position_ids, last = _positions(positions, b, t, offset)
    grads = [torch.randn(b, h, t, d) for h in (hq, hk)]
    if grad_layout == "transposed":
        grads = [g.transpose(1, 2).contiguous().transpose(1, 2) for g in grads]

    def run(fn, dt, **kwargs):
        qi, ki = (x.to(dt).requires_grad_() for x in (q, k))
        outs = fn(qi, ki, position_ids, offset, rotary_dim, BASE, interleaved, **kwargs)
        return [o.detach() for o in outs] + list(torch.autograd.grad(outs, (qi, ki), [g.to(dt) for g in grads]))

    fast = run(triton_rotary.rotary, dtype, inplace=False)
    lowp = run(reference.apply_rotary, dtype)
    exact_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    exact = run(reference.apply_rotary, exact_dtype)
    magnitude = max(x.abs().max().item() for x in (q, k, *grads))
    atol = rotation_atol(last, magnitude, dtype)
    for name, f, lo, ex in zip(("q_out", "k_out", "dq", "dk"), fast, lowp, exact, strict=True):
        assert f.dtype == dtype and torch.isfinite(f).all(), name
        assert_parity(f, lo, ex.float() if dtype != torch.float32 else ex, name=name, atol=atol)
    return fast


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize(
    "b, hq, hk, t, d, rotary_dim, dtype, positions, offset",
    [
        (2, 4, 2, 17, 32, None, "fp32", "offset", 0),
        (2, 4, 2, 17, 32, None, "fp16", "offset", 5),
        (1, 3, 1, 9, 40, None, "fp32", "T", 0),  # 20 pairs: several frequency blocks
        (1, 3, 1, 9, 40, None, "fp16", "1T", 0),
        (2, 2, 2, 5, 33, 16, "fp32", "BT", 0),  # odd head dim, partial rotary
        (2, 2, 2, 5, 33, 16, "fp16", "offset", 100),
        (1, 1, 1, 1, 8, 2, "fp32", "offset", 7),
        (3, 2, 1, 33, 12, 8, "fp32", "offset", 1000),
    ],
)
def test_matches_reference(b, hq, hk, t, d, rotary_dim, dtype, positions, offset, interleaved):
    check_rotary(b, hq, hk, t, d, rotary_dim, dtype, interleaved, positions, offset)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_strided_inputs_and_gradients(interleaved):
    check_rotary(2, 3, 2, 11, 24, 16, "fp32", interleaved, "BT", layout="packed", grad_layout="transposed")
    check_rotary(1, 2, 2, 7, 20, None, "fp16", interleaved, "offset", 3, layout="sliced")


def test_int32_position_ids_and_large_positions():
    b, t = 2, 6
    q, k = torch.randn(b, 2, t, 16), torch.randn(b, 1, t, 16)
    ids = torch.tensor([[0, 1, 2, 40000, 40001, 3], [9, 8, 7, 6, 5, 4]], dtype=torch.int32)
    q_out, k_out = triton_rotary.rotary(q, k, ids, 0, 16, BASE, False, False)
    q_ref, k_ref = reference.apply_rotary(q.double(), k.double(), ids, 0, 16, BASE, False)
    atol = rotation_atol(40001, max(q.abs().max().item(), k.abs().max().item()), torch.float32)
    assert_parity(q_out, q_out, q_ref, name="q_out", atol=atol)
    assert_parity(k_out, k_out, k_ref, name="k_out", atol=atol)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_conjugate_rotation_inverts(interleaved):
    q, k = torch.randn(2, 3, 13, 18), torch.randn(2, 1, 13, 18)
    ops = torch.ops.metagpt_fast
    q_out, k_out = ops.triton_rotary(q, k, None, 11, 14, BASE, interleaved, False)
    q_back, k_back = ops.triton_rotary(q_out, k_out, None, 11, 14, BASE, interleaved, True)
    torch.testing.assert_close(q_back, q, atol=2e-6, rtol=0)
    torch.testing.assert_close(k_back, k, atol=2e-6, rtol=0)
    assert not torch.equal(q_out[..., :14], q[..., :14]) and torch.equal(q_out[..., 14:], q[..., 14:])


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
def test_inplace_matches_out_of_place_and_leaves_the_rest(interleaved):
    qk = torch.randn(2, 9, 5, 10)  # packed (B, T, H, D): q heads 0-2, k heads 3-4, strided views
    q, k = qk[:, :, :3].transpose(1, 2), qk[:, :, 3:].transpose(1, 2)
    ids = torch.randint(0, 50, (2, 9))
    expected = triton_rotary.rotary(q, k, ids, 0, 6, BASE, interleaved, False)
    before = qk.clone()
    q_out, k_out = triton_rotary.rotary(q, k, ids, 0, 6, BASE, interleaved, True)
    assert q_out is q and k_out is k
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1])
    assert torch.equal(qk[..., 6:], before[..., 6:])


def test_empty_inputs():
    q, k = torch.randn(2, 3, 0, 8), torch.randn(2, 1, 0, 8)
    q_out, k_out = triton_rotary.rotary(q, k, None, 0, 8, BASE, False, False)
    assert q_out.shape == q.shape and k_out.shape == k.shape


def test_reasons():
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


def test_public_op_selects_triton():
    reason = backends.available_backends()["triton"]
    if reason is not None:
        pytest.skip(f"triton backend not loadable here: {reason}")
    import metagpt_fast

    q, k = torch.randn(1, 2, 7, 16), torch.randn(1, 1, 7, 16)
    q_out, k_out = metagpt_fast.apply_rotary(q, k, offset=2, rotary_dim=8, interleaved=True, backend="triton")
    q_ref, k_ref = reference.apply_rotary(q.double(), k.double(), None, 2, 8, BASE, True)
    assert_parity(q_out, q_out, q_ref, name="q_out")
    assert_parity(k_out, k_out, k_ref, name="k_out")


def test_custom_ops_pass_opcheck():
    # The fake-tensor and compile checks trace the ops without data, which the interpreter cannot run (docs/testing.md):
    # the GPU suite covers them and torch.compile.
    q = torch.randn(2, 3, 5, 12, requires_grad=True)
    k = torch.randn(2, 1, 5, 12, requires_grad=True)
    ids = torch.randint(0, 20, (2, 5))
    ops = torch.ops.metagpt_fast
    torch.library.opcheck(ops.triton_rotary.default, (q, k, ids, 0, 8, BASE, True, False),
                          test_utils=("test_schema", "test_autograd_registration"))  # fmt: skip
    torch.library.opcheck(ops.triton_rotary_.default, (q.detach().clone(), k.detach().clone(), None, 3, 12, BASE,
                                                       False), test_utils=("test_schema",))  # fmt: skip
