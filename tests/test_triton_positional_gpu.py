"""Triton positional kernels on a CUDA GPU: bfloat16/float16/float32 parity at training sizes, determinism of the
embedding backward, in-place rotary, opcheck and torch.compile.

Parity follows the rule of metagpt_fast.testing: at most twice as far from the reference run one precision up
(float32 for half precisions, float64 for float32) as the reference run in the kernel's own precision, plus the
float32-angle allowance of the sinusoid and rotary (``float32_angle_error``: at most ``2 * pos * 2**-24`` rad, see
kernels/triton/positional.py). Skipped without a GPU; the interpreter tests in tests/test_triton_positional.py and
tests/test_triton_rotary.py cover the semantics on CPU.
"""

import pytest
import torch

from metagpt_fast.ops import reference
from metagpt_fast.ops.reference import dropout_keep_mask
from metagpt_fast.testing import assert_parity, float32_angle_error, oracle_dtype

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs in the GPU suite)"),
]
pytest.importorskip("triton")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BASE = 10000.0


def _ops():
    from metagpt_fast.backends.triton import positional as triton_positional

    return triton_positional


def _angle_slack(last_position, magnitude):
    # The float32 angle is off by float32_angle_error(pos) rad; an output moves by that much times its input magnitude.
    return magnitude * float32_angle_error(last_position)


def _check(name, fast, lowp, exact, slack=0.0):
    assert fast.dtype == lowp.dtype and torch.isfinite(fast).all(), name
    return assert_parity(fast, lowp, exact, name=name, extra=slack)


def _deterministic(flag):
    class _Context:
        def __enter__(self):
            self.previous = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(flag)

        def __exit__(self, *exc):
            torch.use_deterministic_algorithms(self.previous)

    return _Context()


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize(
    "b, t, d, vocab, offset, dropout_p",
    [(4, 1024, 768, 50257, 0, 0.0), (8, 512, 128, 256, 3000, 0.1), (2, 333, 100, 1000, 17, 0.0)],
)
def test_embed_positions(b, t, d, vocab, offset, dropout_p, dtype, deterministic):
    dtype = DTYPES[dtype]
    tokens = torch.randint(0, vocab, (b, t), device="cuda")
    weight = torch.randn(vocab, d, device="cuda")
    grad = torch.randn(b, t, d, device="cuda")
    seed = torch.tensor([4321], dtype=torch.int64, device="cuda") if dropout_p else None
    keep = dropout_keep_mask(seed, (b, t, d), dropout_p, "cuda") if dropout_p else None
    scale = d**0.5

    def run(fn, dt, **kwargs):
        w = weight.to(dt).requires_grad_()
        out = fn(tokens, w, scale, offset, dropout_p, True, **kwargs)
        return [out.detach(), *torch.autograd.grad(out, w, grad.to(dt))]

    with _deterministic(deterministic):
        fast = run(_ops().embed_positions, dtype, seed=seed)
    lowp = run(reference.embed_positions, dtype, dropout_mask=keep)
    exact = run(reference.embed_positions, oracle_dtype(dtype), dropout_mask=keep)
    gain = 1.0 / (1.0 - dropout_p)
    _check("out", fast[0], lowp[0], exact[0], _angle_slack(offset + t - 1, gain))
    _check("dW", fast[1], lowp[1], exact[1])


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("b, t, d, offset, dropout_p", [(8, 2048, 1024, 0, 0.0), (2, 4096, 96, 8000, 0.2)])
def test_add_positional_encoding(b, t, d, offset, dropout_p, dtype):
    dtype = DTYPES[dtype]
    x = torch.randn(b, d, t, device="cuda").transpose(1, 2)  # strided (B, T, d)
    grad = torch.randn(b, t, d, device="cuda")
    seed = torch.tensor([99], dtype=torch.int64, device="cuda") if dropout_p else None
    keep = dropout_keep_mask(seed, (b, t, d), dropout_p, "cuda") if dropout_p else None

    def run(fn, dt, **kwargs):
        xi = x.to(dt).requires_grad_()
        out = fn(xi, offset, dropout_p, **kwargs)
        return [out.detach(), *torch.autograd.grad(out, xi, grad.to(dt))]

    fast = run(_ops().add_positional_encoding, dtype, seed=seed)
    lowp = run(reference.add_positional_encoding, dtype, dropout_mask=keep)
    exact = run(reference.add_positional_encoding, oracle_dtype(dtype), dropout_mask=keep)
    _check("out", fast[0], lowp[0], exact[0], _angle_slack(offset + t - 1, 1.0 / (1.0 - dropout_p)))
    _check("dx", fast[1], lowp[1], exact[1])


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize(
    "b, hq, hk, t, d, rotary_dim, positions",
    [(4, 32, 8, 2048, 128, 128, "offset"), (2, 16, 16, 1000, 256, 256, "BT"), (3, 12, 4, 777, 80, 32, "T")],
)
def test_rotary(b, hq, hk, t, d, rotary_dim, positions, interleaved, dtype):
    dtype = DTYPES[dtype]
    qkv = torch.randn(b, t, hq + 2 * hk, d, device="cuda")  # fused projection layout, strided views
    q, k = qkv[:, :, :hq].transpose(1, 2), qkv[:, :, hq : hq + hk].transpose(1, 2)
    if positions == "offset":
        position_ids, offset, last = None, 100, 100 + t - 1
    else:
        shape = (b, t) if positions == "BT" else (t,)
        position_ids, offset = torch.randint(0, 32768, shape, device="cuda"), 0
        last = int(position_ids.max())
    grads = [torch.randn(b, h, t, d, device="cuda") for h in (hq, hk)]

    def run(fn, dt, **kwargs):
        qi, ki = (x.to(dt).requires_grad_() for x in (q, k))
        outs = fn(qi, ki, position_ids, offset, rotary_dim, BASE, interleaved, **kwargs)
        return [o.detach() for o in outs] + list(torch.autograd.grad(outs, (qi, ki), [g.to(dt) for g in grads]))

    fast = run(_ops().rotary, dtype, inplace=False)
    lowp = run(reference.apply_rotary, dtype)
    exact = run(reference.apply_rotary, oracle_dtype(dtype))
    magnitude = 2 * max(x.abs().max().item() for x in (q, k, *grads))
    for name, f, lo, ex in zip(("q_out", "k_out", "dq", "dk"), fast, lowp, exact):
        _check(name, f, lo, ex, _angle_slack(last, magnitude))


def test_inplace_rotary_matches_out_of_place():
    qkv = torch.randn(2, 300, 12, 64, device="cuda", dtype=torch.bfloat16)
    q, k = qkv[:, :, :8].transpose(1, 2), qkv[:, :, 8:].transpose(1, 2)
    expected = _ops().rotary(q, k, None, 5, 32, BASE, False, False)
    rest = qkv[..., 32:].clone()
    _ops().rotary(q, k, None, 5, 32, BASE, False, True)
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1]) and torch.equal(qkv[..., 32:], rest)


def test_deterministic_embedding_backward_is_bitwise_repeatable():
    # Byte-level text: a few ids (space, 'e') hold a large share of 64 * 256 rows, runs span hundreds of chunks.
    probs = torch.full((256,), 1.0, device="cuda")
    probs[32], probs[101] = 2000.0, 800.0
    tokens = torch.multinomial(probs, 64 * 256, replacement=True).view(64, 256)
    grad = torch.randn(64, 256, 384, device="cuda", dtype=torch.bfloat16)
    seed = torch.tensor([7], dtype=torch.int64, device="cuda")
    from metagpt_fast.kernels.triton import positional as kernels

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


def test_custom_ops_pass_opcheck():
    ops = torch.ops.metagpt_fast
    tokens = torch.randint(0, 50, (2, 33), device="cuda")
    weight = torch.randn(50, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    seed = torch.tensor([3], dtype=torch.int64, device="cuda")
    torch.library.opcheck(ops.triton_embed_positions.default, (tokens, weight, 8.0, 4, 0.1, True, seed))
    x = torch.randn(2, 33, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(ops.triton_add_positional_encoding.default, (x, 4, 0.1, seed))
    q = torch.randn(2, 4, 33, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 2, 33, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(ops.triton_rotary.default, (q, k, None, 3, 32, BASE, True, False))
    ids = torch.randint(0, 100, (2, 33), device="cuda")
    torch.library.opcheck(ops.triton_rotary_.default, (q.detach().clone(), k.detach().clone(), ids, 0, 64, BASE, False))


def test_torch_compile_fullgraph():
    ops = _ops()
    tokens = torch.randint(0, 100, (2, 64), device="cuda")
    weight = torch.randn(100, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    seed = torch.tensor([11], dtype=torch.int64, device="cuda")

    def step(weight):
        x = ops.embed_positions(tokens, weight, 2.0, 0, 0.1, False, seed)
        x = ops.add_positional_encoding(x, 3, 0.1, seed)
        qk = x.view(2, 64, 4, 32).transpose(1, 2)
        q, k = ops.rotary(qk, qk * 2, None, 0, 32, BASE, False, False)
        return (q.float() * k.float()).sum()

    loss_eager = step(weight)
    grad_eager = torch.autograd.grad(loss_eager, weight)[0]
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(weight)
    grad = torch.autograd.grad(loss, weight)[0]
    torch.testing.assert_close(loss, loss_eager)
    torch.testing.assert_close(grad, grad_eager)
