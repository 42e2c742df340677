"""Input signatures: what a shape check or a backend's reasons can read of a call, as one hashable key.

A public op validates its arguments and asks the registry for an implementation on every call. For a small input
(one decode token: a 128-wide LayerNorm) that Python work costs several times the kernel. Every check that reads only
types, devices, dtypes, shapes, strides, ``requires_grad``, the grad mode and the scalar arguments gives the same
answer for the same :func:`signature`, so its result is kept in a :class:`Memo` under that key: the registry's
selection cache, and the ops' memos of their signature checks. Checks that read tensor values (token ids, cache
lengths, block tables) still run on every call.

:func:`signature` gives ``None`` (no caching: the full checks run) for anything it cannot summarise exactly: tensor
subclasses (``FakeTensor`` under ``torch.compile``, ``DTensor``, wrappers), nested and sparse tensors, containers of
non-scalars, unknown objects, and any call while ``torch.compile`` traces.
"""

from __future__ import annotations

import torch

# Tensors summarised by their metadata; any other subclass may change what its metadata means.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
# Scalars summarised by their type and value (the type keeps 1, 1.0 and True apart).
_SCALARS = frozenset((bool, int, float, str, torch.dtype, torch.device))
_SEQUENCES = frozenset((tuple, list, torch.Size))
_Tensor, _Parameter = _PLAIN_TENSORS
_STRIDED = torch.strided
_is_compiling, _is_grad_enabled = torch.compiler.is_compiling, torch.is_grad_enabled

MEMO_LIMIT = 4096  # entries per memo before it starts over (a training loop's varying lengths must not grow it)


def signature(*values) -> tuple | None:
    """A hashable key equal for two calls exactly when every value's type, and each tensor's device, dtype, shape,
    strides, ``requires_grad`` and identity among the values (aliasing) are equal, as are the scalars and the grad
    mode; ``None`` when a value cannot be summarised (see the module docstring).

    Written for speed (it runs on every call of every op, ~1 us for three tensors): one pass, no helper calls."""
    if _is_compiling():
        return None
    key = [_is_grad_enabled()]
    append = key.append
    seen: list[int] = []  # ids of the tensors so far: `q is k` is a reason for some kernels
    for value in values:
        kind = type(value)
        if kind is _Tensor or kind is _Parameter:
            if value.is_nested or value.layout is not _STRIDED:  # sparse / mkldnn: no strides to summarise
                return None
            i = id(value)
            alias = seen.index(i) if i in seen else len(seen)
            seen.append(i)
            append((kind, value.device, value.dtype, value.shape, value.stride(), value.requires_grad, alias))
        elif value is None:
            append(None)
        elif kind in _SCALARS:
            append((kind, value))
        elif kind in _SEQUENCES:
            types = tuple(map(type, value))
            if not _SCALARS.issuperset(types):
                return None
            append((kind, tuple(value), types))
        else:
            return None
    return tuple(key)


class Memo(dict):
    """A dict of results per signature, started over when it holds :data:`MEMO_LIMIT` entries."""

    def put(self, key, value):
        if len(self) >= MEMO_LIMIT:
            self.clear()
        self[key] = value
        return value
