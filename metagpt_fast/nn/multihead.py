"""``MultiheadAttention``: ``torch.nn.MultiheadAttention`` with its attention computed by the package's fused op.

It subclasses ``torch.nn.MultiheadAttention``: same constructor arguments, parameter names (``in_proj_weight``,
``in_proj_bias``, ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when ``kdim``/``vdim`` differ, ``out_proj``,
``bias_k``/``bias_v``), initialisation and forward signature, so a state_dict loads either way and code that checks
``isinstance(m, nn.MultiheadAttention)`` keeps working.

Two paths:

- fused (``need_weights=False``, what ``nn.TransformerEncoderLayer``/``DecoderLayer`` ask for): projections, then
  :func:`metagpt_fast.scaled_dot_product_attention` on ``(B, H, L, head_dim)`` views with the masks passed through
  broadcast strides (a key-padding mask stays ``(B, 1, 1, S)``), then the output projection;
- explicit (``need_weights=True``, torch's default, which returns the attention weights): the same projections and
  masks, the probabilities computed step by step with the same masked softmax as the reference op.

Masks follow torch's module conventions: boolean ``key_padding_mask`` / ``attn_mask`` are True where attention is
NOT allowed (the opposite of SDPA's), float masks are added to the scores. ``is_causal=True`` is a hint that
``attn_mask`` is the causal mask, used instead of it when there is no key-padding mask and no weights are returned.

One documented difference: a query whose every key is masked gets attention output 0 (so the module returns
``out_proj.bias`` there), zero weights and finite gradients on both paths; ``torch.nn.MultiheadAttention`` returns
NaN for such rows when it computes weights (``need_weights=True``, its default).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metagpt_fast.ops import scaled_dot_product_attention


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for ``torch.nn.MultiheadAttention`` (same arguments), plus keyword-only ``backend``.

    Arguments: ``embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False, kdim=None,
    vdim=None, batch_first=False, device=None, dtype=None`` exactly as torch's; ``backend``: see
    :func:`metagpt_fast.scaled_dot_product_attention` (``None`` follows :func:`metagpt_fast.use_backend`).
    """

    def __init__(self, *args, backend: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, backend: str | None = None) -> MultiheadAttention:
        """A module of this class sharing ``module``'s parameters, buffers, hooks and training mode (no copy)."""
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        # Own containers holding the same tensors: adding a parameter to one module later does not touch the other.
        for name in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            if name in module.__dict__:
                new.__dict__[name] = type(module.__dict__[name])(module.__dict__[name])
        new.backend = backend
        return new

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("backend", None)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Same arguments and results as ``torch.nn.MultiheadAttention.forward``.

        Arguments:
            query: ``(L, E)`` unbatched, ``(L, B, E)``, or ``(B, L, E)`` with ``batch_first=True``.
            key: ``(S, kdim)``, ``(S, B, kdim)`` or ``(B, S, kdim)``.
            value: ``(S, vdim)``, ``(S, B, vdim)`` or ``(B, S, vdim)``.
            key_padding_mask: ``(B, S)`` (or ``(S,)`` unbatched); bool True = ignore that key, or float added.
            need_weights: also return the attention weights (explicit path).
            attn_mask: ``(L, S)`` or ``(B * num_heads, L, S)``; bool True = not allowed, or float added.
            average_attn_weights: average the returned weights over heads.
            is_causal: hint that ``attn_mask`` is the causal mask (requires ``attn_mask``, like torch).

        Returns:
            ``(attn_output, attn_weights)``: output shaped like ``query`` with ``embed_dim`` features; weights
            ``(B, L, S)`` (averaged) or ``(B, num_heads, L, S)``, or ``None`` when ``need_weights=False``.
        """
        if query.is_nested or key.is_nested or value.is_nested:
            # Nested (ragged) inputs come from torch's own fast paths; torch's implementation serves them.
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        batched = query.dim() == 3
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"query, key and value must all be 2-D (unbatched) or 3-D, got {query.dim()}, {key.dim()}, "
                f"{value.dim()} dimensions"
            )
        if not batched:  # (L, E) -> (1, L, E)
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E), as views
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as torch.nn.MultiheadAttention)")

        q, k, v = self._project(query, key, value)  # (B, H, L, hd), (B, H, S', hd) with S' = S + extra keys
        b, _, tgt_len, _ = q.shape
        extra_keys = k.shape[-2] - key.shape[-2]  # bias_k and/or the zero key, attended by every query
        # torch's hint: with no padding mask and no weights requested, is_causal replaces attn_mask.
        use_causal = is_causal and key_padding_mask is None and not need_weights
        mask = None
        if not use_causal:
            mask = self._merge_masks(attn_mask, key_padding_mask, b, tgt_len, key.shape[-2], extra_keys, q.dtype)
        p = self.dropout if self.training else 0.0

        if need_weights:
            out, weights = _explicit_attention(q, k, v, mask, p)
            weights = weights.mean(dim=1) if average_attn_weights else weights
        else:
            out = scaled_dot_product_attention(q, k, v, mask, p, use_causal, backend=self.backend)
            weights = None

        out = F.linear(
            out.transpose(1, 2).reshape(b, tgt_len, self.embed_dim), self.out_proj.weight, self.out_proj.bias
        )
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input projections, ``bias_k``/``bias_v`` and the zero key, split into heads: ``(B, H, N, head_dim)``."""
        e, h = self.embed_dim, self.num_heads
        if query.shape[-1] != e:
            raise ValueError(f"query must have embed_dim={e} features, got {query.shape[-1]}")
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if self._qkv_same_embed_dim:
            if query is key and key is value:  # self-attention: one GEMM
                q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            else:
                w_q, w_k, w_v = self.in_proj_weight.chunk(3)
                q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        else:
            q = F.linear(query, self.q_proj_weight, b_q)
            k = F.linear(key, self.k_proj_weight, b_k)
            v = F.linear(value, self.v_proj_weight, b_v)
        b = q.shape[0]
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.reshape(1, 1, e).expand(b, 1, e).to(k.dtype)], dim=1)
            v = torch.cat([v, self.bias_v.reshape(1, 1, e).expand(b, 1, e).to(v.dtype)], dim=1)
        elif self.bias_k is not None or self.bias_v is not None:
            raise ValueError("bias_k and bias_v must be both set or both None")
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(b, 1, e)], dim=1)
            v = torch.cat([v, v.new_zeros(b, 1, e)], dim=1)

        def heads(x: torch.Tensor) -> torch.Tensor:  # (B, N, E) -> (B, H, N, E / H), a view
            return x.unflatten(-1, (h, e // h)).transpose(1, 2)

        return heads(q), heads(k), heads(v)

    def _merge_masks(
        self,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        batch: int,
        tgt_len: int,
        src_len: int,
        extra_keys: int,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """One SDPA mask (bool True = attend, or additive of ``dtype``) broadcastable to ``(B, H, L, S')``.

        Stays in broadcast form where possible: a key-padding mask alone is ``(B, 1, 1, S')``, a 2-D attn_mask
        ``(1, 1, L, S')``.
        """
        masks = []
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if tuple(attn_mask.shape) != (tgt_len, src_len):
                    raise RuntimeError(
                        f"2D attn_mask must have shape {(tgt_len, src_len)}, got {tuple(attn_mask.shape)}"
                    )
                attn_mask = attn_mask[None, None]
            elif attn_mask.dim() == 3:
                expected = (batch * self.num_heads, tgt_len, src_len)
                if tuple(attn_mask.shape) != expected:
                    raise RuntimeError(f"3D attn_mask must have shape {expected}, got {tuple(attn_mask.shape)}")
                attn_mask = attn_mask.view(batch, self.num_heads, tgt_len, src_len)
            else:
                raise RuntimeError(f"attn_mask must be 2-D or 3-D, got {attn_mask.dim()} dimensions")
            masks.append(_to_sdpa_mask(attn_mask, "attn_mask", dtype))
        if key_padding_mask is not None:
            if tuple(key_padding_mask.shape) != (batch, src_len):
                raise RuntimeError(
                    f"key_padding_mask must have shape {(batch, src_len)}, got {tuple(key_padding_mask.shape)}"
                )
            masks.append(_to_sdpa_mask(key_padding_mask[:, None, None, :], "key_padding_mask", dtype))
        if not masks:
            return None
        if len(masks) == 2:
            a, kp = masks
            if a.dtype == torch.bool and kp.dtype == torch.bool:
                mask = a & kp
            else:  # torch adds the two after turning booleans into -inf
                mask = _as_additive(a, dtype) + _as_additive(kp, dtype)
        else:
            mask = masks[0]
        if extra_keys:  # bias_k / the zero key: attended by every query (torch pads the masks with 0)
            pad = True if mask.dtype == torch.bool else 0.0
            mask = F.pad(mask, (0, extra_keys), value=pad)
        return mask


def _to_sdpa_mask(mask: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return ~mask  # torch's modules: True = masked out; SDPA: True = attend
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be bool or floating point, got {mask.dtype}")
    return mask.to(dtype)


def _as_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output, probabilities)`` computed step by step, with the reference op's masked softmax (0 for a row
    whose every key is masked, not NaN). Probabilities are returned after dropout, as torch returns them."""
    scores = (q @ k.transpose(-2, -1)).float() * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = (weights / torch.where(denom > 0, denom, torch.ones_like(denom))).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p, training=True)
    return probs @ v, probs
