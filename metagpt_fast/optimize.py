"""``optimize(model)``: swap the attention and positional-encoding modules of an existing model for fused ones.

``optimize(model)`` returns ``model`` itself (swapped in place); ``optimize(model, report=True)`` returns
``(model, report)``, the :class:`OptimizeReport` of what changed (``print(report)`` for a summary).

What is swapped, in place, anywhere in the module tree (``nn.Transformer``, ``nn.TransformerEncoder/Decoder``
included):

- every ``torch.nn.MultiheadAttention`` (exactly that class, not user subclasses) becomes
  :class:`metagpt_fast.nn.MultiheadAttention`: the same object, its class changed, so parameters, hooks, optimizer
  state and references to it are untouched;
- article-style ``PositionalEncoding`` modules (a class of that name adding a stored sinusoidal table to ``x``
  ``(B, T, d_model)``, with at most an ``nn.Dropout`` inside) become :class:`metagpt_fast.nn.PositionalEncoding`,
  which computes the table in the kernel. Detection is conservative: the module must have no parameters, and its
  output must match the package's on a probe input; its buffers are kept (unused) so state_dicts still load;
- every ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` becomes :class:`metagpt_fast.nn.LayerNorm` / ``RMSNorm`` (class
  changed in place), and Hugging Face RMSNorm classes (``LlamaRMSNorm`` & co., checked on a probe) get a subclass
  whose forward runs :func:`metagpt_fast.rms_norm` (``metagpt_fast.integrations.norms``);
- modules of this package pinned to the ``reference`` backend are pointed at the requested backend (with an explicit
  ``backend=``, every module of the package is).

``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` have an inference fast path that reads the attention
weights and calls torch's fused kernel directly, bypassing the attention module (and converting padded batches to
nested tensors). For layers whose attention was swapped that path is switched off through the two attributes it
checks: ``layer.activation_relu_or_gelu = 0`` (read only by the fast path) and ``encoder.use_nested_tensor = False``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, TypeVar, overload

import torch
from torch import nn

from metagpt_fast import backends
from metagpt_fast.integrations import norms
from metagpt_fast.nn.multihead import MultiheadAttention
from metagpt_fast.nn.positional import PositionalEncoding
from metagpt_fast.ops.reference.positional import add_positional_encoding as reference_add_positional_encoding
from metagpt_fast.testing import float32_angle_error

M = TypeVar("M", bound=nn.Module)

_D_MODEL_NAMES = ("d_model", "embed_size", "embed_dim", "embedding_dim", "hidden_size", "dim")
_MAX_LEN_NAMES = ("max_seq_length", "max_seq_len", "max_len", "max_length", "max_position_embeddings")
_PROBE_LENGTH = 64
# Probe tolerance per table dtype. A table built with float32 math (the usual tutorial code, then maybe cast to
# float64) has the float32 angle error of metagpt_fast.testing.float32_angle_error, its inverse frequency a few ulps
# further off than the kernels' correctly rounded one: measured up to 0.8x that bound at 64 positions, widths 16 to
# 4096. 8x leaves room and stays near 6e-5, while any other encoding is off by O(1). float16 / bfloat16 round the
# table entry and the sum x + PE once each, at |x + PE| up to ~5: 4e-3 and 3e-2.
_ANGLE_ATOL = 8 * float32_angle_error(_PROBE_LENGTH - 1)
_PROBE_ATOL = {torch.float64: _ANGLE_ATOL, torch.float32: _ANGLE_ATOL, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclasses.dataclass
class OptimizeReport:
    """What :func:`optimize` changed. ``str(report)`` is a readable summary."""

    backend: str
    swapped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (name, old class, new class)
    retargeted: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (name, old, new backend)
    fastpath_disabled: list[str] = dataclasses.field(default_factory=list)  # torch layers / encoders
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, why it was left alone)

    def __len__(self) -> int:
        return len(self.swapped) + len(self.retargeted)

    def __str__(self) -> str:
        lines = [
            f"metagpt_fast.optimize(backend={self.backend!r}): {len(self.swapped)} swapped, "
            f"{len(self.retargeted)} retargeted, {len(self.skipped)} skipped"
        ]
        lines += [f"  swapped     {name or '<root>'}: {old} -> {new}" for name, old, new in self.swapped]
        lines += [f"  retargeted  {name or '<root>'}: backend {old} -> {new}" for name, old, new in self.retargeted]
        lines += [
            f"  fast path   {name or '<root>'}: torch's inference fast path off" for name in self.fastpath_disabled
        ]
        lines += [f"  skipped     {name or '<root>'}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


@overload
def optimize(model: M, backend: str = ..., *, report: Literal[False] = ...) -> M: ...
@overload
def optimize(model: M, backend: str = ..., *, report: Literal[True]) -> tuple[M, OptimizeReport]: ...


def optimize(model: M, backend: str = "auto", *, report: bool = False) -> M | tuple[M, OptimizeReport]:
    """Swaps, in place, the modules of ``model`` that have fused equivalents; returns ``model``.

    Like ``torch.compile`` and ``ipex.optimize``, so ``model = metagpt_fast.optimize(model)`` keeps the model.

    Arguments:
        model: any ``nn.Module``; it is modified in place (parameters are shared, never copied).
        backend: ``"auto"`` (fastest backend per call) or a backend name, which must be available here.
        report: also return an :class:`OptimizeReport` listing swapped, retargeted and skipped modules.

    Returns:
        ``model`` (the same object), or ``(model, report)`` with ``report=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if backend != "auto":
        if backend not in backends.BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {backends.BACKENDS}, got {backend!r}")
        reason = backends.available_backends()[backend]
        if reason is not None:
            raise ValueError(f"backend {backend!r} is unavailable: {reason}")
    module_backend = None if backend == "auto" else backend
    changes = _swap(model, backend, module_backend)
    return (model, changes) if report else model


def _swap(model: nn.Module, backend: str, module_backend: str | None) -> OptimizeReport:
    report = OptimizeReport(backend)

    # Collect first, then mutate: the tree must not change while it is walked.
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for child_name, child in parent.named_children():
            parents.setdefault(id(child), []).append((parent, child_name))
    entries = list(model.named_modules())

    for name, module in entries:
        if type(module) is nn.MultiheadAttention:
            module.__class__ = MultiheadAttention
            module.backend = module_backend
            report.swapped.append((name, "torch.nn.MultiheadAttention", "metagpt_fast.nn.MultiheadAttention"))
        elif type(module) in norms.TORCH_NORMS:
            report.swapped.append((name, *norms.swap_torch_norm(module, module_backend)))
        elif norms.is_hf_rms_norm(module):
            old = _qualname(module)
            why_not = norms.swap_hf_rms_norm(module, module_backend)
            if why_not:
                report.skipped.append((name, why_not))
            else:
                report.swapped.append((name, old, _qualname(module)))
        elif _is_article_positional_encoding(module):
            new, why_not = _fused_positional_encoding(module, module_backend)
            if new is None:
                report.skipped.append((name, why_not))
            elif id(module) not in parents:
                report.skipped.append((name, "PositionalEncoding is the model itself; cannot replace it in place"))
            else:
                for parent, child_name in parents[id(module)]:
                    setattr(parent, child_name, new)
                report.swapped.append((name, _qualname(module), "metagpt_fast.nn.PositionalEncoding"))
        elif type(module).__module__.startswith("metagpt_fast.") and hasattr(module, "backend"):
            _retarget(name, module, backend, module_backend, report)
        elif type(module).__module__.startswith("metagpt_fast.") and hasattr(
            getattr(module, "config", None), "backend"
        ):
            _retarget_config(name, module, backend, report)
        elif isinstance(module, nn.MultiheadAttention) and not isinstance(module, MultiheadAttention):
            report.skipped.append((name, f"{_qualname(module)} subclasses nn.MultiheadAttention; left as is"))

    for name, module in model.named_modules():
        swapped = isinstance(getattr(module, "self_attn", None), MultiheadAttention)
        if isinstance(module, nn.TransformerEncoderLayer) and swapped and module.activation_relu_or_gelu:
            module.activation_relu_or_gelu = 0
            report.fastpath_disabled.append(name)
        elif isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False):
            if any(isinstance(layer.self_attn, MultiheadAttention) for layer in module.layers):
                module.use_nested_tensor = False
                report.fastpath_disabled.append(name)
    return report


def _retarget(name: str, module: nn.Module, backend: str, module_backend: str | None, report: OptimizeReport) -> None:
    old = module.backend
    pinned_to_reference = old == "reference"
    if (backend == "auto" and not pinned_to_reference) or old == module_backend:
        return
    module.backend = module_backend
    report.retargeted.append((name, str(old or "auto"), backend))


def _retarget_config(name: str, module: nn.Module, backend: str, report: OptimizeReport) -> None:
    """MetaGPT keeps its backend in ``config.backend`` ("auto" rather than None)."""
    old = module.config.backend
    if (backend == "auto" and old != "reference") or old == backend:
        return
    module.config.backend = backend
    report.retargeted.append((name, old, backend))


def _qualname(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _is_article_positional_encoding(module: nn.Module) -> bool:
    return type(module).__name__ == "PositionalEncoding" and not type(module).__module__.startswith("metagpt_fast.")


def _first_int_attribute(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for attr in names:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _fused_positional_encoding(module: nn.Module, backend: str | None) -> tuple[nn.Module | None, str]:
    """The fused replacement for an article-style module, or ``(None, why not)``."""
    if any(True for _ in module.parameters()):
        return None, "PositionalEncoding has parameters (a learned encoding?)"
    children = list(module.children())
    if any(not isinstance(c, nn.Dropout) for c in children) or len(children) > 1:
        return None, "PositionalEncoding has submodules other than one nn.Dropout"
    dropout = children[0].p if children else 0.0
    tables = [b for b in module.buffers() if b.is_floating_point() and b.dim() in (2, 3)]
    if len(tables) > 1:
        return None, "PositionalEncoding has several table-like buffers"
    table = tables[0] if tables else None
    if table is not None and table.device.type == "meta":
        return None, "PositionalEncoding's table is on the meta device"
    d_model = _first_int_attribute(module, _D_MODEL_NAMES) or (table.shape[-1] if table is not None else None)
    max_len = _first_int_attribute(module, _MAX_LEN_NAMES) or (table.shape[-2] if table is not None else None)
    if d_model is None or max_len is None:
        return None, "PositionalEncoding: cannot tell d_model and max_seq_length"

    dtype = table.dtype if table is not None else torch.float32
    device = table.device if table is not None else torch.device("cpu")
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(2, min(max_len, _PROBE_LENGTH), d_model, generator=generator).to(device=device, dtype=dtype)
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            got = module(probe)
    except Exception as exc:  # the probe only decides whether to swap; any failure means "leave it alone"
        return None, f"PositionalEncoding failed on a (B, T, d_model) probe: {type(exc).__name__}: {exc}"
    finally:
        module.train(was_training)
    expected = reference_add_positional_encoding(probe)
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return None, "PositionalEncoding's output on a (B, T, d_model) probe does not have the input's shape"
    err = float((got.double() - expected.double()).abs().max())
    if not err <= _PROBE_ATOL.get(dtype, _ANGLE_ATOL):
        return None, f"PositionalEncoding's output differs from the sinusoidal encoding by {err:.2e} on a probe"

    new = PositionalEncoding(d_model, max_len, dropout, backend=backend)
    for buffer_name, buffer in module.named_buffers(recurse=False):  # kept so state_dicts still load
        new.register_buffer(buffer_name, buffer, persistent=buffer_name not in module._non_persistent_buffers_set)
    new.train(was_training)
    return new, ""
