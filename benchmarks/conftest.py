"""pytest-benchmark suites, one file per op (``bench_<op>.py``), over the same cases and providers as
``metagpt-fast bench``::

    pytest benchmarks/ --benchmark-only                          # the device's default suite
    pytest benchmarks/bench_attention.py --bench-quick --bench-dtype float16 --benchmark-columns=median,iqr

Each test checks the provider's parity against the higher-precision reference on the same inputs (a backend of the
package outside the parity rule fails the test), then times it with the harness of ``metagpt-fast bench``
(``metagpt_fast.bench.interleave``): interleaved, round by round, with the case's reference and torch SDPA baseline,
until the speedups' 95% intervals are within ±5% or the time cap. pytest-benchmark's statistics are those same
per-round times of the provider (replayed into it), and the same rows as ``metagpt-fast bench`` (speedups with their
intervals) go to ``--bench-results`` (default ``bench-results/results.jsonl``). Interpreted Triton (no GPU) is
checked for parity and skipped for timing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run under the interpreter, set before triton is first imported (as in tests/).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from metagpt_fast.bench.core import Case, Measurement, Provider, Skipped, Unsupported, compare
from metagpt_fast.bench.results import RESULTS_FILE, ResultsFile
from metagpt_fast.bench.runner import apply_parity_rule, case_rows, finish, time_interleaved
from metagpt_fast.bench.suite import UNITS, OpBench, throughput
from metagpt_fast.bench.timing import TimingBudget
from metagpt_fast.commands.bench import choose_threads, resolve_device, resolve_dtypes

_THREAD_NOTE = pytest.StashKey[str | None]()


def pytest_addoption(parser):
    group = parser.getgroup("metagpt-fast benchmarks")
    group.addoption("--bench-device", default="auto", help="auto, cpu or cuda")
    group.addoption("--bench-dtype", default=None, help="comma-separated dtypes (default: float32 CPU, bfloat16 GPU)")
    group.addoption("--bench-quick", action="store_true", help="the CI-sized suite")
    group.addoption("--bench-results", default=str(Path("bench-results") / RESULTS_FILE), help="results file")


def pytest_configure(config):
    """As ``metagpt-fast bench``: on a CPU whose load average is at least its core count, 1 thread (said in the
    header)."""
    if not hasattr(config.option, "bench_device"):
        return
    device = resolve_device(config.getoption("--bench-device"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    threads, note = choose_threads(None, device, load, os.cpu_count() or 1, torch.get_num_threads())
    torch.set_num_threads(threads)
    config.stash[_THREAD_NOTE] = note


def pytest_report_header(config):
    note = config.stash.get(_THREAD_NOTE, None)
    return f"metagpt-fast benchmarks: {note}" if note else None


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself: collecting it here too would run it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    """Parametrises ``case`` x ``provider`` from the module's ``BENCH`` (an :class:`OpBench`)."""
    bench: OpBench | None = getattr(metafunc.module, "BENCH", None)
    if bench is None or not {"case", "provider"} <= set(metafunc.fixturenames):
        return
    config = metafunc.config
    device = resolve_device(config.getoption("--bench-device"))
    dtype_names = config.getoption("--bench-dtype")
    dtypes = resolve_dtypes(dtype_names.split(",") if dtype_names else None, device)
    cases = bench.cases(device, dtypes, config.getoption("--bench-quick"))
    providers = bench.providers(device)
    metafunc.parametrize("provider", providers, ids=[p.name for p in providers])
    metafunc.parametrize("case", cases, ids=[_case_id(c) for c in cases])


def _case_id(case: Case) -> str:
    return f"{case.mode}-{case.label.replace(' ', '-')}-{str(case.dtype).removeprefix('torch.')}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def bench_results(pytestconfig) -> ResultsFile:
    return ResultsFile(pytestconfig.getoption("--bench-results"))


@pytest.fixture
def bench_op(benchmark, bench_results, request):
    """``bench_op(BENCH, case, provider)``: parity, timing and results rows of one parametrised test."""
    quick = request.config.getoption("--bench-quick")
    return lambda bench, case, provider: run_benchmark(benchmark, bench, case, provider, bench_results, quick)


def run_benchmark(
    benchmark, bench: OpBench, case: Case, provider: Provider, results: ResultsFile, quick: bool = False
) -> None:
    """Parity against the reference, then pytest-benchmark timing; rows appended to the results file."""
    if provider.unavailable is not None:
        pytest.skip(f"{provider.name}: {provider.unavailable}")
    if provider.slow and not case.interpret_ok:
        pytest.skip("interpreted Triton: parity at the smallest size only")
    inputs = bench.inputs(case)
    too_large = bench.oracle_too_large(case)
    oracle = None if too_large else bench.oracle(case, inputs)
    try:
        prepared = provider.setup(case, inputs)
        outputs = prepared.parity()
    except Skipped as exc:
        pytest.skip(f"{provider.name}: {exc}")
    except Unsupported as exc:
        pytest.skip(f"{provider.name} cannot run this case: {exc}")
    except ValueError as exc:
        if str(exc).startswith("backend "):  # the registry's refusal of an explicit backend
            pytest.skip(str(exc))
        raise

    m = Measurement(case, provider.name, provider.kind, "ok")
    measurements = [m]
    if oracle is not None:
        slack = bench.parity_slack(case, inputs)
        compare(outputs, oracle, case.dtype, m, slack)
        if provider.name != "reference" and not m.within_tolerance:
            # The bound is the reference's own error on these inputs (unless float32 is within the fixed tolerance).
            reference = next(p for p in bench.providers(case.device) if p.name == "reference")
            ref = Measurement(case, "reference", "backend", "parity only")
            compare(reference.setup(case, inputs).parity(), oracle, case.dtype, ref, slack)
            measurements.insert(0, ref)
        apply_parity_rule(measurements)
    del outputs

    if provider.slow:
        m.status = "parity only"
        results.append(case_rows(bench, [m]))
        assert not m.parity_violation, m.parity_note
        pytest.skip("interpreted Triton: parity checked, not timed")

    # The same harness as `metagpt-fast bench`: interleaved rounds with the case's baselines (timed, not reported).
    timed = [(m, prepared, False)]
    for baseline in _baselines(bench, case, provider):
        try:
            other = baseline.setup(case, inputs)
        except (Unsupported, ValueError):
            continue
        timed.append((Measurement(case, baseline.name, baseline.kind, "ok"), other, False))
    budget = TimingBudget.quick() if quick else TimingBudget()
    time_interleaved(bench, case, timed, budget)
    if m.timing is None:
        pytest.fail(f"{provider.name}: {m.status}: {m.note}")
    _replay(benchmark, [ms / 1e3 for ms in m.samples_ms])
    finish(bench, m, prepared, budget)
    unit = UNITS[bench.unit][2]
    benchmark.extra_info.update(
        {unit: throughput(bench, case, m.timing.median_ms), "max_err": m.max_err, **m.extra, "shape": case.shape}
    )
    results.append(case_rows(bench, [m]))
    if provider.kind == "backend":
        assert not m.parity_violation, m.parity_note


def _baselines(bench: OpBench, case: Case, provider: Provider) -> list[Provider]:
    """The reference and (attention) torch SDPA of the case, when runnable and not the provider itself."""
    names = {"reference", bench.sdpa_baseline} - {provider.name, None}
    return [p for p in bench.providers(case.device) if p.name in names and p.unavailable is None and not p.slow]


def _replay(benchmark, seconds: list[float]) -> None:
    """Feeds already-measured per-call times to pytest-benchmark: its timer is replaced by a clock that advances by
    the next sample when the no-op target runs, so its statistics (and --benchmark-compare) are the harness's."""
    clock = {"t": 0.0}
    pending = iter(seconds)

    def target() -> None:
        clock["t"] += next(pending)

    benchmark._timer = lambda: clock["t"]  # noqa: SLF001  (pytest-benchmark has no public way to feed samples)
    benchmark.pedantic(target, rounds=len(seconds), iterations=1, warmup_rounds=0)
