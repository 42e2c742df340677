"""Rotary embedding of q and k, forward and forward+backward, against Liger-Kernel's and flash-attn's rotary when
installed. Cases, providers and the ``setup_rotary`` factory: ``metagpt_fast.bench.rotary``."""

from metagpt_fast.bench.rotary import RotaryBench

BENCH = RotaryBench()


def test_rotary(bench_op, case, provider):
    bench_op(BENCH, case, provider)
