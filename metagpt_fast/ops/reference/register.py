"""Registers the reference implementations: they serve every valid input, on every device."""

from __future__ import annotations

from metagpt_fast import backends
from metagpt_fast.ops.reference.attention import attention
from metagpt_fast.ops.reference.positional import add_positional_encoding, embed_positions
from metagpt_fast.ops.reference.rotary import apply_rotary


def _attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, seed):
    # The reference draws dropout from torch's generator: replaying a kernel's Philox mask is a test-only path
    # (``dropout_mask=``), too slow for training.
    return attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _embed_positions(tokens, weight, scale, offset, dropout_p, sinusoidal, seed):
    return embed_positions(tokens, weight, scale, offset, dropout_p, sinusoidal)


def _add_positional_encoding(x, offset, dropout_p, seed):
    return add_positional_encoding(x, offset, dropout_p)


def _rotary(q, k, position_ids, offset, rotary_dim, base, interleaved, inplace):
    q_out, k_out = apply_rotary(q, k, position_ids, offset, rotary_dim, base, interleaved)
    if inplace:
        return q.copy_(q_out), k.copy_(k_out)
    return q_out, k_out


backends.register("attention", "reference", _attention, priority=-100)
backends.register("embed_positions", "reference", _embed_positions, priority=-100)
backends.register("add_positional_encoding", "reference", _add_positional_encoding, priority=-100)
backends.register("rotary", "reference", _rotary, priority=-100)
