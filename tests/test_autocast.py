"""Under torch.autocast the model's attention runs in the autocast dtype; results obey the parity rule:
``max|fast - exact| <= 2 * max|reference under autocast - exact| + atol``, for outputs and every gradient.

CPU: bfloat16 autocast with the reference and cpu backends. Interpreted Triton is left out in bfloat16 (the
interpreter multiplies bf16 bit patterns in tl.dot; docs/testing.md); the GPU variants cover float16 and bfloat16.

The positional ops (embed_positions, add_positional_encoding, apply_rotary) do not follow autocast, like torch's
F.embedding and elementwise arithmetic: they compute in their input's dtype, with or without autocast, on every
backend (docs/reliability.md).
"""

import copy

import pytest
import torch
from helpers import AVAILABLE_BACKENDS, cpu_backend_params, device_for, implements, requires_cuda
from torch import nn

import metagpt_fast
from metagpt_fast.nn import MultiheadAttention
from metagpt_fast.testing import assert_parity


def cpu_backends():
    """Backends that run the CPU model here (Triton only under the interpreter, and then skipped)."""
    return cpu_backend_params("the Triton interpreter computes bf16 tl.dot wrongly (GPU suite)")


def assert_rule(fast, lowp, exact, dtype, name):
    """The parity rule for the results of a ``dtype`` autocast computation, also those held in float32 (losses,
    parameter gradients): the floor is ``dtype``'s."""
    assert_parity(fast, lowp, exact, name=f"{name} ({dtype} autocast)", dtype=dtype)


def metagpt_run(model, idx, device, dtype):
    model.zero_grad()
    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        logits, loss = model(idx, idx)
    loss.backward()
    return [logits.detach(), loss.detach()] + [p.grad.clone() for p in model.parameters()]


def check_metagpt(backend, positional, device, dtype):
    torch.manual_seed(0)
    model = metagpt_fast.MetaGPT(64, 32, 2, 4, 0.0, 32, positional=positional, backend="reference").to(device)
    idx = torch.randint(0, 64, (2, 17), device=device)
    exact = metagpt_run(copy.deepcopy(model).double(), idx, device, None)
    lowp = metagpt_run(model, idx, device, dtype)
    model.set_backend(backend)
    fast = metagpt_run(model, idx, device, dtype)
    assert fast[0].dtype == dtype  # the LM head ran under autocast
    names = ["logits", "loss"] + [n for n, _ in model.named_parameters()]
    for name, f, lo, ex in zip(names, fast, lowp, exact, strict=True):
        assert_rule(f, lo, ex, dtype, name)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("positional", ["sinusoidal", "rotary"])
def test_metagpt_bf16_autocast_cpu(backend, positional):
    check_metagpt(backend, positional, "cpu", torch.bfloat16)


def mha_run(module, x, padding, mask, device, dtype):
    module.zero_grad()
    x = x.detach().clone().requires_grad_()
    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        out, _ = module(x, x, x, key_padding_mask=padding, attn_mask=mask, need_weights=False)
    out.float().sum().backward()
    return [out.detach(), x.grad] + [p.grad.clone() for p in module.parameters()]


def check_multihead(backend, device, dtype):
    torch_mha = nn.MultiheadAttention(32, 4, batch_first=True).to(device)
    x = torch.randn(2, 13, 32, device=device)
    padding = torch.arange(13, device=device)[None, :] >= torch.tensor([13, 6], device=device)[:, None]
    mask = torch.randn(13, 13, device=device)  # float32 additive mask: cast to the autocast dtype inside
    exact = mha_run(copy.deepcopy(torch_mha).double(), x.double(), padding, mask.double(), device, None)
    lowp = mha_run(torch_mha, x, padding, mask, device, dtype)
    ours = MultiheadAttention(32, 4, batch_first=True, backend=backend).to(device)
    ours.load_state_dict(torch_mha.state_dict())
    fast = mha_run(ours, x, padding, mask, device, dtype)
    assert fast[0].dtype == lowp[0].dtype == dtype
    names = ["output", "d_input"] + [n for n, _ in ours.named_parameters()]
    for name, f, lo, ex in zip(names, fast, lowp, exact, strict=True):
        assert_rule(f, lo, ex, dtype, name)


@pytest.mark.parametrize("backend", cpu_backends())
def test_multihead_attention_bf16_autocast_cpu(backend):
    check_multihead(backend, "cpu", torch.bfloat16)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in AVAILABLE_BACKENDS if b != "cpu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_autocast_on_gpu(backend, dtype):
    check_metagpt(backend, "rotary", "cuda", dtype)
    check_multihead(backend, "cuda", dtype)


@pytest.mark.parametrize("backend", cpu_backends())
def test_public_attention_follows_autocast_dtype_like_torch(backend):
    q, k, v = (torch.randn(2, 2, 9, 16, requires_grad=True) for _ in range(3))
    mask = torch.randn(9, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        got = metagpt_fast.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend)
    assert got.dtype == expected.dtype == torch.bfloat16
    exact = metagpt_fast.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask.double(), backend="reference"
    )
    assert_rule(got, expected, exact, torch.bfloat16, "autocast output")
    got.float().sum().backward()
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()


def _run(fn, inputs):
    """Outputs of ``fn(*inputs)`` and the gradients of their sum with respect to ``inputs``."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return list(outs) + list(torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs]))


POSITIONAL_CALLS = {
    "embed_positions": lambda b, t, w, x, q, k: _run(
        lambda w: metagpt_fast.embed_positions(t, w, 4.0, offset=3, backend=b), [w]
    ),
    "add_positional_encoding": lambda b, t, w, x, q, k: _run(
        lambda x: metagpt_fast.add_positional_encoding(x, offset=3, backend=b), [x]
    ),
    "rotary": lambda b, t, w, x, q, k: _run(lambda q, k: metagpt_fast.apply_rotary(q, k, offset=3, backend=b), [q, k]),
}


@pytest.mark.parametrize("op", list(POSITIONAL_CALLS))
@pytest.mark.parametrize(
    ("dtype", "autocast_dtype"),
    [(torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16)],
    ids=["fp32-under-bf16", "fp32-under-fp16", "bf16-under-bf16"],
)
@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_positional_ops_keep_their_dtype_under_autocast_like_torch(op, dtype, autocast_dtype, backend):
    if not implements(op, backend):
        pytest.skip(f"{backend} has no {op}")
    device = device_for(backend)
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (2, 7), generator=gen).to(device)
    shapes = [(11, 16), (2, 7, 16), (2, 3, 7, 16), (2, 1, 7, 16)]  # weight, x, q, k
    tensors = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    plain = POSITIONAL_CALLS[op](backend, tokens, *tensors)
    with torch.autocast(device, dtype=autocast_dtype):
        # torch's own embedding lookup and elementwise arithmetic keep their input's dtype under autocast too.
        assert torch.nn.functional.embedding(tokens, tensors[0]).dtype == dtype
        assert (tensors[1] + tensors[1]).dtype == dtype
        autocast = POSITIONAL_CALLS[op](backend, tokens, *tensors)
    for a, b in zip(autocast, plain, strict=True):
        assert a.dtype == b.dtype == dtype
        assert torch.equal(a, b)  # the same computation: autocast changes nothing
