"""The benchmark harness: formulas, timing statistics, peak memory, the results file, parity flags, the runner's
statuses, and ``metagpt-fast bench --quick`` end to end on the CPU."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from metagpt_fast import cli
from metagpt_fast.bench import formulas
from metagpt_fast.bench.core import Case, Measurement, Provider, Unsupported, compare, functional
from metagpt_fast.bench.memory import peak_memory, running_peak
from metagpt_fast.bench.plots import PLOT_FILE, panels
from metagpt_fast.bench.results import COLUMNS, RESULTS_FILE, ResultsFile, make_row, read_results
from metagpt_fast.bench.runner import (
    BENCHES,
    OpPlan,
    OpResult,
    apply_parity_rule,
    case_rows,
    make_plan,
    measure,
    run_plans,
)
from metagpt_fast.bench.suite import OpBench
from metagpt_fast.bench.timing import Timing, TimingBudget, time_cpu

# ------------------------------------------------------------------------------------------------------ formulas


def test_attention_flops_forward_is_four_b_h_nq_nk_d():
    assert formulas.attention_flops(2, 3, 5, 7, 11) == 4 * 2 * 3 * 5 * 7 * 11


def test_attention_flops_causal_halves_and_backward_is_two_and_a_half_forward():
    fwd = formulas.attention_flops(1, 4, 128, 128, 64)
    assert formulas.attention_flops(1, 4, 128, 128, 64, causal=True) == fwd / 2
    assert formulas.attention_flops(1, 4, 128, 128, 64, mode="bwd") == 2.5 * fwd
    assert formulas.attention_flops(1, 4, 128, 128, 64, causal=True, mode="fwd+bwd") == 3.5 * fwd / 2


def test_attention_flops_counts_value_head_dim_separately():
    # Q @ K^T costs 2*Nq*Nk*D, P @ V costs 2*Nq*Nk*Dv.
    assert formulas.attention_flops(1, 1, 10, 20, 8, 16) == 2 * 10 * 20 * 8 + 2 * 10 * 20 * 16


def test_memory_bound_formulas():
    # add_pe: read x, write out (B*T*d elements each), float16 = 2 bytes.
    assert formulas.add_positional_encoding_bytes(2, 3, 4, 2) == 2 * (2 * 3 * 4) * 2
    assert formulas.add_positional_encoding_bytes(2, 3, 4, 2, mode="fwd+bwd") == 4 * (2 * 3 * 4) * 2
    # embed: ids (8 bytes) + rows read + output written; backward: ids + grad read + dense (V, d) grad written.
    fwd = 6 * 8 + 2 * 6 * 4 * 4
    bwd = 6 * 8 + 6 * 4 * 4 + 10 * 4 * 4
    assert formulas.embed_positions_bytes(2, 3, 4, 10, 4) == fwd
    assert formulas.embed_positions_bytes(2, 3, 4, 10, 4, mode="bwd") == bwd
    assert formulas.embed_positions_bytes(2, 3, 4, 10, 4, mode="fwd+bwd") == fwd + bwd
    # rotary: q (Hq heads) and k (Hk heads) read, two tensors written.
    assert formulas.rotary_bytes(2, 8, 2, 16, 64, 2) == 2 * 2 * (8 + 2) * 16 * 64 * 2


def test_train_step_flops_follow_palm():
    assert formulas.train_step_flops(1000, 2, 64, 32, tokens=10) == (6 * 1000 + 12 * 2 * 64 * 32) * 10


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode"):
        formulas.attention_flops(1, 1, 1, 1, 1, mode="backward")
    with pytest.raises(ValueError, match="mode"):
        formulas.rotary_bytes(1, 1, 1, 1, 2, 4, mode="train")


@pytest.mark.parametrize(
    ("name", "dtype", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.5),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.5),
        ("NVIDIA H200", torch.float16, 989.5),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312.0),
        ("NVIDIA A100-SXM4-80GB", torch.float32, 19.5),
        ("NVIDIA A10", torch.float16, 125.0),  # not A100's
        ("NVIDIA L40S", torch.bfloat16, 362.05),  # not L4's
        ("NVIDIA L4", torch.bfloat16, 121.0),
    ],
)
def test_peak_table_matches_the_most_specific_model(name, dtype, tflops):
    peak, source = formulas.peak_tflops(name, dtype)
    assert peak == tflops
    assert "datasheet" in source or "whitepaper" in source


def test_no_peak_means_no_mfu():
    assert formulas.peak_tflops("Tesla V100-SXM2-16GB", torch.bfloat16) is None  # Volta has no bf16
    assert formulas.mfu(1e12, "CPU Intel(R) Xeon(R)", torch.float32) is None
    assert formulas.mfu(312e12 / 2, "NVIDIA A100-PCIE-40GB", torch.bfloat16) == pytest.approx(0.5)


# -------------------------------------------------------------------------------------------- timing and memory


def test_timing_percentiles():
    t = Timing.from_samples([float(x) for x in range(1, 11)])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.repeats) == (5.5, pytest.approx(2.8), pytest.approx(8.2), 10)
    with pytest.raises(ValueError):
        Timing.from_samples([])


def test_time_cpu_warms_up_repeats_and_resets_grads():
    calls = []
    leaf = torch.zeros(1, requires_grad=True)

    def fn():
        assert leaf.grad is None  # reset before every call
        calls.append(1)
        (leaf * 2).sum().backward()

    t = time_cpu(fn, TimingBudget(warmup_s=0.0, measure_s=0.0, min_repeats=4, max_repeats=4), grad_to_none=[leaf])
    assert t.repeats == 4 and len(calls) == 5  # one warm-up call, four timed
    assert 0 < t.p20_ms <= t.median_ms <= t.p80_ms


def test_time_cpu_skips_the_warm_up_when_told():
    calls = []
    budget = TimingBudget(warmup_s=0.0, measure_s=0.0, min_repeats=2, max_repeats=2, min_warmup=0)
    assert time_cpu(lambda: calls.append(1), budget).repeats == 2 and len(calls) == 2


def test_time_cpu_caps_slow_callables():
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.05)

    t = time_cpu(slow, TimingBudget(warmup_s=0.0, measure_s=0.0, min_repeats=50, max_s=0.12))
    assert 1 <= t.repeats <= 4 and len(calls) == t.repeats + 1  # min_repeats gave way to the hard cap


def test_running_peak():
    assert running_peak([4, 4, -4, 2, -6]) == 8
    assert running_peak([-3, 1]) == 0


def test_cpu_peak_memory_sees_a_temporary():
    def fn():
        big = torch.ones(1 << 20)  # 4 MiB, freed before returning
        return float(big.sum())

    peak = peak_memory(fn, "cpu")
    if peak is None:
        pytest.skip("this torch does not expose the profiler's allocation events")
    assert 4 * 2**20 <= peak < 64 * 2**20


# ------------------------------------------------------------------------------------------------- results file


def _row(**overrides):
    fields = {
        "op": "attention",
        "backend": "reference",
        "mode": "fwd",
        "shape": {"B": 1, "N": 8},
        "dtype": torch.float32,
        "metric": "time_ms",
        "value": 1.5,
        "p20": 1.0,
        "p80": 2.0,
        "device": "cpu",
    }
    fields.update(overrides)
    return make_row(**fields)


def test_results_rows_have_every_column_and_append(tmp_path):
    path = tmp_path / "out" / RESULTS_FILE
    results = ResultsFile(path)
    results.append([_row()])
    results.append([_row(metric="max_abs_err", value=float("nan"), p20=None, p80=None)])
    rows = read_results(path)
    assert [list(r) for r in rows] == [list(COLUMNS)] * 2
    first = rows[0]
    assert first["dtype"] == "float32" and first["shape"] == {"B": 1, "N": 8}
    assert set(first["versions"]) >= {"python", "torch", "triton", "metagpt_fast"}
    assert first["git_revision"] and first["timestamp"].endswith("+00:00")
    assert rows[1]["value"] is None  # NaN is not JSON: written as null
    assert len(path.read_text().splitlines()) == 2


def test_results_file_refuses_incomplete_rows(tmp_path):
    row = _row()
    del row["git_revision"]
    with pytest.raises(ValueError, match="git_revision"):
        ResultsFile(tmp_path / RESULTS_FILE).append([row])


# ----------------------------------------------------------------------------------------------- cases, parity


def _case(mode="fwd", **dims):
    dims = dims or {"B": 1, "N": 4, "causal": True}
    return Case("attention", mode, tuple(dims.items()), torch.float32, "cpu", interpret_ok=True)


def test_case_label_and_plot_group():
    case = _case("fwd", B=2, N=16, D=8, causal=True)
    assert case.label == "B=2 N=16 D=8 causal"
    assert _case("fwd", B=2, N=16, D=8, causal=False).label == "B=2 N=16 D=8"
    assert case.seq_len == 16
    # Sequence length and batch vary along a plot line; the rest identifies it.
    assert case.group_key() == _case("fwd", B=8, N=64, D=8, causal=True).group_key()
    assert case.group_key() != _case("fwd+bwd", B=2, N=16, D=8, causal=True).group_key()


@pytest.mark.parametrize("mode", ["fwd", "bwd", "fwd+bwd"])
def test_functional_modes_return_outputs_and_input_gradients(mode):
    x = torch.randn(3, 4)
    prepared = functional(_case(mode), {"x": x}, lambda inp: (inp["x"] * 3,), ("x",))
    parity = prepared.parity()
    torch.testing.assert_close(parity[0], 3 * x)
    if mode == "fwd":
        assert len(parity) == 1
        return
    (grad_out,) = [g for g in parity[1:]]
    assert grad_out.shape == x.shape
    prepared.run()  # the timed work runs backward and fills the leaf's gradient
    (leaf,) = prepared.grad_to_none
    torch.testing.assert_close(leaf.grad, grad_out)  # d(3x)/dx . g == 3g == the parity gradient
    if mode == "bwd":
        prepared.run()  # the retained graph can be replayed
        torch.testing.assert_close(leaf.grad, 2 * grad_out)


class _ToyBench(OpBench):
    """x * 2 as the 'op': providers are whatever a test gives."""

    op, unit = "toy", "bytes"

    def cases(self, device, dtypes, quick):
        return [_case("fwd+bwd", B=1, N=n) for n in (8, 16)]

    def inputs(self, case):
        return {"x": torch.arange(case.shape["N"], dtype=torch.float32)}

    def providers(self, device):
        return []

    def oracle(self, case, inputs):
        return functional(case, {"x": inputs["x"].double()}, lambda x: (x["x"] * 2,), ("x",)).parity()

    def work(self, case):
        return 4.0 * case.shape["N"]


def _provider(name, fn, **kw):
    return Provider(
        name, "backend", lambda case, inputs: functional(case, inputs, lambda x: (fn(x["x"]),), ("x",)), **kw
    )


def _raises(exc):
    def setup(case, inputs):
        raise exc

    return setup


@pytest.mark.parametrize(
    ("provider", "status"),
    [
        (_provider("good", lambda x: x * 2), "ok"),
        (Provider("no", "backend", _raises(Unsupported("head dim 7"))), "unsupported"),
        (Provider("reg", "backend", _raises(ValueError("backend 'cpu' cannot run 'attention': fp8"))), "unsupported"),
        (Provider("broken", "backend", _raises(RuntimeError("kernel crashed"))), "failed"),
        (_provider("wrong-shape", lambda x: x[:-1] * 2), "failed"),
        (_provider("interp", lambda x: x * 2, slow=True), "parity only"),
    ],
)
def test_measure_statuses(provider, status):
    bench, case = _ToyBench(), _ToyBench().cases("cpu", [torch.float32], True)[0]
    inputs = bench.inputs(case)
    m = measure(bench, case, provider, inputs, bench.oracle(case, inputs), TimingBudget.quick())
    assert m.status == status, m.note
    assert (m.timing is not None) == (status == "ok")
    if status in ("ok", "parity only"):
        assert m.max_err == 0.0
    if status == "parity only":
        assert "interpreted" in m.note


def test_interpreted_provider_is_skipped_above_the_interpreter_size():
    bench = _ToyBench()
    case = Case("toy", "fwd", (("N", 8),), torch.float32, "cpu", interpret_ok=False)
    m = measure(
        bench, case, _provider("interp", lambda x: x * 2, slow=True), bench.inputs(case), None, TimingBudget.quick()
    )
    assert m.status == "skipped" and m.timing is None


def test_parity_rule_in_half_precision_is_relative_to_the_reference():
    case = Case("attention", "fwd", (("N", 4),), torch.bfloat16, "cpu")
    ref = Measurement(case, "reference", "backend", "ok", errors=[1e-3, 4e-3])
    close = Measurement(case, "fast", "backend", "ok", errors=[2e-3, 8e-3])
    far = Measurement(case, "bad", "backend", "ok", errors=[2e-3, 9e-3])  # gradient 1 is > 2 x 4e-3 + 1e-2
    far.errors[1] = 2 * 4e-3 + 1e-2 + 1e-4
    apply_parity_rule([ref, close, far])
    assert not ref.parity_violation and not close.parity_violation and far.parity_violation
    assert far.parity_note.startswith("tensor 1:")


def test_parity_rule_in_float32_is_relative_to_the_reference():
    case = _case()
    # Two outputs (say an output and a gradient), unit-scale and large.
    oracle = [torch.tensor([1.0], dtype=torch.float64), torch.tensor([100.0], dtype=torch.float64)]

    def measured(name, delta_small, delta_large):
        m = Measurement(case, name, "backend", "ok")
        compare([oracle[0].float() + delta_small, oracle[1].float() + delta_large], oracle, torch.float32, m)
        return m

    ref = measured("reference", 0.0, 2e-3)  # a long float32 reduction: its own error is the bar
    relative = measured("relative", 0.0, 4e-3)  # within 2 x the reference's error
    floor = measured("floor", 4 * 2**-24, 0.0)  # a few roundoffs: inside the rule's floor
    small = measured("small", 5e-6, 0.0)  # 80 roundoffs of a unit output the reference gets exactly: flagged
    bad = measured("bad", 0.0, 7e-3)  # more than twice the reference's error on the large output
    apply_parity_rule([ref, relative, floor, small, bad])
    assert not (ref.parity_violation or relative.parity_violation or floor.parity_violation)
    assert small.parity_violation and small.parity_note.startswith("tensor 0:")
    assert bad.parity_violation and bad.parity_note.startswith("tensor 1:")
    alone = measured("alone", 5e-5, 0.0)
    apply_parity_rule([alone])
    assert alone.parity_violation and "no reference measurement" in alone.parity_note


def test_runner_rows_speedups_and_plot_panels(tmp_path):
    bench = _ToyBench()
    slow = _provider("reference", lambda x: x.clone() * 2)
    plan = OpPlan(bench, bench.cases("cpu", [torch.float32], True), [slow, _provider("fast", lambda x: x * 2)])
    results = ResultsFile(tmp_path / RESULTS_FILE)
    (result,) = run_plans([plan], TimingBudget.quick(), results)
    assert [m.status for m in result.measurements] == ["ok"] * 4
    rows = read_results(results.path)
    metrics = {(r["backend"], r["metric"]) for r in rows}
    for backend in ("reference", "fast"):
        for metric in ("time_ms", "gb_per_s", "max_abs_err", "peak_mem_mib", "speedup_vs_reference"):
            assert (backend, metric) in metrics
    ref_speedups = [r["value"] for r in rows if r["backend"] == "reference" and r["metric"] == "speedup_vs_reference"]
    assert ref_speedups == [1.0, 1.0]
    time_row = next(r for r in rows if r["metric"] == "time_ms")
    tput_row = next(r for r in rows if r["metric"] == "gb_per_s")
    # Throughput percentiles mirror the time percentiles: p20 of throughput is work / p80 of time.
    assert tput_row["p20"] == pytest.approx(4.0 * 8 / (time_row["p80"] * 1e-3) / 1e9)
    ((_, lines),) = panels([result]).items()
    assert sorted(lines) == ["fast", "reference"] and [n for n, _ in lines["fast"]] == [8, 16]


def test_runner_stops_at_the_time_budget():
    bench = _ToyBench()
    plan = OpPlan(bench, bench.cases("cpu", [torch.float32], True), [_provider("reference", lambda x: x * 2)])
    (result,) = run_plans([plan], TimingBudget.quick(), max_seconds=1e-9)
    assert result.cases_not_run == 2 and result.measurements == []


def test_case_rows_report_statuses(tmp_path):
    case = _case()
    rows = case_rows(_ToyBench(), [Measurement(case, "cuda", "backend", "unsupported", note="needs a GPU")])
    assert [(r["metric"], r["note"]) for r in rows] == [("status", "unsupported: needs a GPU")]


def test_plan_refuses_unknown_ops_and_backends():
    with pytest.raises(ValueError, match="unknown op"):
        make_plan(["attention", "softmax"], "cpu", [torch.float32], True)
    with pytest.raises(ValueError, match="unknown backend"):
        make_plan(["attention"], "cpu", [torch.float32], True, ["reference", "xformers"])


@pytest.mark.parametrize("op", list(BENCHES))
def test_every_op_suite_has_cases_and_the_reference(op):
    (plan,) = make_plan([op], "cpu", [torch.float32], True)
    assert plan.cases and all(c.op == op for c in plan.cases)
    assert "reference" in [p.name for p in plan.runnable]
    # Interpreted Triton gets at least one case small enough for its parity check.
    assert any(c.interpret_ok for c in plan.cases)
    # Formulas give positive work for every case.
    assert all(plan.bench.work(c) > 0 for c in plan.cases)


def test_attention_suite_includes_torch_sdpa_baselines():
    (plan,) = make_plan(["attention"], "cpu", [torch.float32], True)
    names = [p.name for p in plan.providers]
    assert {"torch-sdpa", "torch-sdpa-math", "torch-sdpa-flash", "flex", "flash-attn"} <= set(names)
    assert plan.unavailable["flash-attn"]  # CPU: with the reason


# ---------------------------------------------------------------------------------------------------------- CLI


@pytest.mark.slow  # the whole quick suite, every op and provider
def test_bench_quick_cli_end_to_end(tmp_path, capsys):
    """What CI runs: every op, every provider, the quick CPU suite."""
    rc = cli.main(["bench", "--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    for op in BENCHES:
        assert op in printed
    assert "vs SDPA" in printed and "max err" in printed
    rows = read_results(tmp_path / RESULTS_FILE)
    ops = {r["op"] for r in rows if r["metric"] == "time_ms"}
    assert ops == set(BENCHES)
    # Every timed row has a parity error from the same inputs, and no backend of the package is flagged.
    timed = {(r["op"], r["backend"], r["mode"], json.dumps(r["shape"])) for r in rows if r["metric"] == "time_ms"}
    checked = {(r["op"], r["backend"], r["mode"], json.dumps(r["shape"])) for r in rows if r["metric"] == "max_abs_err"}
    assert timed <= checked
    assert all(math.isfinite(r["value"]) for r in rows if r["metric"] in ("time_ms", "max_abs_err"))
    assert (tmp_path / PLOT_FILE).stat().st_size > 10_000


def test_bench_cli_options(tmp_path, capsys):
    rc = cli.main(
        [
            "bench",
            "--quick",
            "--ops",
            "rotary",
            "--backends",
            "reference",
            "--dtype",
            "bf16",
            "--out",
            str(tmp_path),
            "--no-plot",
        ]
    )
    assert rc == 0
    rows = read_results(tmp_path / RESULTS_FILE)
    assert {r["backend"] for r in rows if r["metric"] == "time_ms"} == {"reference"}
    assert {r["dtype"] for r in rows if r["metric"] == "time_ms"} == {"bfloat16"}
    assert not (tmp_path / PLOT_FILE).exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--dtype", "fp8"], "unknown dtype"),
        (["--ops", "softmax"], "unknown op"),
        (["--backends", "xformers"], "unknown backend"),
        (["--max-seconds", "0"], "max-seconds"),
    ],
)
def test_bench_cli_errors(tmp_path, capsys, argv, message):
    assert cli.main(["bench", "--quick", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_bench_cli_refuses_cuda_without_gpu(tmp_path, capsys):
    assert cli.main(["bench", "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_op_result_table_renders_every_status():
    from rich.console import Console

    from metagpt_fast.bench.report import op_table

    bench = _ToyBench()
    case = bench.cases("cpu", [torch.float32], True)[0]
    ok = Measurement(
        case, "reference", "backend", "ok", timing=Timing(2.0, 1.5, 2.5, 5), max_err=1e-7, peak_bytes=2**20
    )
    result = OpResult(
        OpPlan(bench, [case], [Provider("cuda", "backend", None, unavailable="needs a [GPU]")]),
        [
            ok,
            Measurement(case, "triton", "backend", "parity only", max_err=2e-7),
            Measurement(case, "cpu", "backend", "unsupported", note="shape [1, 2] is odd"),
            Measurement(case, "x", "baseline", "failed", note="RuntimeError: boom"),
        ],
    )
    console = Console(width=200, record=True)
    console.print(op_table(result))
    text = console.export_text()
    for expected in (
        "parity only",
        "unsupported: shape [1, 2] is odd",
        "failed: RuntimeError: boom",
        "cuda: unavailable — needs a [GPU]",
        "1.00x",
        "1.0e-07",
    ):
        assert expected in text


# ---------------------------------------------------------------------------------------------------- GPU suite


def test_gpu_suite_script_parses_and_needs_an_outdir(tmp_path):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True).returncode == 0
    usage = subprocess.run(["bash", str(script)], check=False, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_table_collapses_a_provider_unsupported_everywhere():
    from rich.console import Console

    from metagpt_fast.bench.report import op_table

    bench = _ToyBench()
    cases = bench.cases("cpu", [torch.float32], True)
    ms = []
    for case in cases:
        ms.append(Measurement(case, "reference", "backend", "ok", timing=Timing(2.0, 1.5, 2.5, 5)))
        ms.append(Measurement(case, "cpu", "backend", "unsupported", note="tensors must be on CPU"))
    console = Console(width=200, record=True)
    console.print(op_table(OpResult(OpPlan(bench, cases, []), ms)))
    text = console.export_text()
    assert "cpu: unsupported in every case — tensors must be on CPU" in text
    assert "unsupported: tensors" not in text  # no row per case


# ------------------------------------------------------------------------------- interpreted Triton on a CPU


def test_bench_restarts_itself_with_the_triton_interpreter(monkeypatch):
    """triton reads TRITON_INTERPRET at import (torch imports it), so the program re-executes itself once; a call
    inside another process (like this test) never does."""
    import os
    import sys

    from metagpt_fast.commands import bench

    calls = []
    monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append((argv, env)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(sys, "argv", ["/usr/bin/pytest", "-q"])
    bench.interpret_triton_without_gpu()
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["/venv/bin/metagpt-fast", "bench", "--quick"])
    bench.interpret_triton_without_gpu()
    ((argv, env),) = calls
    assert argv[1:] == ["-m", "metagpt_fast.cli", "bench", "--quick"] and env["TRITON_INTERPRET"] == "1"
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # already restarted: never again
    bench.interpret_triton_without_gpu()
    assert len(calls) == 1


def test_parity_rule_grants_an_ops_documented_slack():
    from metagpt_fast.bench.positional import AddPositionalEncodingBench
    from metagpt_fast.testing import float32_angle_error

    case = _case()
    oracle = [torch.tensor([0.5], dtype=torch.float64)]
    slack = float32_angle_error(255)  # positions 0..255 with float32 angles: 3.0e-5
    assert slack == 2 * 255 * 2**-24

    def measured(name, delta, slack):
        m = Measurement(case, name, "backend", "ok")
        compare([oracle[0].float() + delta], oracle, torch.float32, m, slack)
        return m

    ref = measured("reference", 0.0, slack)
    inside = measured("inside", 2.5e-5, slack)  # outside the plain 1e-5 tolerance, inside the angle slack
    unslacked = measured("unslacked", 2.5e-5, 0.0)
    outside = measured("outside", slack + 2e-5, slack)
    apply_parity_rule([ref, inside, unslacked, outside])
    assert not inside.parity_violation
    assert unslacked.parity_violation and outside.parity_violation

    bench = AddPositionalEncodingBench()
    pe_case = bench.cases("cpu", [torch.float32], quick=True)[0]
    assert bench.parity_slack(pe_case, bench.inputs(pe_case)) == float32_angle_error(pe_case.shape["T"] - 1)
