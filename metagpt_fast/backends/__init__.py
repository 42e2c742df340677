"""Backends: the registry (:mod:`metagpt_fast.backends.registry`), and one module per (backend, op).

- ``registry.py``: ops, capabilities, selection (``auto`` / explicit / context / environment), explanations;
- ``autograd.py``: one autograd formula per op, fed by each backend's forward and backward custom ops;
- ``triton/<op>.py``: Triton custom ops over the kernels of ``metagpt_fast/kernels/triton/``;
- ``compiled/<op>.py``: the C++/CUDA extension's ops (csrc/), one op on two devices: the ``cpu`` and ``cuda``
  backends.

The reference implementations are registered by the op declarations in ``metagpt_fast/ops/``.
"""

from metagpt_fast.backends.registry import (
    BACKENDS,
    ENV_VAR,
    Capabilities,
    Implementation,
    OpSpec,
    available_backends,
    declare_op,
    explain,
    implementations,
    lookup,
    mark_unavailable,
    ops,
    register,
    registered,
    requested_backend,
    select,
    use_backend,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "Capabilities",
    "Implementation",
    "OpSpec",
    "available_backends",
    "declare_op",
    "explain",
    "implementations",
    "lookup",
    "mark_unavailable",
    "ops",
    "register",
    "registered",
    "requested_backend",
    "select",
    "use_backend",
]
