"""Swapping norm layers of existing models for the package's kernels, in place (used by :func:`metagpt_fast.optimize`).

- ``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` (exactly those classes) become :class:`metagpt_fast.nn.LayerNorm` /
  :class:`metagpt_fast.nn.RMSNorm`, subclasses of theirs: the same object, its class changed, so parameters, hooks,
  optimizer state and state_dicts are untouched.
- Hugging Face RMSNorm classes (``LlamaRMSNorm``, ``MistralRMSNorm``, ``Qwen2RMSNorm``, ...: a class whose name ends
  in ``RMSNorm`` with a 1-D ``weight``, an ``eps`` or ``variance_epsilon`` and no submodules) get a subclass of their
  own class whose forward calls :func:`metagpt_fast.rms_norm`, so ``isinstance`` still holds. Detection is by
  behaviour as well as by name: the module's output on a probe must be ``weight * x / sqrt(mean(x^2) + eps)``
  (Gemma's ``(1 + weight)`` and any other variant is left alone, with the reason). A weight in another dtype than
  the input keeps Llama's semantics (normalise in float32, round to the input's dtype, multiply by the weight).
"""

from __future__ import annotations

import torch
from torch import nn

from metagpt_fast.nn.norm import LayerNorm, RMSNorm
from metagpt_fast.ops.norms import rms_norm

TORCH_NORMS: dict[type, type] = {nn.LayerNorm: LayerNorm, nn.RMSNorm: RMSNorm}
_EPS_NAMES = ("variance_epsilon", "eps", "epsilon")
# Probe tolerance per weight dtype: float32 results differ by reordered sums; float16 / bfloat16 by a rounding or two
# of values up to ~4 (the probe is standard normal).
_PROBE_ATOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 8e-3, torch.bfloat16: 6e-2}
_fused_classes: dict[type, type] = {}


def swap_torch_norm(module: nn.Module, backend: str | None) -> tuple[str, str] | None:
    """Swaps a ``torch.nn.LayerNorm`` / ``RMSNorm`` in place; returns (old, new) class names, None for other modules."""
    new = TORCH_NORMS.get(type(module))
    if new is None:
        return None
    old = type(module)
    module.__class__ = new
    module.backend = backend
    return f"torch.nn.{old.__name__}", f"metagpt_fast.nn.{new.__name__}"


def is_hf_rms_norm(module: nn.Module) -> bool:
    cls = type(module)
    return (
        cls.__name__.endswith("RMSNorm")
        and not cls.__module__.startswith(("metagpt_fast.", "torch."))
        and not isinstance(module, nn.RMSNorm)
    )


def _eps(module: nn.Module) -> float | None:
    for name in _EPS_NAMES:
        value = getattr(module, name, None)
        if isinstance(value, float | int) and not isinstance(value, bool) and value >= 0:
            return float(value)
    return None


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    eps = _eps(self)
    weight = self.weight
    if weight.dtype == hidden_states.dtype:
        return rms_norm(hidden_states, weight.shape, weight, eps, backend=self.backend)
    return weight * rms_norm(hidden_states, weight.shape, None, eps, backend=self.backend)


def _fused_class(cls: type) -> type:
    fused = _fused_classes.get(cls)
    if fused is None:
        fused = type(f"Fused{cls.__name__}", (cls,), {"forward": _fused_forward, "__module__": __name__})
        fused.__doc__ = f"{cls.__qualname__} whose forward runs metagpt_fast.rms_norm (swapped by optimize)."
        globals()[fused.__name__] = fused  # pickle finds the class by name in a process that has swapped one
        _fused_classes[cls] = fused
    return fused


def swap_hf_rms_norm(module: nn.Module, backend: str | None) -> str:
    """Swaps a Hugging Face RMSNorm in place after probing its forward; returns "" or why it was left alone."""
    weight = getattr(module, "weight", None)
    eps = _eps(module)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return f"{type(module).__name__} has no 1-D weight parameter"
    if eps is None:
        return f"{type(module).__name__} has no eps / variance_epsilon attribute"
    if any(True for _ in module.children()):
        return f"{type(module).__name__} has submodules"
    if weight.device.type == "meta" or not weight.is_floating_point():
        return f"{type(module).__name__}'s weight is on the meta device or not floating point"
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(2, 3, weight.shape[0], generator=generator).to(device=weight.device, dtype=weight.dtype)
    try:
        with torch.no_grad():
            got = module(probe)
    except Exception as exc:  # the probe only decides whether to swap; any failure means "leave it alone"
        return f"{type(module).__name__} failed on a probe: {type(exc).__name__}: {exc}"
    with torch.no_grad():
        x = probe.double()
        expected = weight.double() * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return f"{type(module).__name__}'s output on a probe does not have the input's shape"
    err = float((got.double() - expected).abs().max())
    if not err <= _PROBE_ATOL.get(weight.dtype, 1e-5):
        return f"{type(module).__name__} is not weight * x / rms(x) on a probe (max difference {err:.2e})"
    module.__class__ = _fused_class(type(module))
    module.backend = backend
    return ""
