"""Hugging Face transformers integration: ``attn_implementation="metagpt_fast"`` and a fused rotary patch.

Attention (any model that dispatches through transformers' ``AttentionInterface``: GPT-2, Llama, Mistral, Qwen2...)::

    from metagpt_fast.integrations import hf
    hf.register()                                    # once per process
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="metagpt_fast")

``register`` adds the attention function and, for masks, the boolean SDPA-style mask builder under the same name:
padding masks arrive as ``(B, 1, Nq, Nk)`` booleans, pure causal batches as ``None`` + ``is_causal``, and
grouped-query attention runs on the un-repeated key/value heads (``enable_gqa``). Padded query rows (every key
masked) give 0 where ``eager`` gives a uniform average; those positions are padding and excluded from any loss.

Every keyword argument is honoured or refused, never dropped (docs/hf.md has the table): T5's ``position_bias``
is added to the scores (differentiably); ``sliding_window``, ``softcap`` and packed batches (``cu_seq_lens_*`` /
``max_length_*``, or sequences restarting in the ``position_ids`` of one row, as flash_attention_2 reads them) run
through :func:`metagpt_fast.flash_attn_func` / ``flash_attn_varlen_func`` (no dense mask for a window: the mask
builder skips it for unpadded batches, and hands over the ``(B, N)`` padding mask for padded ones, which are
unpadded into varlen sequences as flash_attention_2 does); ``output_attentions=True``, attention sinks, sparse
``indices`` and unknown names raise ``ValueError``. Models whose attention does not dispatch through
``AttentionInterface`` (BLOOM, MPT) fail on their first forward, unless patched with :func:`patch_alibi`
(:mod:`metagpt_fast.integrations.hf_alibi`), which runs their ALiBi attention on the varlen op.

Rotary (Liger-style module patch for modeling files with ``apply_rotary_pos_emb(q, k, cos, sin)``)::

    hf.patch_rotary("llama")      # before or after building the model; hf.unpatch_rotary("llama") undoes it

The model's rotary embedding then returns the positions instead of cos/sin tables, and ``apply_rotary_pos_emb``
rotates queries and keys with :func:`metagpt_fast.apply_rotary` (angles computed in the kernel), in the layout the
module's own function rotates (halves for Llama, Mistral, Qwen2...; interleaved pairs for Cohere, Cohere2), found
on a probe when patching. Modules with another contract (GPT-J) raise ``ValueError`` and are not touched. Only
plain RoPE (``rope_type="default"``, no attention scaling) is fused; scaled variants (linear, dynamic, YaRN,
Llama 3...) keep transformers' own tables and math.

Loss (Liger-style, any causal LM whose logits are its ``nn.Linear`` head's output, softcapped or not)::

    hf.patch_loss(model)          # with labels: the loss from the last hidden state, no (B, T, V) logits
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

import torch
from torch import nn

from metagpt_fast.integrations import hf_alibi
from metagpt_fast.integrations.hf_alibi import patch_alibi as patch_alibi
from metagpt_fast.integrations.hf_alibi import unpatch_alibi as unpatch_alibi
from metagpt_fast.ops import apply_rotary, linear_cross_entropy, scaled_dot_product_attention
from metagpt_fast.ops.flash import flash_attn_func, flash_attn_varlen_func
from metagpt_fast.ops.kvcache import flash_attn_with_kvcache

NAME = "metagpt_fast"


# Keyword arguments transformers' modeling code passes to attention functions (collected from the call sites of
# transformers 5.24 and the documented 4.57 signatures: ``sdpa_attention_forward``, ``flash_attention_forward``,
# ``TransformersKwargs``, ``FlashAttentionKwargs``). Every one is either honoured or refused; anything not listed
# raises when it is not None, so an argument that changes the math is never dropped.
#
# Honoured: ``dropout``, ``scaling``, ``is_causal`` (parameters), ``position_bias`` (T5 family: an additive float
# mask, differentiable), ``sliding_window`` (through the flash-attention op's window when no mask holds it),
# ``softcap`` and the packed-batch keywords ``cu_seq_lens_q/k``, ``max_length_q/k`` (parameters, through the
# flash-attention op), ``output_attentions`` when falsy.
# Informational (they do not change attention given the mask transformers built): the names below. ``position_ids``
# of packed sequences (one row whose positions restart) give the varlen boundaries, as in flash_attention_2; the
# block-diagonal mask transformers' sdpa mask builder makes for them is checked against them, not read.
_INFORMATIONAL = frozenset(
    {
        "position_ids",
        "use_cache",
        "cache_position",
        "output_hidden_states",
        "output_router_logits",
        "num_items_in_batch",
        "return_dict",
        "deterministic",  # flash-attn's deterministic backward: not of the result (the flash-op calls pass it on)
    }
)
# Refused with a reason when not None (nothing here implements them yet).
_UNSUPPORTED = {
    "s_aux": "attention sinks are not implemented by the kernels",
    "sinks": "attention sinks are not implemented by the kernels",
    "indices": "sparse attention over top-k key indices is not implemented",
    "block_indices": "block-sparse attention is not implemented",
    "seq_idx": "packed variable-length batches (seq_idx) are not implemented",
}


def _refuse(name: str, why: str) -> ValueError:
    return ValueError(f"attn_implementation={NAME!r} cannot honour {name}=...: {why}; use 'eager' (or 'sdpa')")


def _check_kwargs(kwargs: dict[str, Any]) -> None:
    for name, value in kwargs.items():
        if name in _INFORMATIONAL or value is None:
            continue
        if name == "output_attentions":
            if value:
                raise _refuse(name, "metagpt_fast never materialises the attention weights")
        elif name == "softcap" and not isinstance(value, torch.Tensor) and value == 0:
            continue  # flash-attn's convention: 0 means no softcapping
        elif name in _UNSUPPORTED:
            raise _refuse(name, _UNSUPPORTED[name])
        else:
            raise _refuse(name, "this keyword is unknown to the integration, so it might change the result")


def _check_sliding_window(window: int, attention_mask: torch.Tensor | None, key_length: int) -> None:
    """A window is accepted only when the attention needs no more than transformers already gave.

    transformers (>= 4.53) builds sliding-window masks through the mask interface registered under the
    implementation's name (here: the sdpa builder), so a window reaches the attention function either inside the
    mask, or with no mask at all when every key lies inside the window (``_ignore_causal_mask_sdpa`` skips the mask
    only when ``kv_length < sliding_window``). A window with no mask and more keys than it covers was not encoded
    anywhere: refused.
    """
    if attention_mask is None and key_length > window:
        raise _refuse(
            "sliding_window",
            f"no mask holds the window of {window} and there are {key_length} keys (windowed kernels are not "
            "implemented yet)",
        )


def _position_bias_mask(
    position_bias: torch.Tensor, attention_mask: torch.Tensor | None, is_causal: bool, nq: int, nk: int
) -> torch.Tensor:
    """``position_bias`` merged with the boolean/float mask (or the causal pattern) into one additive float mask,
    as transformers' sdpa integration does; it keeps its gradient, so the call is served by a backend that
    differentiates masks (the reference)."""
    min_value = torch.finfo(position_bias.dtype).min
    if attention_mask is None:
        if not is_causal:
            return position_bias
        causal = torch.ones(nq, nk, dtype=torch.bool, device=position_bias.device).tril()
        return position_bias.masked_fill(~causal, min_value)
    if attention_mask.dtype == torch.bool:
        return position_bias.masked_fill(~attention_mask, min_value)
    return position_bias + attention_mask


def _softcap_value(softcap) -> float | None:
    """Gemma 2's ``softcap`` (``attn_logit_softcapping``): None / 0 is off; anything else a positive float."""
    if softcap is None:
        return None
    if isinstance(softcap, torch.Tensor) or isinstance(softcap, bool) or not isinstance(softcap, int | float):
        raise _refuse("softcap", f"a positive float is expected, got {type(softcap).__name__}")
    if softcap < 0 or softcap != softcap:
        raise _refuse("softcap", f"a positive float is expected, got {softcap}")
    return float(softcap) or None


def _packed_boundaries(query, key, position_ids, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k):
    """``(cu_seqlens_q, cu_seqlens_k, max_q, max_k)`` of a padding-free packed batch, as transformers'
    flash_attention_2 reads them: the ``cu_seq_lens_*`` / ``max_length_*`` keywords (data collators with
    ``return_flash_attn_kwargs``), else sequences restarting in the ``position_ids`` of a one-row batch
    (``prepare_fa_kwargs_from_position_ids``), with a last item saying which (True: from ``position_ids``). None
    when the batch is not packed."""
    given = [x is not None for x in (cu_seq_lens_q, cu_seq_lens_k)]
    if any(given):
        if not all(given):
            raise _refuse("cu_seq_lens_q", "packed batches need both cu_seq_lens_q and cu_seq_lens_k")
        cu_q, cu_k = (c.to(device=query.device, dtype=torch.int32) for c in (cu_seq_lens_q, cu_seq_lens_k))
        longest = [int(c.diff().max()) if c.numel() > 1 else 0 for c in (cu_q, cu_k)]
        max_q = longest[0] if max_length_q is None else int(max_length_q)
        max_k = longest[1] if max_length_k is None else int(max_length_k)
        return cu_q, cu_k, max_q, max_k, False
    if max_length_q is not None or max_length_k is not None:
        raise _refuse("max_length_q", "max_length_q / max_length_k come with cu_seq_lens_q / cu_seq_lens_k")
    if (
        not isinstance(position_ids, torch.Tensor)
        or torch.compiler.is_compiling()  # reading the values breaks the graph: the mask transformers built decides
        or query.shape[0] != 1
        or query.shape[2] < 2
        or query.shape[2] != key.shape[2]
        or position_ids.shape[-1] != query.shape[2]
        or position_ids.numel() != query.shape[2]
    ):
        return None
    positions = position_ids.reshape(-1)
    first = positions.min()
    if torch.equal(positions, torch.arange(positions.numel(), device=positions.device) + first):
        return None  # one sequence
    starts = (positions == first).nonzero().view(-1).to(torch.int32)
    if int(starts[0]) != 0:  # not packed sequences (left padding of one row): the mask says what to attend to
        return None
    cu = torch.cat((starts, torch.tensor([positions.numel()], dtype=torch.int32, device=starts.device)))
    longest = int(cu.diff().max())
    return cu, cu, longest, longest, True


def _mask_matches_packed(attention_mask, cu_q, cu_k, causal: bool, window: tuple[int, int]) -> bool:
    """Whether ``attention_mask`` (None, or what transformers built for a packed batch under the sdpa mask builder:
    block-diagonal) says the same as the varlen call that replaces it."""
    if attention_mask is None:
        return True
    if attention_mask.dtype != torch.bool or not torch.equal(cu_q, cu_k):
        return False
    total = int(cu_q[-1])
    segment = torch.repeat_interleave(torch.arange(cu_q.numel() - 1, device=cu_q.device), cu_q.diff().long(), 0)
    i = torch.arange(total, device=cu_q.device)
    expected = segment[:, None] == segment[None, :]
    left, right = window
    right = 0 if causal else right
    if right >= 0:
        expected &= i[None, :] <= i[:, None] + right
    if left >= 0:
        expected &= i[None, :] >= i[:, None] - left
    return attention_mask.shape[-2:] == expected.shape and bool((attention_mask == expected).all())


def _softcapped_masked_attention(query, key, value, attention_mask, dropout, scaling, softcap):
    """Softcapping with a mask the kernels cannot take (padding): the scores written out, as ``eager`` computes
    them (``softcap * tanh(s / softcap)``, then the mask), in float32 or better; rows with no key give 0."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    acc = torch.promote_types(query.dtype, torch.float32)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query.to(acc) @ key.to(acc).transpose(-2, -1)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    else:
        scores = scores + attention_mask.to(acc)
    has_key = torch.isfinite(scores.amax(-1, keepdim=True))
    probs = torch.softmax(torch.where(has_key, scores, torch.zeros_like(scores)), dim=-1) * has_key
    probs = torch.nn.functional.dropout(probs, dropout, training=True) if dropout else probs
    return (probs.to(value.dtype) @ value).transpose(1, 2).contiguous()


def _padded_varlen_forward(query, key, value, padding, dropout, scaling, causal, sliding_window, softcap,
                           deterministic) -> torch.Tensor:  # fmt: skip
    """A padded batch as flash_attention_2 runs it: the tokens ``padding`` ``(B, N)`` keeps, unpadded into
    sequences for :func:`metagpt_fast.flash_attn_varlen_func` (causal, the window and softcap applied by the op, no
    dense mask); padded positions give 0. Each row's tokens must be one run when there is a window (the window then
    counts the positions transformers' mask counts)."""
    b, nq, nk = query.shape[0], query.shape[2], key.shape[2]
    if padding.shape != (b, nk) or nq != nk:
        raise _refuse("attention_mask", f"a 2D padding mask of shape ({b}, {nk}) for {nq} queries and {nk} keys")
    if not causal:
        raise _refuse("attention_mask", "a 2D padding mask is served for causal attention only")
    padding = padding.bool()
    if sliding_window is not None and not hf_alibi.one_run_per_row(padding):
        raise _refuse("attention_mask", "a sliding window over padding that is not one run of tokens per row")
    plan = hf_alibi.UnpadPlan(padding, padding, torch.zeros(b, dtype=torch.long, device=padding.device))
    window = (-1, -1) if sliding_window is None else (int(sliding_window) - 1, int(sliding_window) - 1)
    return hf_alibi.varlen_attention(
        query, key, value, plan, dropout_p=dropout, softmax_scale=scaling, window_size=window, softcap=softcap or 0.0,
        deterministic=bool(deterministic),
    )  # fmt: skip


def _masked_softcap_forward(query, key, value, attention_mask, dropout, scaling, sliding_window, softcap,
                            deterministic) -> torch.Tensor:  # fmt: skip
    """Softcapping with a dense mask: the varlen op when the mask is causal-plus-padding (checked entry by entry,
    :func:`metagpt_fast.integrations.hf_alibi.unpad_plan`; caches included), else the scores written out."""
    plan = None
    if attention_mask.dtype == torch.bool and attention_mask.shape[1] == 1:
        plan = hf_alibi.unpad_plan(attention_mask[:, 0].expand(query.shape[0], -1, -1), sliding_window)
    if plan is None:
        return _softcapped_masked_attention(query, key, value, attention_mask, dropout, scaling, softcap)
    window = (-1, -1) if sliding_window is None else (int(sliding_window) - 1, int(sliding_window) - 1)
    return hf_alibi.varlen_attention(
        query, key, value, plan, dropout_p=dropout, softmax_scale=scaling, window_size=window, softcap=softcap,
        deterministic=bool(deterministic),
    )  # fmt: skip


def _flash_forward(
    query, key, value, attention_mask, dropout, scaling, is_causal, sliding_window, softcap, packed, deterministic=False
):
    """The call through :func:`metagpt_fast.flash_attn_func` / ``flash_attn_varlen_func`` (windows, softcap and packed
    batches without a dense mask), ``(B, Nq, Hq, D)``; None where the mask holds something else (padding).
    ``deterministic`` (flash_attention_2's keyword) asks for a bitwise repeatable backward pass."""
    causal = bool(is_causal)
    # transformers' sliding window of w: key j visible from query i when i - w < j (flash_attention_2's (w-1, w-1)).
    window = (-1, -1) if sliding_window is None else (int(sliding_window) - 1, int(sliding_window) - 1)
    kwargs = dict(dropout_p=dropout, softmax_scale=scaling, causal=causal, window_size=window, softcap=softcap or 0.0,
                  deterministic=bool(deterministic))  # fmt: skip
    if packed is not None:
        cu_q, cu_k, max_q, max_k = packed
        if not _mask_matches_packed(attention_mask, cu_q, cu_k, causal, window):
            raise _refuse("cu_seq_lens_q", "the attention mask does not match the packed sequences")
        if query.shape[0] != 1:
            raise _refuse("cu_seq_lens_q", f"a packed batch has one row, got {query.shape[0]}")
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)[None]
    if attention_mask is not None:
        return None
    if causal and key.shape[2] > query.shape[2]:  # prefill into an empty static cache: the rest is unused
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    return flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), **kwargs)


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``query`` ``(B, Hq, Nq, D)``, ``key``/``value`` ``(B, Hk, Nk, D)``
    → ``(B, Nq, Hq, D)`` output and no weights.

    Keyword arguments it cannot honour raise ``ValueError`` naming them (see ``_INFORMATIONAL`` / ``_UNSUPPORTED``).
    """
    _check_kwargs(kwargs)
    if attention_mask is not None and attention_mask.dim() == 2:  # a padding mask from the mask builder
        if position_bias is not None or cu_seq_lens_q is not None or cu_seq_lens_k is not None:
            raise _refuse("attention_mask", "a 2D padding mask cannot be combined with position_bias or cu_seq_lens")
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        return _padded_varlen_forward(
            query, key, value, attention_mask, dropout, scaling, causal, sliding_window, _softcap_value(softcap),
            kwargs.get("deterministic"),
        ), None  # fmt: skip
    if attention_mask is not None:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
        if attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(query.dtype)
    # Windows, softcapping and packed batches go through the flash-attention op: no dense mask for a window, the
    # packed sequences' block-diagonal mask replaced by their boundaries.
    softcap = _softcap_value(softcap)
    packed = _packed_boundaries(
        query, key, kwargs.get("position_ids"), cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k
    )
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    window = (-1, -1) if sliding_window is None else (int(sliding_window) - 1, int(sliding_window) - 1)
    if packed is not None and packed[-1] and not _mask_matches_packed(attention_mask, *packed[:2], causal, window):
        packed = None  # position_ids-derived boundaries the mask does not hold (padding): the mask decides
    windowed = sliding_window is not None and attention_mask is None and key.shape[-2] > int(sliding_window)
    if packed is not None or softcap is not None or windowed:
        if position_bias is not None:
            raise _refuse("position_bias", "it cannot be combined with softcap, a window or a packed batch")
        out = _flash_forward(
            query, key, value, attention_mask, dropout, scaling, causal, sliding_window, softcap,
            None if packed is None else packed[:4], kwargs.get("deterministic"),
        )  # fmt: skip
        if out is None:  # softcapping with a mask that holds padding: unpadded when it is causal-plus-padding
            out = _masked_softcap_forward(
                query, key, value, attention_mask, dropout, scaling, sliding_window, softcap,
                kwargs.get("deterministic"),
            )  # fmt: skip
        return out, None
    if sliding_window is not None:
        _check_sliding_window(int(sliding_window), attention_mask, key.shape[-2])
    if _is_decode_step(query, key, value, attention_mask, dropout, position_bias):
        # One query over the whole cache: the decode kernel (split-KV), reading the cache in place.
        out = flash_attn_with_kvcache(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), softmax_scale=scaling
        )
        return out.contiguous(), None
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    # A single query (decoding) sees the whole cache; a mask, when given, already holds the causal pattern.
    is_causal = bool(is_causal) and attention_mask is None and query.shape[2] > 1
    if is_causal and key.shape[2] > query.shape[2]:  # prefill into an empty static cache: the rest is unused
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
        if position_bias is not None:
            position_bias = position_bias[..., : query.shape[2]]
    if position_bias is not None:
        position_bias = position_bias[..., : key.shape[-2]].to(query.dtype)
        attention_mask = _position_bias_mask(position_bias, attention_mask, is_causal, query.shape[2], key.shape[2])
        is_causal = False
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


def _is_decode_step(query, key, value, attention_mask, dropout, position_bias) -> bool:
    """A decoding step that :func:`metagpt_fast.flash_attn_with_kvcache` computes exactly: one query token that sees
    every key (no mask: transformers passes none when nothing is padded), no dropout, no T5 bias, nothing that needs
    a gradient (the decode op has no backward). Several queries over a cache always come with a mask (their causal
    pattern is offset), which the decode op cannot take, so they stay on the attention kernel."""
    if query.shape[2] != 1 or attention_mask is not None or position_bias is not None or dropout:
        return False
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return False
    return key.stride(-1) == 1 and value.stride(-1) == 1 and query.dtype == key.dtype == value.dtype


_dispatches: dict[str, bool] = {}


def _dispatches_attention(model_type: str) -> bool:
    """Whether ``transformers.models.<model_type>`` calls its attention through ``ALL_ATTENTION_FUNCTIONS``.

    The same source heuristic as transformers' ``PreTrainedModel._can_set_attn_implementation``. Modeling code that
    cannot be found (remote code, renamed modules) is given the benefit of the doubt.
    """
    if model_type not in _dispatches:
        import inspect

        try:
            from transformers.models.auto.configuration_auto import model_type_to_module_name

            module_name = model_type_to_module_name(model_type)
            modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
            source = inspect.getsource(modeling)
        except (ImportError, OSError, TypeError):
            _dispatches[model_type] = True
        else:
            _dispatches[model_type] = "ALL_ATTENTION_FUNCTIONS" in source
    return _dispatches[model_type]


def _sliding_window_mask_skippable(
    q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, local_size=None,
    allow_is_causal_skip=True, config=None, **_,
) -> bool:  # fmt: skip
    """Whether a sliding-window causal mask can be left to :func:`attention_forward`, which gets the window as its
    ``sliding_window`` keyword and applies it without a dense mask: a plain causal window (no padding, packing, or
    extra mask functions: transformers then disallows the causal skip), queries and keys the same tokens (no cache
    offset), the model's own ``sliding_window`` (not a chunked-attention size), and a mask function that gives the
    window pattern on probes at its edges."""
    if local_size is None or not allow_is_causal_skip or mask_function is None or torch.compiler.is_compiling():
        return False
    if getattr(config, "sliding_window", None) != local_size or getattr(config, "attention_chunk_size", None):
        return False
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int)) or q_offset or kv_offset:
        return False
    if q_length != kv_length:
        return False
    if attention_mask is not None and (attention_mask.shape[-1] != kv_length or not bool(attention_mask.all())):
        return False
    return _mask_function_is(mask_function, local_size)


def _mask_function_is(mask_function, window: int | None) -> bool:
    """Whether ``mask_function`` gives the causal pattern (within ``window`` when given: ``i - window < j <= i``) on
    probes at its edges."""
    if window is None:
        q, kv = torch.tensor([0, 1, 1, 2, 5, 40]), torch.tensor([0, 0, 1, 3, 5, 0])
        expected = torch.tensor([True, True, True, False, True, True])
    else:
        w = int(window)
        q = torch.tensor([w, w, w, w, 2 * w + 1, 0, 1])
        kv = torch.tensor([0, 1, w, w + 1, w + 2, 0, 0])
        expected = torch.tensor([False, True, True, False, True, True, True])  # i - w < j <= i
    try:
        got = mask_function(torch.zeros_like(q), torch.zeros_like(q), q, kv)
    except Exception:  # a mask function that cannot take index tensors: let transformers build the mask
        return False
    return isinstance(got, torch.Tensor) and got.shape == expected.shape and bool((got == expected).all())


def _varlen_padding_mask(
    batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
    local_size=None, allow_is_causal_skip=True, config=None, **_,
) -> torch.Tensor | None:  # fmt: skip
    """The 2D padding mask ``(B, N)`` (True: a token), handed to :func:`attention_forward` in place of a dense mask,
    for a padded batch that the varlen flash-attention op computes exactly: a sliding-window causal mask (the
    model's ``sliding_window``), or a plain causal mask of a model with ``attn_logit_softcapping`` (Gemma 2/3's
    full layers), with no cache offset, no packing or extra mask functions, and each row's tokens one run (left or
    right padding: the window then counts the same positions as transformers' mask). None: build the dense mask."""
    if attention_mask is None or mask_function is None or not allow_is_causal_skip or torch.compiler.is_compiling():
        return None
    if not (isinstance(q_offset, int) and isinstance(kv_offset, int)) or q_offset or kv_offset:
        return None
    if q_length != kv_length or attention_mask.dim() != 2 or attention_mask.shape != (batch_size, kv_length):
        return None
    if local_size is not None:
        if getattr(config, "sliding_window", None) != local_size or getattr(config, "attention_chunk_size", None):
            return None
    elif getattr(_text_config(config), "attn_logit_softcapping", None) is None:
        return None
    padding = attention_mask.bool()
    if bool(padding.all()) or not hf_alibi.one_run_per_row(padding):
        return None
    return padding if _mask_function_is(mask_function, local_size) else None


def _eager_mask():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS["eager"]


def _mask_builder(sdpa_mask):
    """transformers' sdpa mask builder, refusing models whose attention never reaches :func:`attention_forward`.

    transformers accepts any registered name, and models that do not use ``AttentionInterface`` (BLOOM, MPT) still
    build their masks through the mask interface under that name: with the sdpa builder alone they would run their
    own attention on a mask of another convention (MPT crashes, BLOOM silently runs eager). Their first mask is
    built before any attention, so refusing here fails the first forward.
    """

    def mask(*args, **kwargs):
        config = kwargs.get("config")
        model_type = getattr(config, "model_type", None)
        if isinstance(model_type, str) and hf_alibi.is_patched(model_type):
            return _eager_mask()(*args, **kwargs)  # the patched ALiBi attention reads eager's masks
        if isinstance(model_type, str) and not torch.compiler.is_compiling() and not _dispatches_attention(model_type):
            hint = f"hf.patch_alibi({model_type!r}) serves it, or use" if model_type in hf_alibi.MODEL_TYPES else "use"
            raise ValueError(
                f"attn_implementation={NAME!r}: {model_type!r} models compute attention in their own code, not "
                f"through transformers' AttentionInterface, so metagpt_fast would never run; {hint} 'eager' or 'sdpa'"
            )
        if not args and _sliding_window_mask_skippable(**kwargs):
            return None  # attention_forward applies the window through the flash-attention op
        padding = None if args else _varlen_padding_mask(**kwargs)
        if padding is not None:
            return padding  # (B, N) booleans: attention_forward unpads the batch and runs the varlen op
        return sdpa_mask(*args, **kwargs)

    mask.__wrapped__ = sdpa_mask
    return mask


def register(name: str = NAME) -> None:
    """Registers ``name`` with transformers' ``AttentionInterface`` (and its mask interface); idempotent.

    The mask builder is transformers' sdpa one (boolean masks, ``None`` for plain causal batches), wrapped so that
    a model whose attention does not dispatch through ``AttentionInterface`` (BLOOM, MPT) fails on its first
    forward instead of running its own attention.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(name, attention_forward)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:  # older transformers build masks without a registry
        return
    AttentionMaskInterface.register(name, _mask_builder(ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]))


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


def _rope(x: torch.Tensor, angles: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """What :func:`metagpt_fast.apply_rotary` computes, written out: pairs ``(i, i + D/2)`` or ``(2i, 2i+1)``."""
    cos, sin = angles.cos(), angles.sin()
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)
    x1, x2 = x.chunk(2, -1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1)


def _rotary_layout(module, apply_fn) -> bool:
    """Which layout ``module.apply_rotary_pos_emb`` rotates: False for halves (Llama, NeoX), True for interleaved
    pairs (Cohere). Decided by running it on a small probe against the fused op in both layouts; a signature or
    layout the fused op does not reproduce (GPT-J's ``apply_rotary_pos_emb(tensor, sin, cos)``, partial rotation
    inside the function) raises ``ValueError``, before anything is patched."""
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 2, 5, 8, generator=generator)
    positions = torch.arange(5)
    freqs = positions[:, None].float() / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    for interleaved, angles in ((False, torch.cat((freqs, freqs), -1)), (True, freqs.repeat_interleave(2, -1))):
        try:
            got = apply_fn(q, k, angles.cos()[None], angles.sin()[None])
        except Exception:  # any failure: not this contract
            break
        if not (isinstance(got, tuple) and len(got) == 2 and all(isinstance(t, torch.Tensor) for t in got)):
            break
        expected = (_rope(q, freqs, interleaved), _rope(k, freqs, interleaved))
        if all(g.shape == e.shape and torch.allclose(g, e, atol=1e-5) for g, e in zip(got, expected, strict=True)):
            return interleaved
    raise ValueError(
        f"{module.__name__}.apply_rotary_pos_emb is not (q, k, cos, sin) -> (q, k) plain RoPE in the half or "
        "interleaved layout; metagpt_fast cannot patch it (the model keeps transformers' rotary)"
    )


def patch_rotary(model_type: str = "llama") -> None:
    """Routes ``transformers.models.<model_type>``'s RoPE through :func:`metagpt_fast.apply_rotary` (idempotent).

    Only modeling modules whose ``apply_rotary_pos_emb(q, k, cos, sin)`` the fused op reproduces are patched: the
    half layout (Llama, Mistral, Qwen2, ...) and interleaved pairs (Cohere, Cohere2), checked on a probe. Others
    (GPT-J's ``apply_rotary_pos_emb(tensor, sin, cos)``) raise ``ValueError`` and are left untouched.
    """
    module = _modeling_module(model_type)
    if model_type in _originals:
        return
    rotary_cls = _rotary_class(module)
    original_forward, original_apply = rotary_cls.forward, module.apply_rotary_pos_emb
    interleaved = _rotary_layout(module, original_apply)

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
        return apply_rotary(q, k, cos.position_ids, rotary_dim=cos.rotary_dim, base=cos.base, interleaved=interleaved)

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


# ------------------------------------------------------------------------------------------- fused causal-LM loss

_LOSS_PATCH = "_metagpt_fast_original_forward"


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _head_softcap(model) -> float | None:
    cap = getattr(_text_config(model.config), "final_logit_softcapping", None)
    return None if cap is None else float(cap)


def _check_causal_lm_loss(model) -> None:
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError as exc:
        raise ValueError(f"patch_loss needs transformers' ForCausalLMLoss (transformers >= 4.46): {exc}") from exc
    loss_function = getattr(model, "loss_function", None)
    if loss_function is not ForCausalLMLoss:
        raise ValueError(
            f"patch_loss reproduces ForCausalLMLoss (shift by one, ignore_index -100); {type(model).__name__}'s loss "
            f"is {getattr(loss_function, '__name__', loss_function)!r}"
        )


class _CapturedHead:
    """Runs the model's forward with its head returning a stand-in (a zero-stride tensor of the logits' shape, no
    memory) and keeps the hidden state the head was given."""

    def __init__(self, head: nn.Linear):
        self.head, self.hidden = head, None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return hidden.new_zeros(()).expand(*hidden.shape[:-1], self.head.out_features)

    def __enter__(self):
        self.previous = self.head.__dict__.get("forward")  # an instance-level forward (accelerate's hooks) or None
        self.head.forward = self
        return self

    def __exit__(self, *exc):
        if self.previous is None:
            del self.head.forward  # back to the class's forward
        else:
            self.head.forward = self.previous


def _probe_head(model, head: nn.Linear, softcap: float | None) -> None:
    """Refuses a model whose logits are not ``softcap(head(hidden))`` of the hidden state its head receives
    (logit scaling, another head): one forward pass over 3 tokens, in eval mode, compared with the head redone."""
    seen = {}
    hook = head.register_forward_hook(lambda module, args, out: seen.update(hidden=args[0]))
    training = model.training
    try:
        model.eval()
        device = head.weight.device
        tokens = torch.arange(3, device=device).remainder(head.out_features)[None]
        with torch.no_grad():
            logits = model(input_ids=tokens).logits
    finally:
        hook.remove()
        model.train(training)
    if "hidden" not in seen:
        raise ValueError("patch_loss: the model's forward does not call its output embeddings (get_output_embeddings)")
    with torch.no_grad():
        expected = torch.nn.functional.linear(seen["hidden"], head.weight, head.bias).float()
        if softcap is not None:
            expected = softcap * torch.tanh(expected / softcap)
    if logits.shape != expected.shape or not torch.allclose(logits.float(), expected, rtol=1e-3, atol=1e-3):
        raise ValueError(
            f"patch_loss: {type(model).__name__}'s logits are not its head's output"
            + (" softcapped by final_logit_softcapping" if softcap is not None else "")
            + " (logit scaling or other post-processing): the fused loss would differ, so the model is not patched"
        )


def patch_loss(model) -> None:
    """Liger-style fused loss for a Hugging Face causal LM: with ``labels``, the loss comes from the last hidden
    state through :func:`metagpt_fast.linear_cross_entropy`, chunk by chunk, and the ``(B, T, V)`` logits are
    never materialised (``outputs.logits`` is then None). Without ``labels`` the model runs as before.

    The loss is transformers' ``ForCausalLMLoss``: labels shifted by one (or ``shift_labels``), ``ignore_index``
    (default -100), the mean over the tokens counted, or the sum over ``num_items_in_batch`` when the Trainer passes
    it; in float32, with gradients to the hidden state and to the head's weight and bias (tied embeddings included).
    ``final_logit_softcapping`` (Gemma 2) goes to the op's ``softcap``. Refused with ``ValueError``, model untouched:
    a head that is not an ``nn.Linear``, another loss function, and logits that are not the head's output (softcapped
    as the config says) on a probe pass (Cohere's ``logit_scale``, Granite's ``logits_scaling``). Undo with
    :func:`unpatch_loss`.
    """
    if hasattr(model, _LOSS_PATCH):
        return
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"patch_loss needs an nn.Linear output embedding (LM head), got {type(head).__name__}")
    _check_causal_lm_loss(model)
    softcap = _head_softcap(model)
    _probe_head(model, head, softcap)
    original = model.forward
    signature = inspect.signature(original)

    def forward(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        labels = bound.arguments.get("labels")
        if labels is None:
            return original(*args, **kwargs)
        bound.arguments["labels"] = None
        var_keyword = [p.name for p in signature.parameters.values() if p.kind == p.VAR_KEYWORD]
        extra = bound.arguments.get(var_keyword[0], {}) if var_keyword else {}
        ignore_index = extra.get("ignore_index", -100)
        shift_labels, num_items = extra.get("shift_labels"), extra.get("num_items_in_batch")
        config = _text_config(model.config)
        with _CapturedHead(head) as captured:
            if softcap is not None:  # the stand-in logits need no cap: the op applies it
                config.final_logit_softcapping = None
            try:
                out = original(*bound.args, **bound.kwargs)
            finally:
                if softcap is not None:
                    config.final_logit_softcapping = softcap
        hidden = captured.hidden
        if shift_labels is None:
            shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        loss = linear_cross_entropy(
            hidden, head.weight, shift_labels.to(hidden.device).reshape(hidden.shape[:-1]), head.bias, ignore_index,
            "mean" if num_items is None else "sum", softcap=softcap,
        ).float()  # fmt: skip
        if num_items is not None:
            loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
        if isinstance(out, tuple):  # return_dict=False: the stand-in logits lead the tuple
            return (loss, *out[1:])
        return type(out)(**{k: v for k, v in out.items() if k not in ("loss", "logits")}, loss=loss)

    setattr(model, _LOSS_PATCH, original)
    model.forward = forward


def unpatch_loss(model) -> None:
    """Undoes :func:`patch_loss` (a model that was not patched is left as it is)."""
    if hasattr(model, _LOSS_PATCH):
        del model.forward
        delattr(model, _LOSS_PATCH)
