"""``x + PE`` (the article's PositionalEncoding), forward and forward+backward (GB/s of minimum traffic).
Cases, providers and the ``setup_add_positional_encoding`` factory: ``metagpt_fast.bench.positional``."""

from metagpt_fast.bench.positional import AddPositionalEncodingBench

BENCH = AddPositionalEncodingBench()


def test_add_positional_encoding(bench_op, case, provider):
    bench_op(BENCH, case, provider)
