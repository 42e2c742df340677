"""Throughput against sequence length, one line per backend: one PNG, one panel per (op, mode, shape family)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from metagpt_fast._extras import import_optional
from metagpt_fast.bench.runner import OpResult
from metagpt_fast.bench.suite import UNITS, throughput

PLOT_FILE = "throughput.png"


def panels(results: Sequence[OpResult]) -> dict[tuple, dict[str, list[tuple[int, float]]]]:
    """``{panel key: {provider: [(sequence length, throughput), ...]}}`` for panels with at least two lengths."""
    out: dict[tuple, dict[str, list[tuple[int, float]]]] = {}
    for result in results:
        bench = result.plan.bench
        for m in result.measurements:
            if m.timing is None or m.case.seq_len is None:
                continue
            key = m.case.group_key()
            point = (m.case.seq_len, throughput(bench, m.case, m.timing.median_ms))
            out.setdefault(key, {}).setdefault(m.provider, []).append(point)
    return {
        key: {provider: sorted(points) for provider, points in lines.items()}
        for key, lines in out.items()
        if len({n for points in lines.values() for n, _ in points}) >= 2
    }


def _title(key: tuple) -> str:
    op, mode, dtype, rest = key
    flags = " ".join(k if v is True else f"{k}={v}" for k, v in rest if v is not False)
    return f"{op} {mode} {flags} {dtype.removeprefix('torch.')}".replace("  ", " ")


def write_plot(results: Sequence[OpResult], folder: str | Path) -> Path | None:
    """Writes ``folder/throughput.png``; returns its path, or None when no case has two sequence lengths.
    Needs matplotlib (the ``bench`` extra)."""
    data = panels(results)
    if not data:
        return None
    figure = import_optional("matplotlib.figure", "the bench plots")
    units = {r.plan.bench.op: UNITS[r.plan.bench.unit][2] for r in results}
    cols = min(3, len(data))
    rows = math.ceil(len(data) / cols)
    fig = figure.Figure(figsize=(5.5 * cols, 3.8 * rows), layout="constrained")
    for i, (key, lines) in enumerate(data.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for provider, points in sorted(lines.items()):
            ax.plot([n for n, _ in points], [y for _, y in points], marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(units[key[0]])
        ax.set_title(_title(key), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    path = Path(folder) / PLOT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
