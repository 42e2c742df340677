"""Readable pure-PyTorch implementations of every op: the test oracle and the fallback on any device."""

from metagpt_fast.ops.reference.attention import attention
from metagpt_fast.ops.reference.linear_cross_entropy import linear_cross_entropy
from metagpt_fast.ops.reference.positional import add_positional_encoding, embed_positions, sinusoidal_table
from metagpt_fast.ops.reference.random import dropout_keep_mask
from metagpt_fast.ops.reference.rotary import apply_rotary

__all__ = [
    "add_positional_encoding",
    "apply_rotary",
    "attention",
    "dropout_keep_mask",
    "embed_positions",
    "linear_cross_entropy",
    "sinusoidal_table",
]
