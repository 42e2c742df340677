"""The ``cpu`` and ``cuda`` backends: the compiled ``torch.library`` ops of ``metagpt_fast._C`` (csrc/).

One op, two devices: each op's schema is declared once (in its C++ CPU file, ``csrc/cpu/``) with a CPU kernel, and
the CUDA kernels register for the same op (``csrc/attention/``, ``csrc/positional/``). One module per op here adds
what torch needs on the Python side (``register_fake`` for ``torch.compile``, the op's autograd formula from
:mod:`metagpt_fast.backends.autograd`) and registers the op with the ``cpu`` backend and, where the extension has
CUDA kernels and a GPU is visible, with the ``cuda`` backend. Importing this package loads the extension (building it
just in time if needed) and imports every op module, or records why the backends cannot run.
"""

from __future__ import annotations

import importlib
import pkgutil

import torch

from metagpt_fast import _extension
from metagpt_fast.backends import registry

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # float64 goes to the reference: the kernels compute in fp32


def has_cuda_kernel(op: str) -> bool:
    """Whether the loaded extension registered a CUDA kernel for ``metagpt_fast::<op>``."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"metagpt_fast::{op}", "CUDA")


def register(op, fn, extra_reasons=None, *, cpu, cuda=None):
    """Registers ``fn`` with the ``cpu`` backend and, if ``cuda`` is given, the ``cuda`` backend.

    Each of ``cpu`` / ``cuda`` is ``(priority, capabilities)``: a number or a function of the inputs, and a dict of
    :class:`~metagpt_fast.backends.registry.Capabilities` fields; the device and the dtypes (float32, bfloat16,
    float16) follow from the backend.
    """
    for backend, spec in (("cpu", cpu), ("cuda", cuda)):
        if spec is None:
            continue
        priority, caps = spec
        caps = registry.Capabilities(**{"devices": (backend,), "dtypes": DTYPES, **caps})
        registry.register(op, backend, fn, caps, extra_reasons, priority=priority)


def _cuda_unavailable_reason() -> str | None:
    if not _extension.has_cuda_kernels():
        return "the compiled extension has no CUDA kernels (built without CUDA: torch without CUDA or no nvcc)"
    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    return None


def _setup() -> None:
    if _extension.load() is None:
        reason = f"compiled extension unavailable: {_extension.unavailable_reason()}"
        registry.mark_unavailable("cpu", reason)
        registry.mark_unavailable("cuda", reason)
        return
    cuda_reason = _cuda_unavailable_reason()
    if cuda_reason is not None:
        registry.mark_unavailable("cuda", cuda_reason)
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_setup()
