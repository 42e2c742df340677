"""Runs a benchmark suite: for every case, every provider's parity against the reference, then its timing.

Per case: for each provider, set up (may be *unsupported*, or *skipped* at a size it should not run), compute the
outputs and gradients once and compare them with the higher-precision reference (``max_abs_err``); then time every
provider that got this far together, interleaved round by round (``metagpt_fast.bench.interleave``: speedups per
round with a confidence interval, noisy ones flagged); then measure each one's peak memory. Interpreted Triton
stops after the parity step (*parity only*). A provider that fails is reported with its error; it never stops the
suite. Rows go to the results file after each case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable, Sequence

import torch

from metagpt_fast.bench.attention import AttentionBench
from metagpt_fast.bench.core import (
    BASELINE_SDPA,
    Case,
    Measurement,
    Prepared,
    Provider,
    Skipped,
    Unsupported,
    compare,
)
from metagpt_fast.bench.decode import DecodeBench
from metagpt_fast.bench.interleave import clock_for, estimate, interleave
from metagpt_fast.bench.linear_cross_entropy import LinearCrossEntropyBench
from metagpt_fast.bench.memory import peak_memory
from metagpt_fast.bench.norms import LayerNormBench
from metagpt_fast.bench.positional import AddPositionalEncodingBench, EmbedPositionsBench
from metagpt_fast.bench.results import ResultsFile, device_name, make_row
from metagpt_fast.bench.rotary import RotaryBench
from metagpt_fast.bench.suite import UNITS, OpBench, throughput
from metagpt_fast.bench.timing import Timing, TimingBudget
from metagpt_fast.bench.train_step import TrainStepBench
from metagpt_fast.testing import ATOL, RTOL, rule_bound

BENCHES: dict[str, type[OpBench]] = {
    "attention": AttentionBench,
    "embed_positions": EmbedPositionsBench,
    "add_positional_encoding": AddPositionalEncodingBench,
    "rotary": RotaryBench,
    "layer_norm": LayerNormBench,
    "linear_cross_entropy": LinearCrossEntropyBench,
    "decode": DecodeBench,
    "train_step": TrainStepBench,
}
INTERPRETED_NOTE = "interpreted Triton (TRITON_INTERPRET=1): checked for parity, never timed"


@dataclasses.dataclass
class OpPlan:
    bench: OpBench
    cases: list[Case]
    providers: list[Provider]  # runnable ones, after the --backends filter

    @property
    def unavailable(self) -> dict[str, str]:
        return {p.name: p.unavailable for p in self.providers if p.unavailable is not None}

    @property
    def runnable(self) -> list[Provider]:
        return [p for p in self.providers if p.unavailable is None]


@dataclasses.dataclass
class OpResult:
    plan: OpPlan
    measurements: list[Measurement]
    cases_not_run: int = 0  # stopped by the time budget


def make_plan(
    ops: Sequence[str], device: str, dtypes: Sequence[torch.dtype], quick: bool, only: Sequence[str] | None = None
) -> list[OpPlan]:
    """The suite to run; ``only`` keeps the named providers (an unknown name is an error listing the known ones)."""
    unknown_ops = [op for op in ops if op not in BENCHES]
    if unknown_ops:
        raise ValueError(f"unknown op(s) {unknown_ops}; choose from {list(BENCHES)}")
    plans = []
    for op in ops:
        bench = BENCHES[op]()
        plans.append(OpPlan(bench, bench.cases(device, list(dtypes), quick), bench.providers(device)))
    if only is not None:
        known = {p.name for plan in plans for p in plan.providers}
        unknown = sorted(set(only) - known)
        if unknown:
            raise ValueError(f"unknown backend(s) {unknown} for these ops; choose from {sorted(known)}")
        for plan in plans:
            plan.providers = [p for p in plan.providers if p.name in only]
    return plans


def prepare(
    bench: OpBench, case: Case, provider: Provider, inputs: dict, oracle: list[torch.Tensor] | None, budget
) -> tuple[Measurement, Prepared | None, bool]:
    """Setup and parity of one provider on one case: the measurement, what to time (None: nothing) and whether its
    parity run was so slow that it served as the warm-up."""
    m = Measurement(case, provider.name, provider.kind, status="ok")
    if provider.slow and not case.interpret_ok:
        m.status, m.note = "skipped", "interpreted Triton: parity at the smallest size only"
        return m, None, False
    try:
        prepared = provider.setup(case, inputs)
        began = time.perf_counter()
        outputs = prepared.parity()
        warmed = time.perf_counter() - began > budget.max_s / 3  # the parity run was this slow kernel's warm-up
        if oracle is not None:
            compare(outputs, oracle, case.dtype, m, bench.parity_slack(case, inputs))
        del outputs
        if provider.slow:
            m.status, m.note = "parity only", INTERPRETED_NOTE
            return m, None, False
        return m, prepared, warmed
    except Exception as exc:  # noqa: BLE001  (a broken provider is reported, never stops the suite)
        _fail(m, exc)
    return m, None, False


def _fail(m: Measurement, exc: BaseException) -> None:
    """The status and note of a provider that raised: skipped, unsupported or failed."""
    if isinstance(exc, Skipped):
        m.status, m.note = "skipped", str(exc)
    elif isinstance(exc, Unsupported):
        m.status, m.note = "unsupported", str(exc)
    elif isinstance(exc, ValueError):
        # The registry refuses an explicit backend with "backend 'x' cannot run ...": unsupported, not broken.
        m.status = "unsupported" if str(exc).startswith("backend ") else "failed"
        m.note = str(exc) if m.status == "unsupported" else f"ValueError: {exc}"
    elif isinstance(exc, torch.cuda.OutOfMemoryError):
        m.status, m.note = "failed", "CUDA out of memory"
    else:
        m.status, m.note = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    m.timing = None


def ratio_pairs(bench: OpBench, names: Sequence[str]) -> dict[tuple[str, str], str]:
    """The speedups to estimate among the timed providers ``names``: (provider, baseline) -> metric name."""
    baselines = {"reference": "speedup_vs_reference"}
    if bench.sdpa_baseline is not None:
        baselines[bench.sdpa_baseline] = f"speedup_vs_{BASELINE_SDPA.replace('-', '_')}"
    return {(p, b): metric for b, metric in baselines.items() if b in names for p in names if p != b}


def time_interleaved(
    bench: OpBench,
    case: Case,
    timed: Sequence[tuple[Measurement, Prepared, bool]],
    budget: TimingBudget,
    clock=None,
) -> None:
    """Times the prepared providers of one case together, in rotating rounds (``metagpt_fast.bench.interleave``),
    and fills each measurement's timing, per-round ratios and noise flags (or its failure)."""
    if not timed:
        return
    calls = {m.provider: prepared.run for m, prepared, _ in timed}
    resets = {m.provider: _resetter(prepared.grad_to_none) for m, prepared, _ in timed}
    pairs = ratio_pairs(bench, list(calls))
    result = interleave(
        calls,
        list(pairs),
        budget,
        clock or clock_for(case.device),
        before_call=resets,
        skip_warmup=[m.provider for m, _, warmed in timed if warmed],
    )
    for m, prepared, _ in timed:
        for t in prepared.grad_to_none:
            t.grad = None
        if m.provider in result.failures:
            _fail(m, result.failures[m.provider])
            continue
        samples = result.samples.get(m.provider) or []
        if not samples:
            continue
        est = estimate(samples)
        m.timing = Timing(est.median, est.p20, est.p80, len(samples), est.ci_low, est.ci_high)
        m.rounds = result.rounds
        m.samples_ms = list(samples)
        for (provider, baseline), metric in pairs.items():
            ratio = result.ratios.get((provider, baseline))
            if provider == m.provider and ratio is not None:
                m.ratios[metric] = ratio
                if ratio.noisy(budget.tolerance):
                    m.noisy.append(metric)


def _resetter(tensors):
    def reset() -> None:
        for t in tensors:
            t.grad = None

    return reset


def finish(bench: OpBench, m: Measurement, prepared: Prepared, budget: TimingBudget) -> None:
    """Peak memory, work and the op's extra metrics of a timed measurement."""
    if m.timing is None:
        return
    try:
        if m.timing.median_ms <= 1e3 * budget.max_s / 3:  # one more call of a multi-second kernel is not worth it
            m.peak_bytes = peak_memory(prepared.run, m.case.device)
    except Exception as exc:  # noqa: BLE001
        _fail(m, exc)
        return
    m.work = bench.work(m.case)
    m.extra = bench.extra_metrics(m.case, m.timing)


def measure(
    bench: OpBench, case: Case, provider: Provider, inputs: dict, oracle: list[torch.Tensor] | None, budget
) -> Measurement:
    """Parity, then timing and peak memory, of one provider on one case, timed alone."""
    m, prepared, warmed = prepare(bench, case, provider, inputs, oracle, budget)
    if prepared is not None:
        time_interleaved(bench, case, [(m, prepared, warmed)], budget)
        finish(bench, m, prepared, budget)
    return m


def run_plans(
    plans: Sequence[OpPlan],
    budget: TimingBudget,
    results: ResultsFile | None = None,
    on_progress: Callable[[str], None] | None = None,
    max_seconds: float | None = None,
) -> list[OpResult]:
    """Runs every case of every plan; ``on_progress(label)`` is called after each (case, provider)."""
    started = time.perf_counter()
    out = []
    for plan in plans:
        result = OpResult(plan, [])
        out.append(result)
        if results is not None:
            results.append(_unavailable_rows(plan))
        for i, case in enumerate(plan.cases):
            if max_seconds is not None and time.perf_counter() - started > max_seconds:
                result.cases_not_run = len(plan.cases) - i
                break
            measurements = run_case(plan, case, budget, on_progress)
            result.measurements += measurements
            if results is not None:
                results.append(case_rows(plan.bench, measurements))
    return out


def run_case(plan: OpPlan, case: Case, budget: TimingBudget, on_progress=None) -> list[Measurement]:
    bench = plan.bench
    inputs = bench.inputs(case)
    oracle, oracle_note = None, bench.oracle_too_large(case)
    if oracle_note is None:
        try:
            oracle = bench.oracle(case, inputs)
        except torch.cuda.OutOfMemoryError:
            oracle_note = "the reference ran out of memory"
    measurements, timed = [], []
    for provider in plan.runnable:
        m, prepared, warmed = prepare(bench, case, provider, inputs, oracle, budget)
        if oracle is None and m.status in ("ok", "parity only"):
            m.note = "; ".join(filter(None, [m.note, f"no parity check: {oracle_note}"]))
        measurements.append(m)
        if prepared is not None:
            timed.append((m, prepared, warmed))
    # Every provider that passed setup is timed in the same rounds, so drift on a shared machine hits all alike.
    time_interleaved(bench, case, timed, budget)
    for m, prepared, _ in timed:
        finish(bench, m, prepared, budget)
    if on_progress is not None:
        for m in measurements:
            on_progress(f"{case.op} {case.mode} {case.label} {m.provider}")
    apply_parity_rule(measurements)
    del inputs, oracle, timed
    gc.collect()
    if torch.device(case.device).type == "cuda":
        torch.cuda.empty_cache()
    return measurements


def apply_parity_rule(measurements: Sequence[Measurement]) -> None:
    """Flags measurements outside the test suite's parity rule (``metagpt_fast.testing``), output by output and
    gradient by gradient: at most twice as far from the oracle as the reference backend on the same inputs, plus the
    rule's floor (``parity_atol``) and the op's documented slack. The reference is never flagged against itself.
    Without a reference measurement there is no error to measure: float32 / float64 results are then held to the
    fixed atol + rtol, as ``assert_parity`` holds a check without a reference run."""
    ref = next((m for m in measurements if m.provider == "reference" and m.errors is not None), None)
    for m in measurements:
        if m.errors is None or m is ref:
            continue
        dtype = m.case.dtype
        if ref is None or len(ref.errors) != len(m.errors):
            if m.within_tolerance is False:
                m.parity_violation = True
                m.parity_note = (
                    f"no reference measurement, and outside the fixed atol {ATOL[dtype] + m.slack:.3g} "
                    f"+ rtol {RTOL[dtype]:g} x |oracle|"
                )
            continue
        floors = m.atols if m.atols is not None else [ATOL[dtype]] * len(m.errors)
        for i, (err, ref_err, floor) in enumerate(zip(m.errors, ref.errors, floors, strict=True)):
            if not err <= rule_bound(ref_err, floor, m.slack):
                m.parity_violation = True
                slack = f" + slack {m.slack:.2e}" if m.slack else ""
                m.parity_note = f"tensor {i}: {err:.2e} > 2 x the reference's {ref_err:.2e} + atol {floor:.2e}{slack}"
                break


def speedups(bench: OpBench, measurements: Sequence[Measurement]) -> dict[str, dict[str, float]]:
    """Per provider: speedups against the reference backend and (attention) torch SDPA: the median of the per-round
    ratios when the providers were timed interleaved, else the ratio of median times."""
    times = {m.provider: m.timing.median_ms for m in measurements if m.timing is not None}
    out = {}
    for m in measurements:
        if m.timing is None:
            continue
        ratios = {}
        if m.ratios:
            out[m.provider] = {metric: est.median for metric, est in m.ratios.items()}
            if m.provider == "reference" and "reference" in times:
                out[m.provider]["speedup_vs_reference"] = 1.0
            if bench.sdpa_baseline is not None and m.provider == bench.sdpa_baseline:
                out[m.provider][f"speedup_vs_{BASELINE_SDPA.replace('-', '_')}"] = 1.0
            continue
        if "reference" in times:
            ratios["speedup_vs_reference"] = times["reference"] / m.timing.median_ms
        if bench.sdpa_baseline is not None and bench.sdpa_baseline in times:
            ratios[f"speedup_vs_{BASELINE_SDPA.replace('-', '_')}"] = times[bench.sdpa_baseline] / m.timing.median_ms
        out[m.provider] = ratios
    return out


def _row(m: Measurement, metric: str, value, p20=None, p80=None, note: str = "", **interval) -> dict:
    case = m.case
    return make_row(
        op=case.op,
        backend=m.provider,
        mode=case.mode,
        shape=case.shape,
        dtype=case.dtype,
        metric=metric,
        value=value,
        p20=p20,
        p80=p80,
        device=device_name(case.device),
        note=note,
        **interval,
    )


def case_rows(bench: OpBench, measurements: Sequence[Measurement]) -> list[dict]:
    """Results-file rows of one case's measurements."""
    rows = []
    ratios = speedups(bench, measurements)
    metric = UNITS[bench.unit][0]
    for m in measurements:
        if m.status != "ok":
            rows.append(_row(m, "status", None, note=f"{m.status}: {m.note}" if m.note else m.status))
        if m.max_err is not None:
            violation = f"outside the parity rule: {m.parity_note}" if m.parity_violation else ""
            rows.append(_row(m, "max_abs_err", m.max_err, note=violation))
        if m.timing is None:
            continue
        t, case = m.timing, m.case
        rows.append(
            _row(
                m,
                "time_ms",
                t.median_ms,
                t.p20_ms,
                t.p80_ms,
                note=m.note,
                ci_low=t.ci_low_ms,
                ci_high=t.ci_high_ms,
                rounds=m.rounds,
            )
        )
        # The fastest 20% of calls give the top 20% throughput: p20 of throughput comes from p80 of time.
        tput = [throughput(bench, case, ms) for ms in (t.median_ms, t.p80_ms, t.p20_ms)]
        rows.append(_row(m, metric, *tput))
        if m.peak_bytes is not None:
            rows.append(_row(m, "peak_mem_mib", m.peak_bytes / 2**20))
        for name, value in {**ratios.get(m.provider, {}), **m.extra}.items():
            est = m.ratios.get(name)
            if est is None:
                rows.append(_row(m, name, value))
                continue
            rows.append(
                _row(
                    m,
                    name,
                    est.median,
                    est.p20,
                    est.p80,
                    note="noisy: the 95% interval stayed wider than the tolerance" if name in m.noisy else "",
                    ci_low=est.ci_low,
                    ci_high=est.ci_high,
                    rounds=est.rounds,
                    noisy=name in m.noisy,
                )
            )
    return rows


def _unavailable_rows(plan: OpPlan) -> list[dict]:
    if not plan.cases:
        return []
    case = plan.cases[0]
    return [
        make_row(
            op=plan.bench.op,
            backend=name,
            mode="",
            shape={},
            dtype="",
            metric="status",
            value=None,
            device=device_name(case.device),
            note=f"unavailable: {reason}",
        )
        for name, reason in plan.unavailable.items()
    ]
