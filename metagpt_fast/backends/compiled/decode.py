"""Compiled decode attention: ``metagpt_fast::decode_attention`` on CPU (csrc/cpu/decode_cpu.cpp: split-KV over
OpenMP threads, GQA groups packed per key, paged reads, an LSE combine). Inference only: the public op refuses
inputs that require grad, so the op has no autograd formula."""

from __future__ import annotations

import torch

from metagpt_fast.backends import compiled


@torch.library.register_fake("metagpt_fast::decode_attention")
def _(q, k_cache, v_cache, seqlens, batch_idx, block_table, scale, window_left, window_right, softcap, alibi_slopes,
      num_splits):  # fmt: skip
    b, nq, hq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((b, hq, nq), dtype=torch.float32)


def decode_attention(q, k_cache, v_cache, seqlens, batch_idx, block_table, scale, window_left, window_right, softcap,
                     alibi_slopes, num_splits):  # fmt: skip
    return torch.ops.metagpt_fast.decode_attention(
        q, k_cache, v_cache, seqlens, batch_idx, block_table, scale, window_left, window_right, softcap,
        alibi_slopes, num_splits,
    )  # fmt: skip


def extra_reasons(q, k_cache, v_cache, seqlens, batch_idx, block_table, scale, window_left, window_right, softcap,
                  alibi_slopes, num_splits) -> list[str]:  # fmt: skip
    # The cache is read in place (never copied): its rows must be unit-stride and both caches laid out alike.
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        return [
            f"k_cache and v_cache need one layout with a unit last stride, got strides {k_cache.stride()} and "
            f"{v_cache.stride()}"
        ]
    return []


# CPU at 10, above the reference: measured faster at every decode shape of bench/decode.py.
compiled.register("decode_attention", decode_attention, extra_reasons, cpu=(10, {}))
