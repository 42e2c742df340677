"""Tables printed by ``metagpt-fast bench``: one per op, one section per case, one row per provider."""

from __future__ import annotations

from typing import TYPE_CHECKING

from metagpt_fast._extras import import_optional
from metagpt_fast.bench.core import Measurement, oracle_dtype
from metagpt_fast.bench.results import device_name, dtype_name
from metagpt_fast.bench.runner import OpResult, speedups
from metagpt_fast.bench.suite import UNITS, throughput

if TYPE_CHECKING:
    from rich.table import Table

_STATUS_STYLE = {"parity only": "yellow", "unsupported": "dim", "skipped": "dim", "failed": "bold red"}


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _fmt_throughput(x: float, unit: str) -> str:
    return f"{x:,.0f}" if unit == "tokens" else f"{x:,.3g}" if x < 100 else f"{x:,.0f}"


def _rich(module: str):
    """``rich.<module>``, imported on first use: rich comes with the ``bench`` extra."""
    return import_optional(f"rich.{module}", "the bench tables")


def _short(text: str, width: int = 70) -> str:
    """One line of at most ``width`` characters, escaped for rich markup (notes quote shapes like [1, 2])."""
    text = " ".join(text.split())
    return _rich("markup").escape(text if len(text) <= width else text[: width - 1] + "…")


def op_table(result: OpResult) -> Table:
    bench, plan = result.plan.bench, result.plan
    cases = plan.cases
    dtypes = sorted({dtype_name(c.dtype) for c in cases})
    oracles = sorted({dtype_name(oracle_dtype(c.dtype)) for c in cases})
    device = device_name(cases[0].device) if cases else "?"
    never = never_supported(result)
    table = _rich("table").Table(
        title=f"{bench.op} — {device}, {', '.join(dtypes)}",
        caption=_caption(result, oracles, never),
        caption_justify="left",
    )
    table.add_column("case")
    table.add_column("backend")
    table.add_column("time ms: median [p20–p80]")
    table.add_column(UNITS[bench.unit][2], justify="right")
    table.add_column("vs ref", justify="right")
    if bench.sdpa_baseline:
        table.add_column("vs SDPA", justify="right")
    if bench.op == "train_step":
        table.add_column("TFLOP/s", justify="right")
        table.add_column("MFU", justify="right")
    table.add_column("max err", justify="right")
    table.add_column("peak MiB", justify="right")

    by_case: dict = {}
    for m in result.measurements:
        by_case.setdefault(m.case, []).append(m)
    for case, measurements in sorted(by_case.items(), key=lambda item: _table_order(item[0])):
        ratios = speedups(bench, measurements)
        label = f"{case.mode} {case.label}" + (f" {dtype_name(case.dtype)}" if len(dtypes) > 1 else "")
        shown = [m for m in measurements if m.provider not in never]
        for i, m in enumerate(shown):
            table.add_row(label if i == 0 else "", *_cells(result, m, ratios.get(m.provider, {})))
        table.add_section()
    return table


def _table_order(case) -> tuple:
    """Mode (fwd, bwd, fwd+bwd, train), then dtype and the other flags, then sequence length."""
    modes = ("fwd", "bwd", "fwd+bwd", "train")
    _, mode, dtype, rest = case.group_key()
    return (modes.index(mode) if mode in modes else len(modes), dtype, rest, case.seq_len or 0)


def never_supported(result: OpResult) -> dict[str, str]:
    """Providers that could not run a single case (e.g. the cpu backend on CUDA tensors): one caption line each
    instead of a row per case. Maps the provider to its first reason."""
    by_provider: dict[str, list[Measurement]] = {}
    for m in result.measurements:
        by_provider.setdefault(m.provider, []).append(m)
    return {
        name: ms[0].note
        for name, ms in by_provider.items()
        if len(result.plan.cases) > 1 and all(m.status == "unsupported" for m in ms)
    }


def _cells(result: OpResult, m: Measurement, ratios: dict) -> list[str]:
    bench = result.plan.bench
    if m.timing is None:
        style = _STATUS_STYLE.get(m.status, "")
        text = m.status if m.status == "parity only" else f"{m.status}: {_short(m.note)}"
        time_cell = f"[{style}]{text}[/]" if style else text
        cells = [m.provider, time_cell, "", ""]
    else:
        t = m.timing
        cells = [
            m.provider,
            f"{t.median_ms:.4g} [{t.p20_ms:.3g}–{t.p80_ms:.3g}]",
            _fmt_throughput(throughput(bench, m.case, t.median_ms), bench.unit),
            _ratio_cell(m, ratios, "speedup_vs_reference"),
        ]
    if bench.sdpa_baseline:
        cells.append(_ratio_cell(m, ratios, "speedup_vs_torch_sdpa") if m.timing else "")
    if bench.op == "train_step":
        cells.append(_fmt(m.extra.get("tflops"), ".3g") if m.timing else "")
        mfu = m.extra.get("mfu")
        cells.append(f"{100 * mfu:.1f}%" if mfu is not None else ("—" if m.timing else ""))
    err = _fmt(m.max_err, ".1e")
    cells.append(f"[bold red]{err} ![/]" if m.parity_violation else err)
    cells.append(_fmt(m.peak_bytes / 2**20, ".1f") if m.peak_bytes is not None else ("—" if m.timing else ""))
    return cells


def _ratio_cell(m: Measurement, ratios: dict, key: str) -> str:
    """``1.23x ±3%`` (the 95% interval of the per-round ratios); a noisy ratio shows its interval instead, in
    yellow, never as a clean number; ``—`` without a baseline."""
    if key not in ratios:
        return "—"
    est = m.ratios.get(key)
    if est is None:
        return f"{ratios[key]:.2f}x"
    if key in m.noisy:
        return f"[yellow]noisy {est.ci_low:.2f}–{est.ci_high:.2f}x[/]"
    return f"{est.median:.2f}x ±{100 * est.half_width:.0f}%"


def _caption(result: OpResult, oracles: list[str], never: dict[str, str]) -> str:
    lines = [
        (
            f"max err: max |output − reference in {'/'.join(oracles)}| over the outputs and every input gradient, "
            "same inputs (! = outside the test suite's parity rule); "
            "vs ref / vs SDPA: median of the per-round speedups (providers timed interleaved, round by round) ± "
            "its 95% interval; noisy a–b: the interval stayed wider than ±5% until the time cap."
        )
    ]
    if result.plan.bench.op == "train_step":
        lines.append("MFU: PaLM model FLOPs (6N + 12·L·T·d per token) over the GPU's dense peak; none on CPUs.")
    for name, reason in result.plan.unavailable.items():
        lines.append(f"{name}: unavailable — {_short(reason, 110)}")
    for name, reason in never.items():
        lines.append(f"{name}: unsupported in every case — {_short(reason, 110)}")
    if result.cases_not_run:
        lines.append(f"{result.cases_not_run} case(s) not run: --max-seconds reached")
    return "\n".join(lines)
