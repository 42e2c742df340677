"""Triton fused embedding + sinusoidal encoding + dropout, and the encoding add, under TRITON_INTERPRET=1 on CPU.

Outputs and gradients follow the parity rule of ``metagpt_fast.testing``: at most twice as far from the reference run
one precision up (float64 for float32, float32 for float16) as the reference run in the kernel's own precision
(bfloat16 runs in the GPU suite). Dropout is compared by replaying the kernel's Philox mask
(``reference.dropout_keep_mask``) in the reference.

Tolerance of the sinusoid: the kernels compute it in float32 in registers, the reference table is exact (float64
rounded once), so the kernel's encoding is off by the rounding of its float32 angle ``pos * inv_freq``: one rounding
of inv_freq (computed in float64) and one of the product, each a relative 2**-24, so at most ``2 * pos * 2**-24``
(kernels/triton/positional.py, ``float32_angle_error``), the slack the outputs get on top of the rule; the polynomial
sin/cos adds at most 2 ulp, inside the rule's floor.
"""

import dataclasses

import pytest
import torch

from metagpt_fast import backends
from metagpt_fast.ops import reference
from metagpt_fast.ops.reference import dropout_keep_mask
from metagpt_fast.testing import assert_parity, float32_angle_error, oracle_dtype

pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("interpreter tests: the GPU suite runs tests/test_triton_positional_gpu.py", allow_module_level=True)

from metagpt_fast.kernels.triton import positional as kernels  # noqa: E402
from metagpt_fast.backends.triton import positional as triton_positional  # noqa: E402
from metagpt_fast.ops.positional import ADD_POSITIONAL_ENCODING  # noqa: E402
from metagpt_fast.backends.triton import rotary as triton_rotary  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def angle_slack(last_position: int, gain: float = 1.0) -> float:
    """The float32-angle error of an encoding of unit amplitude at positions <= last_position, times ``gain`` (the
    dropout scale 1/(1-p) multiplies it)."""
    return gain * float32_angle_error(last_position)


def _check(name, fast, lowp, exact, slack=0.0):
    assert fast.dtype == lowp.dtype and torch.isfinite(fast).all(), name
    return assert_parity(fast, lowp, exact, name=name, extra=slack)


def _seed(value):
    return torch.tensor([value], dtype=torch.int64)


# ------------------------------------------------------------------------------------------ add_positional_encoding


def check_add(b, t, d, dtype, offset=0, dropout_p=0.0, layout="contiguous", grad_layout="contiguous"):
    """Runs the Triton add op forward and backward; asserts parity of the output and dx with the reference."""
    dtype = DTYPES[dtype]
    x = torch.randn(b, t, d)
    if layout == "transposed":  # (B, d, T) memory order
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    grad = torch.randn(b, t, d)
    if grad_layout == "transposed":
        grad = grad.transpose(1, 2).contiguous().transpose(1, 2)
    seed = _seed(1000 + t * d) if dropout_p > 0 else None
    keep = dropout_keep_mask(seed, (b, t, d), dropout_p) if dropout_p > 0 else None

    def run(fn, dt, **kwargs):
        xi = x.to(dt).requires_grad_()
        out = fn(xi, offset, dropout_p, **kwargs)
        return [out.detach(), *torch.autograd.grad(out, xi, grad.to(dt))]

    fast = run(triton_positional.add_positional_encoding, dtype, seed=seed)
    lowp = run(reference.add_positional_encoding, dtype, dropout_mask=keep)
    exact = run(reference.add_positional_encoding, oracle_dtype(dtype), dropout_mask=keep)
    gain = 1.0 / (1.0 - dropout_p)
    _check("out", fast[0], lowp[0], exact[0], angle_slack(offset + t - 1, gain))
    _check("dx", fast[1], lowp[1], exact[1])
    return fast


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("offset", [0, 1000])
@pytest.mark.parametrize("b, t, d", [(1, 1, 1), (2, 17, 33), (3, 77, 64), (1, 200, 7)])
def test_add_matches_reference(b, t, d, offset, dtype):
    check_add(b, t, d, dtype, offset)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_add_dropout_replayed_with_the_exact_mask(dtype):
    out, _ = check_add(2, 33, 20, dtype, offset=5, dropout_p=0.3)
    dropped = (out == 0).float().mean().item()
    assert 0.2 < dropped < 0.4


def test_add_non_contiguous_input_and_gradient():
    check_add(2, 19, 24, "fp32", offset=3, dropout_p=0.1, layout="transposed", grad_layout="transposed")


def test_add_large_offset_within_the_float32_angle_bound():
    # Positions near 20000: the float32 angle error (up to 2 * 20000 * 2**-24 = 2.4e-3) dominates; the bound holds.
    check_add(1, 40, 16, "fp32", offset=20000)


def test_sinusoid_error_is_within_its_bound():
    x = torch.zeros(1, 64, 48)
    for offset in (0, 300, 5000):
        out = triton_positional.add_positional_encoding(x, offset, 0.0, None)
        exact = reference.sinusoidal_table(64, 48, offset, dtype=torch.float64)
        err = (out.double()[0] - exact).abs().max().item()
        assert err <= 2 * (offset + 63) * 2**-24 + 2e-7, (offset, err)


# -------------------------------------------------------------------------------------------------- embed_positions


def check_embed(b, t, d, vocab, dtype, *, scale=1.5, offset=0, sinusoidal=True, dropout_p=0.0, deterministic=False,
                tokens=None, weight_layout="contiguous", grad_layout="contiguous"):  # fmt: skip
    """Runs the Triton embedding op forward and backward; asserts parity of the output and dW with the reference."""
    dtype = DTYPES[dtype]
    if tokens is None:
        tokens = torch.randint(0, vocab, (b, t))
    weight = torch.randn(vocab, d)
    if weight_layout == "transposed":  # (d, vocab) memory order, as a tied output projection stored transposed
        weight = weight.t().contiguous().t()
    grad = torch.randn(b, t, d)
    if grad_layout == "transposed":
        grad = grad.transpose(1, 2).contiguous().transpose(1, 2)
    seed = _seed(77 + t) if dropout_p > 0 else None
    keep = dropout_keep_mask(seed, (b, t, d), dropout_p) if dropout_p > 0 else None

    def run(fn, dt, **kwargs):
        w = weight.to(dt).requires_grad_()
        out = fn(tokens, w, scale, offset, dropout_p, sinusoidal, **kwargs)
        return [out.detach(), *torch.autograd.grad(out, w, grad.to(dt))]

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        fast = run(triton_positional.embed_positions, dtype, seed=seed)
    finally:
        torch.use_deterministic_algorithms(previous)
    lowp = run(reference.embed_positions, dtype, dropout_mask=keep)
    exact = run(reference.embed_positions, oracle_dtype(dtype), dropout_mask=keep)
    gain = 1.0 / (1.0 - dropout_p)
    _check("out", fast[0], lowp[0], exact[0], angle_slack(offset + t - 1, gain) if sinusoidal else 0.0)
    _check("dW", fast[1], lowp[1], exact[1])
    return fast


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize(
    "b, t, d, vocab, dtype, offset",
    [
        (1, 1, 1, 1, "fp32", 0),
        (2, 17, 33, 50, "fp32", 0),
        (2, 17, 33, 50, "fp16", 7),
        (1, 77, 64, 7, "fp16", 0),  # ~11 rows per id: runs cross the chunks of the deterministic backward
        (3, 40, 5, 3, "fp32", 300),
        (1, 200, 7, 1000, "fp32", 1000),
    ],
)
def test_embed_matches_reference(b, t, d, vocab, dtype, offset, deterministic):
    check_embed(b, t, d, vocab, dtype, offset=offset, deterministic=deterministic)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_embed_without_sinusoid(dtype):
    check_embed(2, 21, 40, 30, dtype, scale=1.0, sinusoidal=False)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_embed_dropout_replayed_with_the_exact_mask(dtype, deterministic):
    check_embed(2, 30, 24, 9, dtype, offset=4, dropout_p=0.25, deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [False, True])
def test_embed_non_contiguous_tokens_weight_and_gradient(deterministic):
    tokens = torch.randint(0, 12, (2, 50))[:, ::2]  # (2, 25) with a token stride of 2
    check_embed(2, 25, 20, 12, "fp32", tokens=tokens, weight_layout="transposed", grad_layout="transposed",
                deterministic=deterministic, dropout_p=0.1)  # fmt: skip


def test_embed_int32_tokens():
    check_embed(2, 9, 16, 11, "fp32", tokens=torch.randint(0, 11, (2, 9), dtype=torch.int32), deterministic=True)


def test_deterministic_backward_is_bitwise_repeatable_and_exact_in_order():
    # One id holding most rows (a long run over many chunks), a few rare ids, one id never used.
    tokens = torch.where(torch.rand(2, 40) < 0.7, 4, torch.randint(0, 6, (2, 40)))
    tokens[0, 0] = 0
    tokens[tokens == 5] = 3
    grad = torch.randn(2, 40, 8, dtype=torch.float16)
    seed = _seed(9)
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


def test_deterministic_algorithms_select_the_sorted_backward(monkeypatch):
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


def test_empty_sequence():
    out = triton_positional.embed_positions(torch.zeros(2, 0, dtype=torch.int64), torch.randn(4, 8), 1.0, 0, 0.0,
                                            True, None)  # fmt: skip
    assert out.shape == (2, 0, 8)
    assert triton_positional.add_positional_encoding(torch.randn(3, 0, 5), 2, 0.0, None).shape == (3, 0, 5)


# -------------------------------------------------------------------------------------- registration and custom ops


def test_registered_with_priority_reasons_and_interpreter_flag():
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


def test_cpu_tensors_need_the_interpreter():
    caps = backends.lookup("add_positional_encoding", "triton").capabilities
    assert caps.devices == ("cpu",)  # TRITON_INTERPRET is set here; compiled Triton takes CUDA tensors only
    reasons = backends.registry.generic_reasons(
        ADD_POSITIONAL_ENCODING, "triton", dataclasses.replace(caps, devices=("cuda",)),
        dict(x=torch.randn(1, 4, 8), offset=0, dropout_p=0.0),
    )
    assert any("takes cuda tensors" in r for r in reasons)


def test_public_ops_select_triton():
    reason = backends.available_backends()["triton"]
    if reason is not None:
        pytest.skip(f"triton backend not loadable here: {reason}")
    import metagpt_fast

    x = torch.randn(2, 9, 10)
    out = metagpt_fast.add_positional_encoding(x, offset=3, backend="triton")
    lo, hi = (reference.add_positional_encoding(x.to(dt), 3) for dt in (torch.float32, torch.float64))
    assert_parity(out, lo, hi, name="out", extra=angle_slack(3 + 9 - 1))
    tokens = torch.randint(0, 6, (2, 9))
    weight = torch.randn(6, 10)
    out = metagpt_fast.embed_positions(tokens, weight, 2.0, 1, backend="triton")
    lo, hi = (reference.embed_positions(tokens, weight.to(dt), 2.0, 1) for dt in (torch.float32, torch.float64))
    assert_parity(out, lo, hi, name="out", extra=angle_slack(1 + 9 - 1))
    assert backends.select("add_positional_encoding", None, x=x, offset=0, dropout_p=0.0).backend != "triton"
    with pytest.raises(ValueError, match="float64"):
        metagpt_fast.add_positional_encoding(x.double(), backend="triton")


def test_custom_ops_pass_opcheck():
    # The fake-tensor and compile checks trace the ops without data, which the interpreter cannot run (docs/testing.md):
    # the GPU suite covers them and torch.compile.
    utils = ("test_schema", "test_autograd_registration")
    ops = torch.ops.metagpt_fast
    tokens = torch.randint(0, 7, (2, 5))
    weight = torch.randn(7, 12, requires_grad=True)
    seed = _seed(5)
    torch.library.opcheck(ops.triton_embed_positions.default, (tokens, weight, 2.0, 3, 0.1, True, seed),
                          test_utils=utils)  # fmt: skip
    grad = torch.randn(2, 5, 12)
    torch.library.opcheck(ops.triton_embed_positions_backward.default,
                          (grad, tokens, 7, torch.float32, 2.0, 0.1, seed, True), test_utils=("test_schema",))  # fmt: skip
    x = torch.randn(2, 5, 12, requires_grad=True)
    torch.library.opcheck(ops.triton_add_positional_encoding.default, (x, 4, 0.2, seed), test_utils=utils)
    torch.library.opcheck(ops.triton_positional_dropout.default, (grad, 0.2, seed), test_utils=("test_schema",))
