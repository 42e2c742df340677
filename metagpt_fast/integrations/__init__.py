"""Integrations that route existing code through metagpt_fast without rewriting it.

- :mod:`metagpt_fast.integrations.sdpa`: route ``torch.nn.functional.scaled_dot_product_attention`` calls through
  :func:`metagpt_fast.scaled_dot_product_attention` (context manager and global switch).
- :mod:`metagpt_fast.integrations.hf`: ``attn_implementation="metagpt_fast"`` for Hugging Face transformers, and the
  fused rotary patch for Llama-family models (needs ``transformers``; imported on demand).
- :mod:`metagpt_fast.integrations.hf_alibi`: ``hf.patch_alibi`` for BLOOM and MPT, whose ALiBi attention does not
  go through transformers' ``AttentionInterface``.
"""

from metagpt_fast.integrations.sdpa import disable_sdpa_routing, enable_sdpa_routing, routing_sdpa, sdpa_routing

__all__ = ["disable_sdpa_routing", "enable_sdpa_routing", "routing_sdpa", "sdpa_routing"]
