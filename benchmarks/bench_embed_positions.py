"""Fused token embedding x scale + sinusoidal encoding, forward and forward+backward (GB/s of minimum traffic).
Cases, providers and the ``setup_embed_positions`` factory: ``metagpt_fast.bench.positional``."""

from metagpt_fast.bench.positional import EmbedPositionsBench

BENCH = EmbedPositionsBench()


def test_embed_positions(bench_op, case, provider):
    bench_op(BENCH, case, provider)
