"""Measuring side of the package: the benchmark harness behind ``metagpt-fast bench`` and ``benchmarks/``.

- ``formulas``: FLOPs / bytes / model-FLOPs formulas and the GPU peak table for MFU;
- ``timing``: CUDA-event (``triton.testing.do_bench``) and CPU wall-clock timing, median and 20/80 percentiles;
- ``memory``: peak memory of one call; ``results``: the JSON-lines results file and its columns;
- ``core`` / ``suite``: cases, providers (backends + external baselines), parity against the reference;
- ``attention``, ``positional``, ``rotary``, ``train_step``: one benchmark per op;
- ``runner``, ``report``, ``plots``: running a suite, its tables, its PNG; ``profiling``: ``metagpt-fast profile``.
"""
