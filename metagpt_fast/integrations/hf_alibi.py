"""ALiBi models of Hugging Face transformers (BLOOM, MPT) through :func:`metagpt_fast.flash_attn_varlen_func`.

BLOOM and MPT compute attention in their own attention modules, not through transformers' ``AttentionInterface``,
so ``attn_implementation="metagpt_fast"`` alone cannot reach them. :func:`patch_alibi` replaces the attention
module's ``forward`` (the projections, cache and output code are the module's own, unchanged) so that the scores,
ALiBi bias, mask and softmax run as one flash-attention call with ``alibi_slopes``::

    from metagpt_fast.integrations import hf
    hf.patch_alibi("bloom")       # or "mpt"; hf.unpatch_alibi("bloom") undoes it
    model = AutoModelForCausalLM.from_pretrained(name)                       # eager, patched
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="metagpt_fast")  # the same

Both models add ``slope_h * position(key)`` to the scores, a per-query constant away from flash-attn's
``-slope_h * |position(query) - position(key)|`` on the keys a causal query sees, so the softmax is the same. The
patched forward reads the padding from the mask transformers built (eager's convention), unpads the batch (each
row's tokens must be one run, left or right padded, as with a tokenizer's padding) and calls the varlen kernel
with causal masks aligned to the bottom right (caches included). Before that it checks, on the tensors themselves,
that the mask is exactly causal-plus-padding and that the bias the model built is exactly ``slope * position``
with the slopes of the model's own function; anything else (a mask with holes, another bias) is computed with the
bias and mask written out, as eager does, through :func:`metagpt_fast.scaled_dot_product_attention`.

Precision: the flash kernels add the bias in float32 from the slopes, as MPT's eager attention does (its bias is
float32); BLOOM's eager attention adds the bias tensor in the model's dtype, so in a bfloat16/float16 BLOOM eager's
bias is rounded (by up to half a unit in the last place of ``slope * position``) and the two differ by that
rounding. In float32 they agree to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from typing import Any

import torch

from metagpt_fast.ops import scaled_dot_product_attention
from metagpt_fast.ops.flash import flash_attn_varlen_func

NAME = "metagpt_fast"

# Keyword arguments of the attention modules' forwards that do not change attention (transformers 4.57 / 5.x).
_INFORMATIONAL = frozenset({"cache_position", "position_ids", "use_cache"})


def _refuse(name: str, why: str) -> ValueError:
    return ValueError(f"hf.patch_alibi: the patched attention cannot honour {name}=...: {why}; call hf.unpatch_alibi")


def _check_kwargs(kwargs: dict[str, Any]) -> None:
    for name, value in kwargs.items():
        if name in _INFORMATIONAL or value is None:
            continue
        if name == "output_attentions":
            if value:
                raise _refuse(name, "the attention weights are never materialised")
        elif name == "head_mask":
            raise _refuse(name, "head masks are not implemented")
        else:
            raise _refuse(name, "this keyword is unknown to the patch, so it might change the result")


# ------------------------------------------------------------------------------- masks as unpadded sequences


@dataclasses.dataclass(frozen=True)
class UnpadPlan:
    """A batch's attention as varlen sequences: row ``b``'s queries ``queries[b]`` (True: a real token) against its
    keys ``keys[b]``, causal aligned to the bottom right (and windowed, when the mask said so)."""

    queries: torch.Tensor  # (B, Nq) bool
    keys: torch.Tensor  # (B, Nk) bool
    first_key: torch.Tensor  # (B,) int64: index of each row's first key (Nk when the row has none)


def _one_run(flags: torch.Tensor, index: torch.Tensor) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """Whether each row's True entries are one contiguous run; with the first and last index of each run."""
    n = flags.shape[-1]
    first = torch.where(flags, index, n).amin(-1)
    last = torch.where(flags, index, -1).amax(-1)
    count = flags.sum(-1)
    ok = bool(((count == last - first + 1) | (count == 0)).all())
    return ok, first, last


def one_run_per_row(flags: torch.Tensor) -> bool:
    """Whether each row of ``flags`` ``(B, N)`` holds its True entries in one contiguous run (or none)."""
    return _one_run(flags, torch.arange(flags.shape[-1], device=flags.device))[0]


def unpad_plan(keep: torch.Tensor, window: int | None = None) -> UnpadPlan | None:
    """The varlen form of a boolean mask ``keep`` ``(B, Nq, Nk)`` (True: attend), or None when it is not one.

    It is one when every row is causal over one run of keys, aligned to the bottom right, as transformers builds
    it for a padded batch, with or without a cache before the queries (and, with ``window``, only the ``window``
    last positions visible: ``i - window < j``). A query is a real token when it sees its own position (the last
    key it sees is its position, one after the previous real query's); the others are padding (every key masked,
    or their own token masked: right padding) and get 0 from the varlen call. The mask is checked on every real
    query, so a None-free answer means the varlen call computes exactly what the mask says there.
    """
    b, nq, nk = keep.shape
    if b == 0 or nq == 0 or nk == 0:
        return None
    i = torch.arange(nq, device=keep.device)
    j = torch.arange(nk, device=keep.device)
    seen = keep.any(1)  # (B, Nk): keys some query sees
    ok, first_key, last_key = _one_run(seen, j)
    if not ok:
        return None
    rows = keep.any(2)  # (B, Nq): queries that see a key
    top = torch.where(keep, j, -1).amax(-1)  # (B, Nq): the last key each query sees
    first_row = torch.where(rows, i, nq).amin(-1).clamp(max=nq - 1)
    offset = top.gather(1, first_row[:, None]).squeeze(1) - first_row  # key index of query i's own token: i + offset
    queries = rows & (top == i + offset[:, None])
    ok, _, last_query = _one_run(queries, i)
    has = queries.any(-1)
    if not ok or not bool(((last_key == last_query + offset) | ~has).all()):
        return None
    own = (i[None, :] + offset[:, None])[:, :, None]  # (B, Nq, 1)
    expected = (j >= first_key[:, None, None]) & (j <= own)
    if window is not None:
        expected &= j > own - window
    if not bool(((keep == expected) | ~queries[:, :, None]).all()):
        return None
    return UnpadPlan(queries, seen, first_key)


def varlen_attention(query, key, value, plan: UnpadPlan, **kwargs) -> torch.Tensor:
    """``(B, Hq, Nq, D)`` queries, ``(B, Hk, Nk, D)`` keys/values → ``(B, Nq, Hq, Dv)`` through
    :func:`metagpt_fast.flash_attn_varlen_func` over the plan's sequences (causal, bottom right); padded queries
    get 0. ``kwargs`` go to the varlen function."""
    b, hq, nq, _ = query.shape
    nk = key.shape[2]
    q_index = plan.queries.reshape(-1).nonzero().view(-1)
    k_index = plan.keys.reshape(-1).nonzero().view(-1)
    lengths_q = plan.queries.sum(-1, dtype=torch.int32)
    lengths_k = plan.keys.sum(-1, dtype=torch.int32)
    zero = torch.zeros(1, dtype=torch.int32, device=query.device)
    cu_q = torch.cat((zero, lengths_q.cumsum(0, dtype=torch.int32)))
    cu_k = torch.cat((zero, lengths_k.cumsum(0, dtype=torch.int32)))
    q = query.transpose(1, 2).reshape(b * nq, hq, -1).index_select(0, q_index)
    k, v = (t.transpose(1, 2).reshape(b * nk, t.shape[1], -1).index_select(0, k_index) for t in (key, value))
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, int(lengths_q.max()), int(lengths_k.max()), causal=True, **kwargs)
    full = out.new_zeros(b * nq, hq, out.shape[-1]).index_copy(0, q_index, out)
    return full.view(b, nq, hq, -1)


# ------------------------------------------------------------------------------------------- the ALiBi patch


def _attention(query, key, value, keep, slopes, bias_matches, dense_mask, scale, dropout) -> torch.Tensor:
    """ALiBi attention, ``(B, H, N, D)`` → ``(B, Nq, H, Dv)``: the varlen kernel with ``alibi_slopes`` when ``keep``
    (the mask as booleans) is causal-plus-padding and ``bias_matches(plan)`` says the model's bias is ``slope *
    position`` there; else the model's bias and mask written out (``dense_mask()``) through
    :func:`metagpt_fast.scaled_dot_product_attention`."""
    plan = None if keep is None else unpad_plan(keep)
    if plan is not None and bias_matches(plan):
        slopes = None if slopes is None else slopes.to(torch.float32)  # None: the model passed no ALiBi bias
        return varlen_attention(query, key, value, plan, alibi_slopes=slopes, softmax_scale=scale, dropout_p=dropout)
    out = scaled_dot_product_attention(query, key, value, attn_mask=dense_mask(), dropout_p=dropout, scale=scale)
    return out.transpose(1, 2)


def _bloom_forward(
    self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False, output_attentions=False,
    **kwargs,
):  # fmt: skip
    """``BloomAttention.forward`` with the attention through the flash-attention op (see the module's docstring)."""
    _check_kwargs({"output_attentions": output_attentions, **kwargs})
    modeling = sys.modules[type(self).__module__]
    batch_size, q_length, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # (B, H, N, D)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    heads, nk = self.num_heads, key.shape[2]
    slopes = modeling._get_alibi_slopes(heads, query.device)
    bias = alibi.view(batch_size, heads, 1, -1)
    if bias.shape[-1] != nk:
        raise _refuse("alibi", f"an ALiBi tensor of {bias.shape[-1]} keys for {nk} keys")

    def bias_matches(plan: UnpadPlan) -> bool:
        # build_alibi_tensor: slope * (number of real keys before this one), in the bias's dtype.
        positions = torch.arange(nk, device=query.device)[None, :] - plan.first_key[:, None]
        expected = (slopes[None, :, None] * positions[:, None, :]).to(bias.dtype)
        return bool(((bias[:, :, 0] == expected) | ~plan.keys[:, None, :]).all())

    keep = None
    if attention_mask is not None:
        mask = attention_mask[..., :nk]
        low = torch.finfo(mask.dtype).min if mask.is_floating_point() else None
        if mask.dim() == 4 and mask.shape[1] == 1 and low is not None and bool(((mask == 0) | (mask == low)).all()):
            keep = (mask == 0)[:, 0]
    context = _attention(
        query, key, value, keep, slopes * self.beta, bias_matches,
        lambda: bias * self.beta + (0 if attention_mask is None else attention_mask[..., :nk]),
        self.inv_norm_factor, self.attention_dropout.p if self.training else 0.0,
    )  # fmt: skip
    context_layer = context.reshape(batch_size, q_length, heads * self.head_dim)
    # The rest is BloomAttention.forward's own code.
    if self.pretraining_tp > 1 and self.slow_but_exact:
        slices = self.hidden_size / self.pretraining_tp
        output_tensor = torch.zeros_like(context_layer)
        for i in range(self.pretraining_tp):
            output_tensor = output_tensor + torch.nn.functional.linear(
                context_layer[:, :, int(i * slices) : int((i + 1) * slices)],
                self.dense.weight[:, int(i * slices) : int((i + 1) * slices)],
            )
    else:
        output_tensor = self.dense(context_layer)
    output_tensor = modeling.dropout_add(output_tensor, residual, self.hidden_dropout, self.training)
    return output_tensor, None


def _mpt_forward(self, hidden_states, position_bias, cache=None, attention_mask=None, **kwargs):
    """``MptAttention.forward`` with the attention through the flash-attention op (see the module's docstring)."""
    if cache is None:
        cache = kwargs.pop("past_key_values", None)
    _check_kwargs(kwargs)
    modeling = sys.modules[type(self).__module__]
    batch_size, seq_length = hidden_states.shape[:2]
    mixed_qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        mixed_qkv = mixed_qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    query, key, value = (
        t.reshape(batch_size, seq_length, self.n_heads, self.head_dim).transpose(1, 2) for t in mixed_qkv.chunk(3, 2)
    )
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    heads, nk = self.n_heads, key.shape[2]
    bias = None
    if position_bias is not None:
        if position_bias.dim() != 3 or position_bias.shape[-1] < nk:
            raise _refuse("position_bias", f"a (heads, 1, >= {nk}) ALiBi tensor is expected")
        bias = position_bias[:, -1:, position_bias.shape[-1] - nk :]  # (H, 1, Nk), as MptAttention slices it
    slopes = -modeling.build_mpt_alibi_tensor(heads, 2, device=query.device)[:, 0, 0]

    def bias_matches(plan: UnpadPlan) -> bool:
        if bias is None:
            return True
        # build_mpt_alibi_tensor: slope * (key index - last index), int32 positions times float32 slopes.
        positions = torch.arange(1 - nk, 1, dtype=torch.int32, device=query.device)
        return bias.shape[0] == heads and torch.equal(bias[:, 0], positions[None, :] * slopes[:, None])

    def dense_mask():
        base = torch.zeros((), dtype=query.dtype, device=query.device) if bias is None else bias[None].to(query.dtype)
        if attention_mask is None:
            return base.expand(batch_size, heads, seq_length, nk)
        return base.masked_fill(attention_mask[..., :nk], torch.finfo(query.dtype).min)

    keep = None
    if attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.dim() == 4:
        keep = ~attention_mask[:, 0, :, :nk] if attention_mask.shape[1] == 1 else None
    context = _attention(
        query, key, value, keep, slopes if bias is not None else None, bias_matches, dense_mask, self.softmax_scale,
        self.attn_dropout_p if self.training else 0.0,
    )  # fmt: skip
    context_states = context.reshape(batch_size, seq_length, -1)
    return self.out_proj(context_states), None


# Per model type: the attention class's name, the patched forward, and a tiny config for the parity probe.
_MODELS = {
    "bloom": (
        "BloomAttention",
        _bloom_forward,
        lambda t: t.BloomConfig(vocab_size=17, hidden_size=16, n_layer=1, n_head=2),
    ),  # fmt: skip
    "mpt": (
        "MptAttention",
        _mpt_forward,
        lambda t: t.MptConfig(vocab_size=17, d_model=16, n_layers=1, n_heads=2, max_seq_len=16),
    ),  # fmt: skip
}
MODEL_TYPES = frozenset(_MODELS)
_patched: dict[str, tuple[type, Any]] = {}
_probed: dict[tuple[str, Any], bool] = {}  # the probe's verdicts: the modeling code does not change in a process


def is_patched(model_type: str) -> bool:
    return model_type in _patched


def _probe(model_type: str, patched) -> bool:
    """Whether ``patched`` gives the module's own results on a tiny random model (no padding, left and right
    padding, and a step over a cache), in float64: guards against modeling code of another transformers version."""
    import transformers

    config = _MODELS[model_type][2](transformers)
    with torch.random.fork_rng():  # the probe's own random model: the caller's generator is left as it was
        torch.manual_seed(0)
        model = transformers.AutoModel.from_config(config, attn_implementation="eager").double().eval()
    attention_cls = type(next(m for m in model.modules() if type(m).__name__ == _MODELS[model_type][0]))
    ids = torch.arange(12).remainder(17).view(2, 6)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0
    mask[1, -1] = 0
    results = []
    original = attention_cls.forward
    try:
        for forward in (original, patched):
            attention_cls.forward = forward
            with torch.no_grad():
                plain = model(input_ids=ids).last_hidden_state
                padded = model(input_ids=ids, attention_mask=mask).last_hidden_state
                padded = torch.where(mask[..., None].bool(), padded, 0.0)  # padded rows: NaN in eager (float64)
                out = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
                cache = getattr(out, "cache", None)
                past = {"cache": cache} if cache is not None else {"past_key_values": out.past_key_values}
                step = model(input_ids=ids[:, 5:], attention_mask=mask, **past).last_hidden_state
                step = torch.where(mask[:, 5:, None].bool(), step, 0.0)
            results.append((plain, padded, step))
    except Exception:  # any failure: the patched forward does not fit this modeling code
        return False
    finally:
        attention_cls.forward = original
    # The models round their bias to float32 (MPT) or the hidden dtype: agreement to float32 rounding, while a
    # misplaced mask, bias or projection differs by far more.
    return all(torch.allclose(a, b, atol=1e-6, rtol=1e-6) for a, b in zip(*results, strict=True))


def patch_alibi(model_type: str) -> None:
    """Routes ``transformers.models.<model_type>``'s attention (``"bloom"`` or ``"mpt"``) through the flash-attention
    op with ALiBi slopes (idempotent). The attention class's ``forward`` is replaced, so every model of that type is
    served, eager ones included, and ``attn_implementation="metagpt_fast"`` is accepted for it. Before patching, the
    patched forward is compared with the module's own on a tiny random model; a mismatch (modeling code of another
    transformers version) raises ``ValueError`` and nothing is patched. Undo with :func:`unpatch_alibi`."""
    if not isinstance(model_type, str):
        raise TypeError(f"hf.patch_alibi: model_type must be a str, got {type(model_type).__name__}")
    if model_type not in _MODELS:
        raise ValueError(f"hf.patch_alibi: model_type must be one of {sorted(_MODELS)}, got {model_type!r}")
    if model_type in _patched:
        return
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    cls_name, forward, _ = _MODELS[model_type]
    attention_cls = getattr(modeling, cls_name)
    if (model_type, forward) not in _probed:
        _probed[(model_type, forward)] = _probe(model_type, forward)
    if not _probed[(model_type, forward)]:
        raise ValueError(
            f"hf.patch_alibi: {modeling.__name__}.{cls_name}.forward does not match what the patch reproduces "
            "(another transformers version?); the model keeps its own attention"
        )
    forward.__wrapped__ = attention_cls.forward
    _patched[model_type] = (attention_cls, attention_cls.forward)
    attention_cls.forward = forward


def unpatch_alibi(model_type: str) -> None:
    """Undoes :func:`patch_alibi` (no-op if ``model_type`` is not patched)."""
    if not isinstance(model_type, str):
        raise TypeError(f"hf.unpatch_alibi: model_type must be a str, got {type(model_type).__name__}")
    if model_type in _patched:
        attention_cls, original = _patched.pop(model_type)
        attention_cls.forward = original
