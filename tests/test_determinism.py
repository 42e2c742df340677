"""Determinism: repeated forward and backward passes give bitwise identical results on every available backend.

Attention is deterministic by default (no atomics in its backward: dK/dV of a GQA group are summed in a fixed
order), with and without ``torch.use_deterministic_algorithms(True)``; so are the positional ops. The embedding
backward (a scatter-add over token ids) runs its deterministic variant under ``use_deterministic_algorithms(True)``
and must match the reference there. Dropout is a counter-based stream: the same seed gives the same mask.
Collisions are made likely (GQA groups of 4, a vocabulary of 3 tokens) so that any order-dependent accumulation
shows on a GPU; on CPU the same tests pin the contract.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import backend_params, device_for

import metagpt_fast
from metagpt_fast.ops import reference
from metagpt_fast.testing import assert_parity

# Sizes: on a GPU, enough blocks for thousands of concurrent accumulations; on CPU (the Triton interpreter runs each
# program in NumPy: the GPU sizes took 110 s per test) just enough for several blocks per row.
ON_GPU = torch.cuda.is_available()
N = 300 if ON_GPU else 40  # sequence length
D = 64 if ON_GPU else 16  # head dim
TOKENS = (8, 257) if ON_GPU else (2, 21)  # (B, T) of the embedding test
B = 2 if ON_GPU else 1
RUNS = 3 if ON_GPU else 2


@contextlib.contextmanager
def deterministic(on: bool):
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def repeat(fn, runs: int = RUNS):
    """Runs ``fn`` (returning a list of tensors) ``runs`` times from the same torch seed; asserts bitwise equality."""
    results = []
    for _ in range(runs):
        torch.manual_seed(1234)  # the dropout seed is drawn from torch's generator
        results.append([t.detach().clone() for t in fn()])
    for run in results[1:]:
        for i, (a, b) in enumerate(zip(results[0], run, strict=True)):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(bits(a), bits(b)), f"result {i} differs between runs"
    return results[0]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t``: a bitwise, NaN-safe comparison (and -0.0 != 0.0)."""
    return t.contiguous().view(torch.uint8)


def inputs(shapes, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]


@pytest.mark.parametrize("backend", backend_params("attention"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", [False, True], ids=["default", "use_deterministic_algorithms"])
@pytest.mark.parametrize("variant", ["causal_gqa", "mask_dropout"])
def test_attention_backward_is_bitwise_repeatable(backend, dtype, mode, variant):
    device = device_for(backend)
    # 4 query heads per kv head: dK/dV sum over 4 x N rows.
    q, k, v, grad_out = inputs([(B, 8, N, D), (B, 2, N, D), (B, 2, N, D), (B, 8, N, D)], dtype, device)
    kwargs = dict(is_causal=True, enable_gqa=True)
    if variant == "mask_dropout":
        mask = torch.rand(B, 1, N, N, generator=torch.Generator().manual_seed(1)) < 0.7
        kwargs = dict(attn_mask=mask.to(device), dropout_p=0.3, enable_gqa=True)

    def step():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = metagpt_fast.scaled_dot_product_attention(*leaves, backend=backend, **kwargs)
        return [out, *torch.autograd.grad(out, leaves, grad_out)]

    with deterministic(mode):
        repeat(step)


@pytest.mark.parametrize("backend", backend_params("embed_positions"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_embedding_backward_under_use_deterministic_algorithms(backend, dtype):
    device = device_for(backend)
    (weight, grad_out) = inputs([(3, D), (*TOKENS, D)], dtype, device)
    # Every token is one of 3 ids: each row of dW sums a third of all positions (atomics would reorder them).
    tokens = torch.randint(0, 3, TOKENS, generator=torch.Generator().manual_seed(2)).to(device)

    def step():
        w = weight.clone().requires_grad_()
        out = metagpt_fast.embed_positions(tokens, w, 2.0, 3, 0.2, True, backend=backend)
        return [out, *torch.autograd.grad(out, (w,), grad_out)]

    with deterministic(True):
        out, dw = repeat(step)
    # The deterministic variant is still the right answer: the keep-mask is the one the output shows.
    keep = out != 0
    w = weight.double().requires_grad_()
    ref = reference.embed_positions(tokens, w, 2.0, 3, 0.2, True, dropout_mask=keep)
    (ref_dw,) = torch.autograd.grad(ref, (w,), grad_out.double())
    w_lo = weight.clone().requires_grad_()
    lo = reference.embed_positions(tokens, w_lo, 2.0, 3, 0.2, True, dropout_mask=keep)
    (lo_dw,) = torch.autograd.grad(lo, (w_lo,), grad_out)
    atol = 1e-5 * max(1.0, float(ref_dw.abs().max())) if dtype == torch.float32 else None
    assert_parity(dw, lo_dw, ref_dw, name="deterministic dW", atol=atol)


@pytest.mark.parametrize("backend", backend_params("add_positional_encoding"))
@pytest.mark.parametrize("mode", [False, True], ids=["default", "use_deterministic_algorithms"])
def test_add_positional_encoding_is_bitwise_repeatable(backend, mode):
    device = device_for(backend)
    x, grad_out = inputs([(3, N - 3, D + 5), (3, N - 3, D + 5)], torch.float32, device)

    def step():
        leaf = x.clone().requires_grad_()
        out = metagpt_fast.add_positional_encoding(leaf, 5, 0.25, backend=backend)
        return [out, *torch.autograd.grad(out, (leaf,), grad_out)]

    with deterministic(mode):
        repeat(step)


@pytest.mark.parametrize("backend", backend_params("rotary"))
@pytest.mark.parametrize("mode", [False, True], ids=["default", "use_deterministic_algorithms"])
def test_rotary_is_bitwise_repeatable(backend, mode):
    device = device_for(backend)
    q, k, gq, gk = inputs([(2, 4, N, D), (2, 2, N, D), (2, 4, N, D), (2, 2, N, D)], torch.float32, device)
    positions = torch.randint(0, 500, (2, N), generator=torch.Generator().manual_seed(3)).to(device)

    def step():
        leaves = [t.clone().requires_grad_() for t in (q, k)]
        outs = metagpt_fast.apply_rotary(*leaves, position_ids=positions, backend=backend)
        return [*outs, *torch.autograd.grad(outs, leaves, (gq, gk))]

    with deterministic(mode):
        repeat(step)
