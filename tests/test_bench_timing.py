"""Interleaved timing and regression reports of the bench, driven by a fake clock: the round-robin schedule, the
per-round ratios and their bootstrap intervals, the stopping rule, noise flags, the thread default under load, and
``--compare`` / ``--fail-on-regression``. Deterministic and fast; the end-to-end CLI runs are marked slow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from metagpt_fast import cli
from metagpt_fast.bench.compare import compare_rows, regressions
from metagpt_fast.bench.core import Case, Measurement, Provider, functional
from metagpt_fast.bench.interleave import estimate, interleave, ratio_estimate
from metagpt_fast.bench.results import COLUMNS, RESULTS_FILE, make_row, read_results
from metagpt_fast.bench.runner import OpPlan, case_rows, ratio_pairs, run_case, time_interleaved
from metagpt_fast.bench.suite import OpBench
from metagpt_fast.bench.timing import TimingBudget
from metagpt_fast.commands.bench import choose_threads


class FakeClock:
    """Time advances only by the durations ``cost(name, call_index)`` of the calls, and each round can add drift:
    ``factor(t)`` multiplies every call made at fake time ``t`` (a machine that slows down and speeds up)."""

    def __init__(self, costs: dict[str, float], factor=lambda t: 1.0, spikes=None):
        self.t = 0.0
        self.costs, self.factor = costs, factor
        self.spikes = spikes or (lambda name, i: 1.0)
        self.calls: list[str] = []
        self.fns: dict = {}

    def now(self) -> float:
        return self.t

    def call(self, fn):
        name = self.fns[fn]
        fn()
        ms = self.costs[name] * self.factor(self.t) * self.spikes(name, len(self.calls))
        self.calls.append(name)
        self.t += ms / 1e3
        return ms

    def read(self, handles):
        return list(handles)

    def bind(self, names):
        calls = {}
        for name in names:
            calls[name] = lambda: None
            self.fns[calls[name]] = name
        return calls


def _budget(**kw) -> TimingBudget:
    return TimingBudget(**{"warmup_s": 0.0, "min_rounds": 5, "max_rounds": 200, "case_max_s": 100.0, **kw})


# ------------------------------------------------------------------------------------------------- statistics


def test_estimate_median_percentiles_and_a_deterministic_bootstrap_interval():
    x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    e = estimate(x)
    assert (e.median, e.rounds) == (5.5, 10)
    assert e.p20 == pytest.approx(2.8) and e.p80 == pytest.approx(8.2)
    assert e.ci_low <= e.median <= e.ci_high and e.ci_low >= 1 and e.ci_high <= 10
    assert estimate(x) == e  # seeded resampling
    assert estimate([3.0] * 8).half_width == 0.0


def test_few_rounds_have_no_usable_interval():
    assert estimate([1.0, 2.0]).half_width == float("inf")
    assert estimate([1.0, 2.0]).noisy(0.05)
    with pytest.raises(ValueError):
        estimate([])


def test_ratio_is_per_round_so_common_drift_cancels():
    # The machine slows down 10x halfway: per-round ratios stay 2.0; a ratio of medians would not see it either,
    # but the per-call spread (p20-p80 of the times) is 10x while the ratio's interval is zero.
    drift = np.array([1.0] * 10 + [10.0] * 11)
    ref, fast = 2.0 * drift, 1.0 * drift
    r = ratio_estimate(ref, fast)
    assert r.median == 2.0 and r.ci_low == r.ci_high == 2.0 and not r.noisy(0.05)
    assert estimate(fast).p80 / estimate(fast).p20 == pytest.approx(10.0)
    with pytest.raises(ValueError, match="rounds"):
        ratio_estimate([1.0, 2.0], [1.0])


# --------------------------------------------------------------------------------------------------- schedule


def test_rounds_interleave_every_provider_in_a_rotating_order():
    clock = FakeClock({"reference": 2.0, "a": 1.0, "b": 0.5})
    calls = clock.bind(["reference", "a", "b"])
    out = interleave(calls, [("a", "reference"), ("b", "reference")], _budget(min_warmup=1), clock)
    assert out.stopped == "converged" and out.rounds == 5
    warmup, timed = clock.calls[:3], clock.calls[3:]
    assert warmup == ["reference", "a", "b"]
    rounds = [timed[i : i + 3] for i in range(0, len(timed), 3)]
    assert all(sorted(r) == ["a", "b", "reference"] for r in rounds)  # each round calls every provider once
    assert [r[0] for r in rounds[:3]] == ["reference", "a", "b"]  # and no provider always goes first
    assert out.ratios[("a", "reference")].median == 2.0 and out.ratios[("b", "reference")].median == 4.0
    assert all(len(s) == 5 for s in out.samples.values())


def test_drift_lands_on_every_provider_and_the_ratio_converges():
    # A shared machine: speed changes every few milliseconds of (fake) time, by up to 8x.
    rng = np.random.default_rng(1)
    levels = rng.uniform(1.0, 8.0, size=10_000)
    clock = FakeClock({"reference": 3.0, "fast": 1.0}, factor=lambda t: levels[int(t * 1e3 / 10) % levels.size])
    calls = clock.bind(["reference", "fast"])
    out = interleave(calls, [("fast", "reference")], _budget(), clock)
    ratio = out.ratios[("fast", "reference")]
    assert out.stopped == "converged" and not ratio.noisy(0.05)
    assert ratio.median == pytest.approx(3.0, rel=0.05)
    spread = estimate(out.samples["fast"])
    assert spread.p80 / spread.p20 > 1.5  # the times themselves are all over the place


def test_a_noisy_ratio_stops_at_the_time_cap_and_is_flagged():
    rng = np.random.default_rng(2)
    noise = rng.lognormal(0.0, 0.8, size=100_000)  # independent per call: no round can cancel it
    clock = FakeClock({"reference": 1.0, "x": 1.0}, spikes=lambda name, i: noise[i % noise.size])
    calls = clock.bind(["reference", "x"])
    out = interleave(calls, [("x", "reference")], _budget(case_max_s=0.05), clock)
    assert out.stopped == "time cap"
    assert out.noisy(0.05) == [("x", "reference")]
    assert 0.05 <= clock.t < 0.05 + 0.05  # stopped within one round of the cap


def test_round_cap_and_a_provider_alone():
    clock = FakeClock({"only": 1.0})
    calls = clock.bind(["only"])
    out = interleave(calls, [], _budget(min_rounds=3), clock)
    assert out.stopped == "converged" and out.rounds == 3 and out.ratios == {}
    clock = FakeClock({"reference": 1.0, "x": 1.0}, spikes=lambda name, i: 1.0 + (i % 7))
    out = interleave(clock.bind(["reference", "x"]), [("x", "reference")], _budget(max_rounds=12), clock)
    assert out.stopped == "round cap" and out.rounds == 12


def test_a_failing_provider_leaves_the_rotation_and_the_others_stay_paired():
    clock = FakeClock({"reference": 2.0, "a": 1.0, "bad": 1.0})
    calls = clock.bind(["reference", "a", "bad"])
    count = {"n": 0}

    def bad():
        count["n"] += 1
        if count["n"] > 3:
            raise RuntimeError("kernel crashed")

    clock.fns[bad] = "bad"
    calls["bad"] = bad
    out = interleave(calls, [("a", "reference"), ("bad", "reference")], _budget(), clock)
    assert isinstance(out.failures["bad"], RuntimeError) and "bad" not in out.samples
    assert len(out.samples["a"]) == len(out.samples["reference"]) == out.rounds
    assert list(out.ratios) == [("a", "reference")]


def test_before_call_resets_untimed_and_skip_warmup():
    clock = FakeClock({"reference": 1.0, "slow": 1.0})
    calls = clock.bind(["reference", "slow"])
    resets = []
    out = interleave(
        calls,
        [("slow", "reference")],
        _budget(min_warmup=2),
        clock,
        before_call={"slow": lambda: resets.append(1)},
        skip_warmup=["slow"],
    )
    assert clock.calls[:2] == ["reference", "reference"]  # the slow kernel got no warm-up calls
    assert len(resets) == out.rounds


# ------------------------------------------------------------------------------------------------ runner, rows


class _Toy(OpBench):
    op, unit, sdpa_baseline = "toy", "bytes", "torch-sdpa"

    def cases(self, device, dtypes, quick):
        return [Case("toy", "fwd", (("N", 8),), torch.float32, "cpu")]

    def inputs(self, case):
        return {"x": torch.arange(8, dtype=torch.float32)}

    def providers(self, device):
        return []

    def oracle(self, case, inputs):
        return [inputs["x"].double() * 2]

    def work(self, case):
        return 32.0


def _prov(name):
    return Provider(name, "backend", lambda case, inputs: functional(case, inputs, lambda x: (x["x"] * 2,), ("x",)))


def test_ratio_pairs_track_the_reference_and_sdpa():
    pairs = ratio_pairs(_Toy(), ["reference", "cpu", "torch-sdpa"])
    assert pairs == {
        ("cpu", "reference"): "speedup_vs_reference",
        ("torch-sdpa", "reference"): "speedup_vs_reference",
        ("reference", "torch-sdpa"): "speedup_vs_torch_sdpa",
        ("cpu", "torch-sdpa"): "speedup_vs_torch_sdpa",
    }


def test_time_interleaved_fills_timings_ratios_and_rows():
    bench, case = _Toy(), _Toy().cases("cpu", [], True)[0]
    inputs = bench.inputs(case)
    timed = []
    clock = FakeClock({"reference": 4.0, "cpu": 1.0, "torch-sdpa": 2.0})
    for name in ("reference", "cpu", "torch-sdpa"):
        prepared = _prov(name).setup(case, inputs)
        clock.fns[prepared.run] = name
        timed.append((Measurement(case, name, "backend", "ok"), prepared, False))
    time_interleaved(bench, case, timed, _budget(), clock)
    ms = {m.provider: m for m, _, _ in timed}
    assert ms["cpu"].timing.median_ms == 1.0 and ms["cpu"].rounds == 5 and ms["cpu"].noisy == []
    assert ms["cpu"].ratios["speedup_vs_reference"].median == 4.0
    assert ms["cpu"].ratios["speedup_vs_torch_sdpa"].median == 2.0
    rows = {(r["backend"], r["metric"]): r for r in case_rows(bench, [m for m, _, _ in timed])}
    row = rows[("cpu", "speedup_vs_reference")]
    assert (row["value"], row["ci_low"], row["ci_high"], row["rounds"], row["noisy"]) == (4.0, 4.0, 4.0, 5, False)
    assert rows[("reference", "speedup_vs_reference")]["value"] == 1.0
    assert rows[("torch-sdpa", "speedup_vs_torch_sdpa")]["value"] == 1.0
    time_row = rows[("cpu", "time_ms")]
    assert time_row["ci_low"] == time_row["ci_high"] == 1.0 and time_row["rounds"] == 5
    assert set(COLUMNS) == set(time_row) and time_row["threads"] == torch.get_num_threads()
    assert {"node", "cpu", "cores"} <= set(time_row["machine"])


def test_run_case_times_the_providers_of_a_case_together():
    bench = _Toy()
    case = bench.cases("cpu", [], True)[0]
    plan = OpPlan(bench, [case], [_prov("reference"), _prov("cpu")])
    ms = run_case(plan, case, TimingBudget.quick())
    assert [m.status for m in ms] == ["ok", "ok"]
    assert ms[0].rounds == ms[1].rounds and len(ms[0].samples_ms) == len(ms[1].samples_ms) == ms[0].rounds
    assert "speedup_vs_reference" in ms[1].ratios and ms[1].max_err == 0.0


def test_noisy_ratio_is_flagged_in_the_table_not_printed_as_a_number():
    from rich.console import Console

    from metagpt_fast.bench.report import op_table
    from metagpt_fast.bench.runner import OpResult
    from metagpt_fast.bench.timing import Timing

    bench, case = _Toy(), _Toy().cases("cpu", [], True)[0]
    clean, noisy = estimate([2.0, 2.0, 2.02, 1.98, 2.0]), estimate([0.5, 1.0, 3.0, 4.0, 8.0])
    ref = Measurement(case, "reference", "backend", "ok", timing=Timing(2.0, 1.9, 2.1, 5))
    a = Measurement(case, "a", "backend", "ok", timing=Timing(1.0, 0.9, 1.1, 5))
    a.ratios = {"speedup_vs_reference": clean}
    b = Measurement(case, "b", "backend", "ok", timing=Timing(1.0, 0.9, 1.1, 5))
    b.ratios, b.noisy = {"speedup_vs_reference": noisy}, ["speedup_vs_reference"]
    console = Console(width=220, record=True)
    console.print(op_table(OpResult(OpPlan(bench, [case], []), [ref, a, b])))
    text = console.export_text()
    assert "2.00x ±" in text
    assert f"noisy {noisy.ci_low:.2f}–{noisy.ci_high:.2f}x" in text and f"{noisy.median:.2f}x ±" not in text
    row = next(r for r in case_rows(bench, [ref, b]) if r["metric"] == "speedup_vs_reference" and r["backend"] == "b")
    assert row["noisy"] is True and "noisy" in row["note"]


# ---------------------------------------------------------------------------------------------------- threads


@pytest.mark.parametrize(
    ("requested", "device", "load", "current", "threads", "noted"),
    [
        (None, "cpu", 2.5, 2, 1, True),  # loaded: 1 thread, and it says so
        (None, "cpu", 2.0, 2, 1, True),  # load == cores counts as loaded
        (None, "cpu", 1.2, 2, 2, False),
        (3, "cpu", 9.0, 2, 3, False),  # --threads wins
        (None, "cuda", 9.0, 2, 2, False),
        (None, "cpu", None, 2, 2, False),  # no load average on this OS
        (None, "cpu", 9.0, 1, 1, False),
    ],
)
def test_thread_default_under_load(requested, device, load, current, threads, noted):
    got, note = choose_threads(requested, device, load, 2, current)
    assert got == threads and (note is not None) == noted
    if noted:
        assert "1 thread" in note and "load average" in note


# ---------------------------------------------------------------------------------------------------- compare


def _time_row(backend, value, lo=None, hi=None, p20=None, p80=None, n=64, **kw):
    row = make_row(
        op="attention",
        backend=backend,
        mode="fwd",
        shape={"N": n, "causal": True},
        dtype=torch.float32,
        metric="time_ms",
        value=value,
        p20=p20,
        p80=p80,
        device="CPU x (1 thread)",
        ci_low=lo,
        ci_high=hi,
    )
    row.update(kw)
    return row


def test_compare_reports_change_and_significance():
    old = [_time_row("cpu", 9.0, 8.9, 9.1), _time_row("cpu", 1.0, 0.99, 1.01), _time_row("reference", 2.0, 1.5, 2.5)]
    new = [_time_row("cpu", 1.2, 1.19, 1.21), _time_row("reference", 2.2, 1.6, 2.7), _time_row("triton", 1.0, 1, 1)]
    changes = compare_rows(old, new)
    assert [c.key[1] for c in changes] == ["cpu", "reference"]  # latest old row per case; new-only cases skipped
    cpu, ref = changes
    assert cpu.change == pytest.approx(0.2) and cpu.significant
    assert cpu.low == pytest.approx(1.19 / 1.01 - 1) and cpu.high == pytest.approx(1.21 / 0.99 - 1)
    assert ref.change == pytest.approx(0.1) and not ref.significant  # intervals overlap
    assert regressions(changes, 10) == [cpu] and regressions(changes, 25) == []


def test_compare_falls_back_to_p20_p80_and_ignores_baselines_for_the_gate():
    old = [_time_row("torch-sdpa", 1.0, p20=0.9, p80=1.1), _time_row("cpu", 1.0, p20=0.9, p80=1.1)]
    new = [_time_row("torch-sdpa", 2.0, p20=1.9, p80=2.1), _time_row("cpu", 1.1, p20=1.0, p80=1.2)]
    sdpa, cpu = compare_rows(old, new)
    assert sdpa.significant and not cpu.significant  # 1.0/1.1 - 1 < 0 < 1.2/0.9 - 1
    assert regressions([sdpa, cpu], 5) == []  # torch's kernels are not this project's regressions


def test_bench_compare_option_errors(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--out", str(tmp_path), "--fail-on-regression", "5"]) == 2
    assert "--compare" in capsys.readouterr().err
    assert cli.main(["bench", "--quick", "--out", str(tmp_path), "--compare", str(tmp_path / "none.jsonl")]) == 2
    assert "no results file" in capsys.readouterr().err


@pytest.mark.slow  # two short bench runs
def test_bench_compare_end_to_end(tmp_path, capsys):
    argv = ["bench", "--quick", "--ops", "rotary", "--backends", "reference,cpu", "--no-plot", "--threads", "1"]
    assert cli.main([*argv, "--out", str(tmp_path / "old")]) == 0
    old = tmp_path / "old" / RESULTS_FILE
    rows = read_results(old)
    speedup = next(r for r in rows if r["metric"] == "speedup_vs_reference" and r["backend"] == "cpu")
    assert speedup["ci_low"] <= speedup["value"] <= speedup["ci_high"] and speedup["rounds"] >= 5
    assert speedup["threads"] == 1
    capsys.readouterr()
    assert cli.main([*argv, "--out", str(tmp_path / "new"), "--compare", str(old)]) == 0
    printed = capsys.readouterr().out
    assert "change against" in printed and "significant" in printed
    # Make the old run look 100x faster: every case of the package's backends is then a significant regression.
    fast = [
        {**r, **{k: r[k] / 100 for k in ("value", "p20", "p80", "ci_low", "ci_high") if r[k] is not None}}
        if r["metric"] == "time_ms"
        else r
        for r in rows
    ]
    faster = tmp_path / "faster.jsonl"
    faster.write_text("".join(json.dumps(r) + "\n" for r in fast))
    assert (
        cli.main([*argv, "--out", str(tmp_path / "new2"), "--compare", str(faster), "--fail-on-regression", "50"]) == 1
    )
    assert "regression:" in capsys.readouterr().out


def test_bench_thread_count_does_not_outlive_the_run(tmp_path):
    before = torch.get_num_threads()
    argv = ["bench", "--quick", "--ops", "rotary", "--backends", "reference", "--no-plot", "--threads", "1"]
    assert cli.main([*argv, "--out", str(tmp_path)]) == 0
    assert torch.get_num_threads() == before
    assert {r["threads"] for r in read_results(tmp_path / RESULTS_FILE)} == {1}
