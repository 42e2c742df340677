"""Helpers shared by several test modules: which backends run here and on which device (from the registry's public
``implementations()``), skip marks, and the output-and-gradient comparison of ``metagpt_fast.testing``.

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
from metagpt_fast.testing import (  # noqa: F401  (re-exported: the kernel tests import them from here)
    assert_all_parity,
    check_against_reference,
    grad_leaves,
    outputs_and_grads,
)

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


def interpreted_triton(op: str):
    """Skip mark of the tests that run ``op``'s Triton kernels under the interpreter (a machine without a GPU)."""
    return pytest.mark.skipif(
        not (TRITON_INTERPRETED and implements(op, "triton")),
        reason="interpreter tests: Triton runs under TRITON_INTERPRET=1 on a machine without a GPU",
    )


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


def kernel_params(op: str, cases: dict) -> list:
    """One ``pytest.param(backend, device, case)`` per fast implementation of ``op`` here (the registry's
    ``implementations``, less the reference), per device it takes, per case that ``cases[(backend, device)]`` (a dict
    id -> case) lists for it; id ``backend-device-case``. Params on a "cuda" device carry the ``gpu`` marker and skip
    without a GPU; a backend that cannot run here has no params."""
    params = []
    for impl in backends.implementations(op):
        if impl.backend == "reference":
            continue
        for device in impl.devices:
            marks = [pytest.mark.gpu, requires_cuda] if device == "cuda" else []
            for case_id, case in cases.get((impl.backend, device), {}).items():
                params.append(
                    pytest.param(impl.backend, device, case, marks=marks, id=f"{impl.backend}-{device}-{case_id}")
                )
    return params


def skip_unless_supported(op: str, backend: str, **inputs) -> backends.Implementation:
    """``backend``'s implementation of ``op``; skips the test with its reasons when it declares ``inputs``
    unsupported (bfloat16 under the Triton interpreter, for one)."""
    impl = implementation(op, backend)
    reasons = impl.not_supported_reasons(**inputs)
    if reasons:
        pytest.skip(f"{backend} cannot run these inputs: {'; '.join(reasons)}")
    return impl
