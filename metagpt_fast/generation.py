"""Autoregressive generation for :class:`~metagpt_fast.model.MetaGPT`: a static KV cache, sampling, the decode step.

With the cache (``use_cache=True``, the default), a prompt is processed once (the prefill: the training attention
path, causal ``scaled_dot_product_attention``, writing every layer's keys and values into the cache), then each new
token costs one decode step: the token's embedding at its position, one query per layer attending to the cache
through :func:`metagpt_fast.flash_attn_with_kvcache` (which appends the token's key and value at ``cache_seqlens``),
and the logits of that one position. ``use_cache=False`` runs the old loop: a full forward over the whole context
for every token.

Prompts:

- a ``(B, T)`` tensor of token ids: every row is a full prompt of ``T`` tokens; the result is a ``(B, T + n)``
  tensor, ``n <= max_new_tokens`` the number of steps run;
- a ``(B, T)`` tensor plus ``lengths`` ``(B,)``: right-padded prompts, row ``b``'s prompt is ``idx[b, :lengths[b]]``
  (what follows is ignored); the result is ``(B, max(lengths) + n)``, row ``b`` holding its prompt, its new tokens,
  then ``pad_token`` up to the width;
- a ``(B, T)`` tensor plus ``attention_mask`` ``(B, T)``: left-padded prompts (Hugging Face's convention, 1 on real
  tokens, 0 on the padding before them); the result is ``(B, T + n)``, ``idx`` followed by each row's new tokens;
- a list of prompts (each a list of ints or a 1-D tensor): the result is a list of 1-D tensors, each prompt followed
  by its new tokens, ending at its stop token if one came.

Inside, prompts are right-padded: under a causal mask, a right-padded row's tokens never see the padding, so every
row's positions start at 0 and its logits are those of the row alone. Left-padded prompts are moved to that layout
first, so their positions, too, start at each row's first real token.

Stop tokens: a row that samples one of ``stop_tokens`` keeps it, then gets ``pad_token`` for every later step;
generation ends early once every row has stopped.

``max_seq_length``: positions beyond the model's ``max_seq_length`` have no embedding. With ``sliding=True`` (the
default, the behaviour of the original loop), once a row's sequence fills ``max_seq_length`` every later token comes
from a full forward over the last ``max_seq_length`` tokens (the cache cannot slide: with absolute positions, cropping
the first token moves every other one), so tokens up to ``max_seq_length`` come from the cache and the rest cost what
``use_cache=False`` costs. With ``sliding=False``, asking for more tokens than fit raises a ``ValueError`` naming
``max_new_tokens``.

Generation runs the model in eval mode (no dropout) and restores its training mode afterwards.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from metagpt_fast.nn import MLP, CausalSelfAttention, LayerNorm, RotaryEmbedding, TransformerBlock
from metagpt_fast.ops import add_positional_encoding, bias_gelu, layer_norm, scaled_dot_product_attention
from metagpt_fast.ops import validation as check
from metagpt_fast.ops.kvcache import flash_attn_with_kvcache

if TYPE_CHECKING:
    from metagpt_fast.model import MetaGPT

__all__ = ["KVCache", "decode_step", "generate", "prefill", "sample", "stream_generate"]


class KVCache(nn.Module):
    """Keys and values of every layer, preallocated: ``k{i}``, ``v{i}`` ``(B, max_length, H, D)`` buffers (the layout
    of :func:`metagpt_fast.flash_attn_with_kvcache`), and ``seqlens`` ``(B,)`` int32, the number of positions of
    each row already in the cache.

    Its buffers have fixed addresses, so a compiled decode step (CUDA graphs included) reads and writes them in place.
    ``layers[i]`` is what ``model.blocks[i]`` receives as ``kv_cache``. For a sinusoidal model, ``positions`` holds
    the encoding of every position (set by :meth:`for_model`), so a decode step adds what the prefill added.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_length: int,
        num_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        for name, value in (
            ("num_layers", num_layers),
            ("batch_size", batch_size),
            ("max_length", max_length),
            ("num_heads", num_heads),
            ("head_dim", head_dim),
        ):
            check.integer(name, value, minimum=1)
        self.max_length = max_length
        shape = (batch_size, max_length, num_heads, head_dim)
        for i in range(num_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("seqlens", torch.zeros(batch_size, dtype=torch.int32, device=device), persistent=False)
        self.register_buffer("positions", None, persistent=False)
        self._mark_static()
        self.layers = [LayerCache(self, i) for i in range(num_layers)]
        self.prefilling = False

    @classmethod
    def for_model(cls, model: MetaGPT, batch_size: int, max_length: int | None = None) -> KVCache:
        """A cache shaped for ``model`` (its dtype and device) with ``max_length`` positions (default: its
        ``max_seq_length``)."""
        cfg = model.config
        max_length = cfg.max_seq_length if max_length is None else max_length
        weight = model.lm_head.weight
        cache = cls(
            cfg.num_layers,
            batch_size,
            max_length,
            cfg.num_heads,
            cfg.embed_size // cfg.num_heads,
            dtype=weight.dtype,
            device=weight.device,
        )
        cache.positions = _position_table(model)
        cache._mark_static()
        return cache

    def _mark_static(self) -> None:
        """CUDA graphs (``compile=True`` on CUDA) read the buffers where they are, instead of copying them into the
        graph's own inputs at every step (as transformers' StaticCache does)."""
        for buffer in self.buffers():
            if buffer.is_cuda:
                torch._dynamo.mark_static_address(buffer)

    @property
    def batch_size(self) -> int:
        return self.seqlens.shape[0]

    def reset(self) -> None:
        self.seqlens.zero_()


class LayerCache:
    """One layer's view of a :class:`KVCache`: stores that layer's keys and values and computes its attention."""

    def __init__(self, cache: KVCache, index: int):
        self._cache = weakref.ref(cache)  # the cache owns its views: no reference cycle through nn.Module
        self.index = index

    def attend(self, q, k, v, rotary, backend):
        """``q``, ``k``, ``v`` ``(B, H, T, D)`` (before rotary) → attention output ``(B, H, T, D)``.

        Prefill (``cache.prefilling``): causal attention over the ``T`` tokens, keys and values written at positions
        ``0 .. T-1``. Decode (``T`` = 1): the token sits at position ``seqlens[b]`` of row ``b``; its key and value are
        appended there by the decode op, which attends to positions ``0 .. seqlens[b]``. Under autocast the cache
        stays in the weights' dtype: a decode step casts its query, key and value to it.
        """
        cache = self._cache()
        k_cache, v_cache = getattr(cache, f"k{self.index}"), getattr(cache, f"v{self.index}")
        if cache.prefilling:
            if rotary is not None:
                q, k = rotary(q, k)
            y = scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)
            t = q.shape[2]
            k_cache[:, :t].copy_(k.transpose(1, 2))
            v_cache[:, :t].copy_(v.transpose(1, 2))
            return y
        if rotary is not None:
            q, k = rotary(q, k, position_ids=cache.seqlens[:, None])
        if q.dtype != k_cache.dtype:  # autocast: the projections ran in low precision, the cache keeps the weights'
            q, k, v = q.to(k_cache.dtype), k.to(k_cache.dtype), v.to(k_cache.dtype)
        y = flash_attn_with_kvcache(
            q.transpose(1, 2),
            k_cache,
            v_cache,
            k=k.transpose(1, 2),
            v=v.transpose(1, 2),
            cache_seqlens=cache.seqlens,
            causal=True,
            backend=backend,
        )
        return y.transpose(1, 2)


def _embed(model: MetaGPT, tokens: torch.Tensor, positions: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
    """Token embedding of ``tokens`` ``(B, 1)`` plus, for sinusoidal models, the encoding of each row's position
    ``positions`` ``(B,)`` (``table``: the encoding as the model's embedding op computes it)."""
    emb = model.embedding
    acc = torch.promote_types(emb.weight.dtype, torch.float32)
    x = F.embedding(tokens, emb.weight).to(acc) * emb.scale
    if table is not None:
        x = x + table[positions.long()][:, None, :]
    return x.to(emb.weight.dtype)


def _position_table(model: MetaGPT) -> torch.Tensor | None:
    """The sinusoidal encoding of positions ``0 .. max_seq_length-1`` computed by the model's own op (so a decode step
    adds what the prefill's fused embedding added), or None for rotary models."""
    emb = model.embedding
    if not emb.sinusoidal:
        return None
    acc = torch.promote_types(emb.weight.dtype, torch.float32)
    zeros = torch.zeros(1, model.config.max_seq_length, emb.weight.shape[1], dtype=acc, device=emb.weight.device)
    return add_positional_encoding(zeros, backend=emb.backend)[0]


def prefill(model: MetaGPT, idx: torch.Tensor, lengths: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Runs ``idx`` ``(B, T)`` (right-padded, ``lengths`` ``(B,)``) through ``model``, filling ``cache``; returns the
    logits ``(B, vocab)`` at each row's last prompt position."""
    b, t = idx.shape
    if b != cache.batch_size:
        raise check.ArgumentError(f"cache: it has {cache.batch_size} rows, idx has {b} prompts")
    if t > cache.max_length:
        raise check.ArgumentError(f"cache: the prompt has {t} tokens, more than the cache's {cache.max_length}")
    cache.prefilling = True
    try:
        x = model.embedding(idx)
        for block, layer in zip(model.blocks, cache.layers, strict=True):
            x = block(x, kv_cache=layer)
    finally:
        cache.prefilling = False
    cache.seqlens.copy_(lengths)
    x = x[torch.arange(x.shape[0], device=x.device), lengths.long() - 1]
    return model.lm_head(model.ln_f(x))


def decode_step(model: MetaGPT, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One token per row: ``tokens`` ``(B, 1)`` at positions ``cache.seqlens`` → logits ``(B, vocab)``; appends each
    layer's key and value to ``cache`` and advances ``cache.seqlens`` by one. Static shapes: this is what
    ``compile=True`` compiles."""
    if model.embedding.sinusoidal and cache.positions is None:
        raise check.ArgumentError("cache has no position table for this sinusoidal model: build it with for_model")
    x = _embed(model, tokens, cache.seqlens, cache.positions if model.embedding.sinusoidal else None)
    for block, layer in zip(model.blocks, cache.layers, strict=True):
        x = block(x, kv_cache=layer)
    cache.seqlens.add_(1)
    return model.lm_head(model.ln_f(x[:, 0]))


class _DecodePlan:
    """What an eager decode step reads of ``model``, gathered once per generate call: each block's modules and
    parameters, so a step calls the ops directly instead of going through about forty module calls and a hundred
    attribute look-ups per token (half of a small model's step on CPU).

    :meth:`build` gives ``None`` (the modules run, :func:`decode_step`) unless every module on the path is exactly the
    package's class (no subclass, no instance ``forward``), no module hook is registered (per module or global), and
    the model is in eval mode (dropout is the identity). Parameters are read by reference: in-place updates are seen;
    a module or parameter replaced during a :func:`stream_generate` is seen from the next call.
    tests/test_generation.py checks its logits bit for bit against :func:`decode_step`'s."""

    def __init__(self, model: MetaGPT):
        self.blocks = [_block_plan(block) for block in model.blocks]
        self.ln_f, self.lm_head = _norm_plan(model.ln_f), model.lm_head.weight
        self.sinusoidal = model.embedding.sinusoidal

    @staticmethod
    def build(model: MetaGPT) -> _DecodePlan | None:
        allowed = (TransformerBlock, CausalSelfAttention, MLP, LayerNorm, nn.LayerNorm, nn.Linear, nn.Dropout, nn.GELU,
                   RotaryEmbedding)  # fmt: skip
        from torch.nn.modules import module as torch_module

        global_hooks = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                        "_global_backward_pre_hooks", "_global_forward_hooks_always_called")  # fmt: skip
        if any(getattr(torch_module, name, None) for name in global_hooks):
            return None
        path = [model.ln_f, model.lm_head] + [m for block in model.blocks for m in block.modules()]
        for m in path:
            hooked = m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
            if type(m) not in allowed or hooked or "forward" in m.__dict__ or m.training:
                return None
        if type(model.ln_f) not in (LayerNorm, nn.LayerNorm) or type(model.lm_head) is not nn.Linear:
            return None
        if model.lm_head.bias is not None:
            return None
        if any(block.fused and type(block.ln_2) is not LayerNorm for block in model.blocks):
            return None  # the fused residual add is our LayerNorm's: torch's refuses it, as the module call does
        return _DecodePlan(model)

    def step(self, model: MetaGPT, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """:func:`decode_step` without the module calls."""
        if self.sinusoidal and cache.positions is None:
            raise check.ArgumentError("cache has no position table for this sinusoidal model: build it with for_model")
        x = _embed(model, tokens, cache.seqlens, cache.positions if self.sinusoidal else None)
        for block, layer in zip(self.blocks, cache.layers, strict=True):
            x = _block_step(block, x, layer)
        cache.seqlens.add_(1)
        return F.linear(_norm(self.ln_f, x[:, 0]), self.lm_head)


def _block_plan(block) -> tuple:
    attn, mlp = block.attn, block.mlp
    return (
        block.fused,
        _norm_plan(block.ln_1),
        _norm_plan(block.ln_2),
        attn.num_heads,
        attn.c_attn.weight,
        attn.c_attn.bias,
        attn.c_proj.weight,
        attn.c_proj.bias,
        attn.rotary,
        attn.backend,
        mlp.fused,
        mlp.c_fc.weight,
        mlp.c_fc.bias,
        mlp.gelu.approximate,
        mlp.c_proj.weight,
        mlp.c_proj.bias,
        mlp.backend,
    )


def _norm_plan(ln) -> tuple:
    return type(ln) is LayerNorm, ln.normalized_shape, ln.weight, ln.bias, ln.eps, getattr(ln, "backend", None)


def _norm(plan: tuple, x, residual=None):
    """``ln(x)`` / ``ln(x, residual)`` as the module's forward computes it (``plan``: :func:`_norm_plan`)."""
    ours, shape, weight, bias, eps, backend = plan
    if ours:
        if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            x = x.float()
            residual = residual.float() if residual is not None else None
        return layer_norm(x, shape, weight, bias, eps, residual=residual, backend=backend)
    return F.layer_norm(x, shape, weight, bias, eps)


def _block_step(plan: tuple, x: torch.Tensor, layer: LayerCache) -> torch.Tensor:
    """``TransformerBlock.forward(x, kv_cache=layer)`` in eval mode, for one token, without its module calls."""
    (fused, ln_1, ln_2, heads, w_attn, b_attn, w_proj, b_proj, rotary, attn_backend, mlp_fused, w_fc, b_fc,
     approximate, w_out, b_out, mlp_backend) = plan  # fmt: skip
    b, t, c = x.shape
    q, k, v = F.linear(_norm(ln_1, x), w_attn, b_attn).view(b, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    y = layer.attend(q, k, v, rotary, attn_backend)
    a = F.linear(y.transpose(1, 2).reshape(b, t, c), w_proj, b_proj)
    if fused:
        h, x = _norm(ln_2, a.to(x.dtype), x)
    else:
        x = x + a
        h = _norm(ln_2, x)
    if mlp_fused:
        h = F.linear(h, w_fc)
        bias = b_fc.to(h.dtype) if b_fc is not None else None
        h = bias_gelu(h, bias, approximate, backend=mlp_backend)
    else:
        h = F.gelu(F.linear(h, w_fc, b_fc), approximate=approximate)
    return x + F.linear(h, w_out, b_out)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_decode_step(model: MetaGPT, device: torch.device):
    """``decode_step`` compiled once per model: ``fullgraph=True`` at static shapes, CUDA graphs on CUDA."""
    fn = _COMPILED.get(model)
    if fn is None:
        mode = "reduce-overhead" if device.type == "cuda" else None
        fn = torch.compile(decode_step, fullgraph=True, dynamic=False, mode=mode)
        _COMPILED[model] = fn
    return fn


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids ``(B,)`` from ``logits`` ``(B, vocab)``: greedy (``argmax``) at ``temperature`` 0, otherwise
    a draw from ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens, then to the smallest
    set of most likely tokens whose probability reaches ``top_p`` (nucleus sampling; the most likely token always
    stays)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass of the more likely tokens
        drop = before >= top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)[:, 0]


class _Request:
    """Validated arguments of one generate call."""

    def __init__(
        self,
        model,
        idx,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        stop_tokens,
        lengths,
        pad_token,
        generator,
        use_cache,
        compile,
        sliding,
        attention_mask=None,
    ):
        cfg = model.config
        self.as_list = not isinstance(idx, torch.Tensor)
        device = model.lm_head.weight.device
        if self.as_list:
            if lengths is not None:
                raise check.ArgumentError("lengths: pass lengths only with a (B, T) tensor idx, not a list of prompts")
            idx, lengths = _pad_prompts(idx, device)
        model._check_tokens(idx)
        if idx.device != device:
            raise check.ArgumentError(f"idx is on {idx.device}, the model on {device}")
        if idx.shape[1] == 0:
            raise check.ArgumentError("idx: the prompts must hold at least one token")
        b, t = idx.shape
        self.left_padded = None  # the caller's left-padded idx, when attention_mask says which tokens are real
        if attention_mask is not None:
            if self.as_list:
                raise check.ArgumentError(
                    "attention_mask: pass it only with a (B, T) tensor idx, not a list of prompts"
                )
            if lengths is not None:
                raise check.ArgumentError(
                    "attention_mask: pass attention_mask (left-padded prompts) or lengths (right-padded), not both"
                )
            self.left_padded = idx
            idx, lengths = _left_to_right(idx, attention_mask)
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.int32, device=idx.device)
        else:
            check.tensor("lengths", lengths, dims=(1,))
            if lengths.dtype.is_floating_point or lengths.dtype in (torch.bool, torch.complex64, torch.complex128):
                raise check.ArgumentTypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
            if lengths.shape[0] != b:
                raise check.ArgumentError(f"lengths must have idx's batch size {b}, got shape {tuple(lengths.shape)}")
            if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > t):
                raise check.ArgumentError(f"lengths must lie in [1, {t}] (idx's length), got {lengths.tolist()}")
            lengths = lengths.to(device=idx.device, dtype=torch.int32)
        self.idx, self.lengths = idx, lengths
        self.max_new_tokens = check.integer("max_new_tokens", max_new_tokens, minimum=0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise check.ArgumentError(f"temperature must be a number >= 0, got {temperature!r}")
        if temperature == float("inf"):
            raise check.ArgumentError("temperature must be finite, got inf")
        self.temperature = float(temperature)
        self.top_k = None if top_k is None else check.integer("top_k", top_k, minimum=1)
        if top_p is not None:
            if isinstance(top_p, bool) or not isinstance(top_p, (int, float)):
                raise check.ArgumentTypeError(f"top_p must be a float in (0, 1], got {type(top_p).__name__}")
            if not 0.0 < top_p <= 1.0:
                raise check.ArgumentError(f"top_p must be in (0, 1], got {top_p}")
            top_p = float(top_p)
        self.top_p = top_p
        if stop_tokens is None:
            stop_tokens = ()
        elif isinstance(stop_tokens, int) and not isinstance(stop_tokens, bool):
            stop_tokens = (stop_tokens,)
        elif isinstance(stop_tokens, (str, bytes)) or not isinstance(stop_tokens, Sequence):
            raise check.ArgumentTypeError(
                f"stop_tokens must be an int or a sequence of ints, got {type(stop_tokens).__name__}"
            )
        for token in stop_tokens:
            if isinstance(token, bool) or not isinstance(token, int):
                raise check.ArgumentTypeError(f"stop_tokens must hold ints, got {type(token).__name__}")
            if not 0 <= token < cfg.vocab_size:
                raise check.ArgumentError(f"stop_tokens must lie in [0, {cfg.vocab_size}), got {token}")
        self.stop_tokens = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=idx.device)
        check.integer("pad_token", pad_token)
        if not 0 <= pad_token < cfg.vocab_size:
            raise check.ArgumentError(f"pad_token must lie in [0, {cfg.vocab_size}), got {pad_token}")
        self.pad_token = pad_token
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise check.ArgumentTypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            if generator.device.type != idx.device.type:
                raise check.ArgumentError(f"generator is on {generator.device}, the model on {idx.device}")
        self.generator = generator
        self.use_cache = check.flag("use_cache", use_cache)
        self.compile = check.flag("compile", compile)
        if self.compile and not self.use_cache:
            raise check.ArgumentError("compile=True compiles the cached decode step: it needs use_cache=True")
        self.sliding = check.flag("sliding", sliding)
        longest = int(lengths.max())
        if not self.sliding and longest + self.max_new_tokens > cfg.max_seq_length:
            raise check.ArgumentError(
                f"max_new_tokens={self.max_new_tokens} after a prompt of {longest} tokens goes past "
                f"max_seq_length={cfg.max_seq_length}; ask for at most {cfg.max_seq_length - longest} new tokens, "
                "or pass sliding=True to continue on the last max_seq_length tokens"
            )


def _left_to_right(idx: torch.Tensor, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks ``attention_mask`` (Hugging Face's convention: ``(B, T)``, 1 on real tokens, 0 on the padding before
    them) and returns the same prompts right-padded, with their lengths: row ``b``'s real tokens move to the start,
    so its positions count from its first real token, as the prompt's alone would."""
    check.tensor("attention_mask", attention_mask, dims=(2,))
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise check.ArgumentTypeError(f"attention_mask must be a bool or integer tensor, got {attention_mask.dtype}")
    if attention_mask.shape != idx.shape:
        raise check.ArgumentError(
            f"attention_mask must have idx's shape {tuple(idx.shape)}, got {tuple(attention_mask.shape)}"
        )
    if attention_mask.device != idx.device:
        raise check.ArgumentError(f"attention_mask is on {attention_mask.device}, idx on {idx.device}")
    mask = attention_mask.long()
    if bool(((mask != 0) & (mask != 1)).any()):
        raise check.ArgumentError("attention_mask must hold 0 (padding) and 1 (real tokens) only")
    after = (mask[:, 1:] < mask[:, :-1]).any(dim=1)
    if bool(after.any()):
        row = int(after.nonzero()[0, 0])
        raise check.ArgumentError(
            f"attention_mask must describe left padding (zeros, then ones), but row {row} has a 0 after a 1: pass "
            "right-padded prompts with lengths instead"
        )
    lengths = mask.sum(dim=1)
    if bool((lengths == 0).any()):
        row = int((lengths == 0).nonzero()[0, 0])
        raise check.ArgumentError(f"attention_mask: row {row} has no real token (all zeros)")
    t = idx.shape[1]
    cols = (torch.arange(t, device=idx.device) + (t - lengths)[:, None]).clamp(max=t - 1)
    return idx.gather(1, cols), lengths.to(torch.int32)


def _pad_prompts(prompts, device) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise check.ArgumentTypeError(
            f"idx must be a (B, T) tensor or a non-empty list of prompts, got {type(prompts).__name__}"
        )
    rows = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1:
                raise check.ArgumentError(f"idx[{i}] must be a 1-D tensor of token ids, got {prompt.dim()} dims")
            if prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
                raise check.ArgumentTypeError(f"idx[{i}] must hold integer token ids, got {prompt.dtype}")
            row = prompt.to(device=device, dtype=torch.long)
        else:
            if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
                raise check.ArgumentTypeError(f"idx[{i}] must be a list of ints or a 1-D tensor")
            if any(isinstance(x, bool) or not isinstance(x, int) for x in prompt):
                raise check.ArgumentTypeError(f"idx[{i}] must hold ints")
            row = torch.tensor(list(prompt), dtype=torch.long, device=device)
        if row.numel() == 0:
            raise check.ArgumentError(f"idx[{i}] is empty: every prompt needs at least one token")
        rows.append(row)
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int32, device=device)
    idx = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        idx[i, : len(row)] = row
    return idx, lengths


def _full_forward_logits(model: MetaGPT, seq: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, vocab)`` at each row's last token from a full forward over the row's last ``max_seq_length``
    tokens (``seq`` right-padded, ``cur`` ``(B,)`` the rows' lengths): the no-cache step."""
    limit = model.config.max_seq_length
    width = min(int(cur.max()), limit)
    start = (cur.long() - limit).clamp(min=0)  # (B,): first position of each row's window
    cols = start[:, None] + torch.arange(width, device=seq.device)
    window = seq.gather(1, cols.clamp(max=seq.shape[1] - 1))
    last = (cur.long() - start - 1)[:, None, None].expand(-1, 1, model.config.vocab_size)
    return model(window)[0].gather(1, last)[:, 0]


@torch.inference_mode()  # as a decorator: entered and left around each step, never while the caller runs
def _steps(model: MetaGPT, req: _Request) -> Iterator[torch.Tensor]:
    """Yields the next token of every row ``(B,)``, one step at a time (rows that stopped get ``pad_token``)."""
    idx, lengths = req.idx, req.lengths
    b, t = idx.shape
    n = req.max_new_tokens
    if n == 0:
        return
    limit = model.config.max_seq_length
    cur = lengths.clone()  # each row's length so far
    done = torch.zeros(b, dtype=torch.bool, device=idx.device)
    stopping = req.stop_tokens.numel() > 0
    cache = step = token = None
    cached_steps = 0  # steps whose logits come from the cache: the sequence still fits max_seq_length
    if req.use_cache:
        cached_steps = min(n, limit - int(lengths.max()) + 1)
        cache = KVCache.for_model(model, b, limit)
        if req.compile:
            step = _compiled_decode_step(model, idx.device)
        else:
            plan = _DecodePlan.build(model)
            step = decode_step if plan is None else plan.step
    seq = rows = None
    if cached_steps < n:  # the full-forward steps read the whole sequence, right-padded: row b is seq[b, :cur[b]]
        seq = torch.full((b, t + n), req.pad_token, dtype=torch.long, device=idx.device)
        seq[:, :t] = idx
        rows = torch.arange(b, device=idx.device)
    for i in range(n):
        if i == 0 and cached_steps > 0:
            logits = prefill(model, idx, lengths, cache)
        elif i < cached_steps:
            logits = step(model, token[:, None], cache)
        else:
            logits = _full_forward_logits(model, seq, cur)
        token = sample(logits, req.temperature, req.top_k, req.top_p, req.generator)
        if stopping:
            token = token.masked_fill(done, req.pad_token)
        if seq is not None:
            seq[rows, cur.long()] = token
            cur += 1
        yield token
        if stopping:
            done |= torch.isin(token, req.stop_tokens)
            if bool(done.all()):
                return


def stream_generate(
    model: MetaGPT,
    idx,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    *,
    top_p: float | None = None,
    stop_tokens: int | Sequence[int] | None = None,
    lengths: torch.Tensor | None = None,
    pad_token: int = 0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compile: bool = False,
    sliding: bool = True,
    attention_mask: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Like :func:`generate`, but yields each step's new tokens ``(B,)`` (int64) as soon as they are sampled; rows
    that stopped yield ``pad_token``. The arguments are checked before the first token is computed."""
    req = _Request(
        model,
        idx,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        stop_tokens,
        lengths,
        pad_token,
        generator,
        use_cache,
        compile,
        sliding,
        attention_mask,
    )
    return _eval_steps(model, req)


def _eval_steps(model: MetaGPT, req: _Request) -> Iterator[torch.Tensor]:
    training = model.training
    model.eval()
    try:
        for token in _steps(model, req):
            yield token.clone()  # out of inference mode: a plain tensor the caller may modify in place
    finally:
        model.train(training)


def generate(
    model: MetaGPT,
    idx,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    *,
    top_p: float | None = None,
    stop_tokens: int | Sequence[int] | None = None,
    lengths: torch.Tensor | None = None,
    pad_token: int = 0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compile: bool = False,
    sliding: bool = True,
    attention_mask: torch.Tensor | None = None,
):
    """Continues each prompt of ``idx`` by up to ``max_new_tokens`` tokens (see the module docstring for the forms of
    ``idx`` and of the result).

    Arguments:
        model: a :class:`~metagpt_fast.model.MetaGPT`.
        idx: ``(B, T)`` int64/int32 token ids, or a list of prompts (lists of ints or 1-D tensors).
        max_new_tokens: number of tokens to generate (fewer when every row stops early).
        temperature: ``0`` is greedy (argmax); otherwise logits are divided by it before sampling.
        top_k: sample among the ``top_k`` most likely tokens only.
        top_p: nucleus sampling, in ``(0, 1]``: sample among the most likely tokens whose probability reaches it.
        stop_tokens: token id(s) that end a row (kept in the output; the row is padded afterwards).
        lengths: ``(B,)`` prompt lengths of a right-padded ``idx`` (default: every row has ``T`` tokens).
        attention_mask: ``(B, T)`` bool or integer, for a left-padded ``idx`` (Hugging Face's convention): 1 on real
            tokens, 0 on the padding before them. Each row's positions start at its first real token; the result is
            ``idx`` followed by the new tokens. Not with ``lengths``.
        pad_token: token id written after a row's stop token, and after short rows of the result.
        generator: ``torch.Generator`` for the draws (reproducible sampling).
        use_cache: prefill + one decode step per token through the KV cache (``False``: a full forward per token).
        compile: compile the decode step with ``torch.compile(fullgraph=True)`` at static shapes (CUDA graphs via
            ``mode="reduce-overhead"`` on CUDA). The first call pays the compilation.
        sliding: past ``max_seq_length``, continue on the last ``max_seq_length`` tokens (``False``: raise).
    """
    req = _Request(
        model,
        idx,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        stop_tokens,
        lengths,
        pad_token,
        generator,
        use_cache,
        compile,
        sliding,
        attention_mask,
    )
    steps = list(_eval_steps(model, req))
    b, t = req.idx.shape
    new = torch.stack(steps, dim=1) if steps else req.idx.new_zeros(b, 0, dtype=torch.long)
    if req.left_padded is not None:  # every row ends at column T: its new tokens follow
        return torch.cat((req.left_padded, new.to(req.left_padded.dtype)), dim=1)
    if req.as_list:
        out = []
        for row, length, tokens in zip(req.idx, req.lengths.tolist(), new, strict=True):
            if req.stop_tokens.numel():
                hits = torch.isin(tokens, req.stop_tokens).nonzero()
                if hits.numel():
                    tokens = tokens[: int(hits[0, 0]) + 1]
            out.append(torch.cat((row[:length], tokens)))
        return out
    width = t + new.shape[1]
    cols = torch.arange(width, device=new.device)[None, :]
    prompt_cols = cols < req.lengths.long()[:, None]  # what follows a short prompt in idx is padding, not result
    out = torch.full((b, width), req.pad_token, dtype=req.idx.dtype, device=req.idx.device)
    out[:, :t] = torch.where(prompt_cols[:, :t], req.idx, out[:, :t])
    out.scatter_(1, req.lengths.long()[:, None] + cols[:, : new.shape[1]], new.to(out.dtype))
    return out
