"""One MetaGPT training step (forward, loss, backward, clipping, AdamW) per backend: tokens/s, TFLOP/s, MFU.
Cases, providers and the ``setup_train_step`` factory: ``metagpt_fast.bench.train_step``."""

from metagpt_fast.bench.train_step import TrainStepBench

BENCH = TrainStepBench()


def test_train_step(bench_op, case, provider):
    bench_op(BENCH, case, provider)
