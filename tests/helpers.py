"""Helpers shared by several test modules: which backends run here and on which device, skip marks, and the
output-and-gradient comparison of the C++ / CUDA kernel tests.

A plain module, imported as ``from helpers import ...``: tests/ has no ``__init__.py``, so pytest's default
("prepend") import mode puts tests/ on ``sys.path`` when it loads tests/conftest.py, as for hypothesis_profiles.
Test modules import it after conftest.py has set TRITON_INTERPRET, so ``TRITON_INTERPRETED`` sees that setting.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import metagpt_fast
from metagpt_fast import _spec, backends
from metagpt_fast.testing import assert_parity

# -------------------------------------------------------------------------------------------------------- backends

AVAILABLE_BACKENDS = [name for name, reason in metagpt_fast.available_backends().items() if reason is None]
"""Names of the backends that can run in this process (``available_backends()`` gives no reason against them)."""

TRITON_INTERPRETED = _spec.triton_interpreted()
"""Whether Triton kernels run under the interpreter (on CPU tensors) rather than compiled for a GPU."""

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs in the GPU suite)")
"""Skip mark of the tests that need a CUDA GPU (they also carry the ``gpu`` marker the GPU suite selects by)."""

_DEVICES = {impl.backend: impl.devices[0] for op in backends.ops() for impl in backends.implementations(op)}


def device_for(backend: str) -> str:
    """The device a backend's inputs live on here (its first declared device; the reference runs on CPU)."""
    return "cpu" if backend == "reference" else _DEVICES[backend]


def implementation(op: str, backend: str) -> backends.Implementation:
    """``backend``'s implementation of ``op`` (it must be available here)."""
    (impl,) = [impl for impl in backends.implementations(op) if impl.backend == backend]
    return impl


def implements(op: str, backend: str) -> bool:
    """Whether ``backend`` can run here and has an implementation of ``op``."""
    return any(impl.backend == backend for impl in backends.implementations(op))


def backend_params(op: str) -> list:
    """One ``pytest.param`` per available backend, skipped ("<backend> has no <op>") where it does not implement
    ``op``."""
    return [
        pytest.param(b, marks=pytest.mark.skipif(not implements(op, b), reason=f"{b} has no {op}"))
        for b in AVAILABLE_BACKENDS
    ]


def cpu_backend_params(triton_skip_reason: str) -> list:
    """One ``pytest.param`` per available backend that runs CPU tensors here (the reference, the cpu kernels, and
    Triton only under the interpreter, where it is skipped with ``triton_skip_reason``: that test runs on a GPU)."""
    params = []
    for name in AVAILABLE_BACKENDS:
        if device_for(name) != "cpu":
            continue
        marks = [pytest.mark.skip(reason=triton_skip_reason)] if name == "triton" else []
        params.append(pytest.param(name, marks=marks))
    return params


@contextlib.contextmanager
def backend_or_skip(name: str):
    """Runs the block with backend ``name``; skips when that backend declares these inputs unsupported."""
    with metagpt_fast.use_backend(name):
        try:
            yield
        except ValueError as exc:
            if "cannot run" in str(exc):
                pytest.skip(f"{name}: {exc}")
            raise


# ------------------------------------------------------------------------------- kernel ops against the reference


def grad_leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Detached copies of ``tensors`` that require grad: fresh leaves for one run of an op."""
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def outputs_and_grads(fn, inputs, device: str = "cpu") -> list[torch.Tensor]:
    """Outputs of ``fn(*inputs)`` and the gradients of the inputs that require grad, for a fixed random upstream
    gradient (seed 7, drawn on ``device``)."""
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator(device=device).manual_seed(7)
    grads_out = [torch.randn(o.shape, generator=gen, device=device).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], grads_out)
    return [o.detach() for o in outs] + list(grads)


def assert_all_parity(fast_outs, lowp_outs, fp32_outs, names) -> None:
    """The parity rule for each of ``names``: the fast result against the reference in the same precision (``None``
    in float32) and in float32."""
    for name, fast, lowp, exact in zip(names, fast_outs, lowp_outs, fp32_outs, strict=True):
        assert fast is not None, f"{name}: no gradient"
        assert_parity(fast, lowp.to(fast.dtype) if lowp is not None else None, exact, name=name)


def check_against_reference(fast, ref, inputs, names, device: str = "cpu") -> None:
    """Runs ``fast`` and ``ref`` on ``inputs`` (all of one dtype) and, for ref, on their float32 copies; asserts the
    parity rule for every output and input gradient, named ``names`` in that order."""
    dtype = inputs[0].dtype
    got = outputs_and_grads(fast, grad_leaves(*inputs), device)
    lowp = outputs_and_grads(ref, grad_leaves(*inputs), device) if dtype != torch.float32 else [None] * len(names)
    exact = outputs_and_grads(ref, grad_leaves(*(t.float() for t in inputs)), device)
    assert_all_parity(got, lowp, exact, names)
