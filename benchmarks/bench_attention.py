"""Attention forward / backward / forward+backward: the package's backends against torch SDPA (each kernel the
device has), FlexAttention and flash-attn. Cases, providers and the ``setup_attention`` factory:
``metagpt_fast.bench.attention``."""

from metagpt_fast.bench.attention import AttentionBench

BENCH = AttentionBench()


def test_attention(bench_op, case, provider):
    bench_op(BENCH, case, provider)
