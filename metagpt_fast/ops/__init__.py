"""Public functional ops; each validates its inputs, asks the backend registry for an implementation and runs it.

Each module declares its op (``backends.declare_op``, with its reference implementation) and defines the public
function; every name in ``__all__`` is also exported by the package root.
"""

from metagpt_fast.ops.attention import scaled_dot_product_attention
from metagpt_fast.ops.bias_gelu import bias_gelu
from metagpt_fast.ops.flash import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from metagpt_fast.ops.kvcache import flash_attn_with_kvcache
from metagpt_fast.ops.linear_cross_entropy import linear_cross_entropy
from metagpt_fast.ops.norms import layer_norm, rms_norm
from metagpt_fast.ops.positional import add_positional_encoding, embed_positions
from metagpt_fast.ops.rotary import apply_rotary

__all__ = [
    "add_positional_encoding",
    "apply_rotary",
    "bias_gelu",
    "embed_positions",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "layer_norm",
    "linear_cross_entropy",
    "rms_norm",
    "scaled_dot_product_attention",
]
