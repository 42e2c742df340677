"""Thin modules over the functional ops: parameters + a backend choice; state_dicts do not depend on the backend."""

from metagpt_fast.nn.attention import MLP, CausalSelfAttention, PackedSequences, TransformerBlock
from metagpt_fast.nn.loss import LinearCrossEntropy
from metagpt_fast.nn.multihead import MultiheadAttention
from metagpt_fast.nn.norm import LayerNorm, RMSNorm
from metagpt_fast.nn.positional import PositionalEncoding, RotaryEmbedding, TokenPositionalEmbedding

__all__ = [
    "MLP",
    "CausalSelfAttention",
    "LayerNorm",
    "LinearCrossEntropy",
    "MultiheadAttention",
    "PackedSequences",
    "PositionalEncoding",
    "RMSNorm",
    "RotaryEmbedding",
    "TokenPositionalEmbedding",
    "TransformerBlock",
]
