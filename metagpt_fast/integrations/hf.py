"""Hugging Face transformers integration: ``attn_implementation="metagpt_fast"`` and a fused rotary patch.

Attention (any model that dispatches through transformers' ``AttentionInterface``: GPT-2, Llama, Mistral, Qwen2...)::

    from metagpt_fast.integrations import hf
    hf.register()                                    # once per process
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="metagpt_fast")

``register`` adds the attention function and, for masks, the boolean SDPA-style mask builder under the same name:
padding masks arrive as ``(B, 1, Nq, Nk)`` booleans, pure causal batches as ``None`` + ``is_causal``, and
grouped-query attention runs on the un-repeated key/value heads (``enable_gqa``). Softcapping and attention sinks
are not supported (a clear error). Padded query rows (every key masked) give 0 where ``eager`` gives a uniform
average; those positions are padding and excluded from any loss.

Rotary (Liger-style module patch for Llama-family modeling files)::

    hf.patch_rotary("llama")      # before or after building the model; hf.unpatch_rotary("llama") undoes it

The model's rotary embedding then returns the positions instead of cos/sin tables, and ``apply_rotary_pos_emb``
rotates queries and keys with :func:`metagpt_fast.apply_rotary` (angles computed in the kernel). Only plain RoPE
(``rope_type="default"``, no attention scaling) is fused; scaled variants (linear, dynamic, YaRN, Llama 3...) keep
transformers' own tables and math.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import torch
from torch import nn

from metagpt_fast.ops import apply_rotary, scaled_dot_product_attention

NAME = "metagpt_fast"


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``query`` ``(B, Hq, Nq, D)``, ``key``/``value`` ``(B, Hk, Nk, D)``
    → ``(B, Nq, Hq, D)`` output and no weights."""
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"attn_implementation={NAME!r} does not support {unsupported!r}; use 'eager'")
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(query.dtype)
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    # A single query (decoding) sees the whole cache; a mask, when given, already holds the causal pattern.
    is_causal = bool(is_causal) and attention_mask is None and query.shape[2] > 1
    if is_causal and key.shape[2] > query.shape[2]:  # prefill into an empty static cache: the rest is unused
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    out = scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> None:
    """Registers ``name`` with transformers' ``AttentionInterface`` (and its mask interface); idempotent."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, attention_forward)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:  # older transformers build masks without a registry
        return
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@dataclasses.dataclass(frozen=True)
class RotaryPositions:
    """What a patched rotary embedding returns in place of ``cos``: the positions and the RoPE parameters."""

    position_ids: torch.Tensor  # (B, T) or (1, T) integer positions
    rotary_dim: int
    base: float


_originals: dict[str, tuple[type, Any, Any]] = {}


def _modeling_module(model_type: str):
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def _rotary_class(module) -> type:
    classes = [
        obj
        for name, obj in vars(module).items()
        if name.endswith("RotaryEmbedding") and isinstance(obj, type) and obj.__module__ == module.__name__
    ]
    if len(classes) != 1 or not hasattr(module, "apply_rotary_pos_emb"):
        raise ValueError(f"{module.__name__} does not have one rotary embedding class and apply_rotary_pos_emb")
    return classes[0]


def _rope_base(config) -> float | None:
    params = getattr(config, "rope_parameters", None)  # transformers >= 5
    if isinstance(params, dict):
        base = params.get("rope_theta")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            return None
    else:
        base = getattr(config, "rope_theta", None)
        if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
            return None
    return float(base) if isinstance(base, (int, float)) else None


def _fusable(rotary: nn.Module) -> tuple[int, float] | None:
    """``(rotary_dim, base)`` when ``rotary`` computes plain RoPE that the fused op reproduces, else None.

    Decided from the configuration only (no tensor reads), so it traces under torch.compile.
    """
    if getattr(rotary, "rope_type", "default") != "default":
        return None
    if float(getattr(rotary, "attention_scaling", 1.0) or 1.0) != 1.0:
        return None
    base = _rope_base(getattr(rotary, "config", None))
    inv_freq = getattr(rotary, "inv_freq", None)
    if base is None or not isinstance(inv_freq, torch.Tensor):
        return None
    return 2 * inv_freq.shape[-1], base


def patch_rotary(model_type: str = "llama") -> None:
    """Routes ``transformers.models.<model_type>``'s RoPE through :func:`metagpt_fast.apply_rotary` (idempotent)."""
    module = _modeling_module(model_type)
    if model_type in _originals:
        return
    rotary_cls = _rotary_class(module)
    original_forward, original_apply = rotary_cls.forward, module.apply_rotary_pos_emb

    def forward(self, x, position_ids, *args, **kwargs):
        spec = _fusable(self)
        if spec is None or position_ids is None or args or kwargs:
            return original_forward(self, x, position_ids, *args, **kwargs)
        return RotaryPositions(position_ids, *spec), None

    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        if not isinstance(cos, RotaryPositions):
            return original_apply(q, k, cos, sin, *args, **kwargs)
        if args or kwargs.get("unsqueeze_dim", 1) != 1 or q.dim() != 4 or q.shape[-1] != cos.rotary_dim:
            raise ValueError(
                f"fused rotary expects (B, H, T, {cos.rotary_dim}) queries and unsqueeze_dim=1; "
                f"call metagpt_fast.integrations.hf.unpatch_rotary({model_type!r}) for this model"
            )
        return apply_rotary(q, k, cos.position_ids, rotary_dim=cos.rotary_dim, base=cos.base)

    forward.__wrapped__ = original_forward
    _originals[model_type] = (rotary_cls, original_forward, original_apply)
    rotary_cls.forward = forward
    module.apply_rotary_pos_emb = apply_rotary_pos_emb


def unpatch_rotary(model_type: str = "llama") -> None:
    """Undoes :func:`patch_rotary` for ``model_type`` (no-op if it is not patched)."""
    if model_type not in _originals:
        return
    rotary_cls, original_forward, original_apply = _originals.pop(model_type)
    rotary_cls.forward = original_forward
    _modeling_module(model_type).apply_rotary_pos_emb = original_apply
