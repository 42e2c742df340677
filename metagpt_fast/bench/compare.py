"""Regression reports: the time change of every case between two results files, and whether it is significant.

Rows are matched on (op, backend, mode, shape, dtype) of their ``time_ms`` metric; when a file holds several runs
of a case (it is appended to), the last row counts. The change is ``new median / old median - 1`` (+ = slower).
Each median comes with an interval: the 95% bootstrap interval of the median (``ci_low``/``ci_high``) when the run
recorded one, else the p20–p80 range (wider, so older files are judged conservatively). The change's interval is
``[new_low / old_high, new_high / old_low] - 1``; the change is *significant* when that interval excludes 0.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from metagpt_fast import backends

METRIC = "time_ms"


@dataclasses.dataclass(frozen=True)
class Change:
    key: tuple
    old: dict
    new: dict
    change: float  # new / old - 1 of the median times: +0.10 = 10% slower
    low: float  # the change's interval
    high: float

    @property
    def significant(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def label(self) -> str:
        op, backend, mode, shape, dtype = self.key
        dims = " ".join(f"{k}={v}" if not isinstance(v, bool) else k for k, v in json.loads(shape).items() if v)
        return f"{op} {mode} {dims} {dtype} {backend}"


def case_key(row: dict) -> tuple:
    return (row["op"], row["backend"], row["mode"], json.dumps(row["shape"], sort_keys=True), row["dtype"])


def latest(rows: Iterable[dict], metric: str = METRIC) -> dict[tuple, dict]:
    """The last row of ``metric`` per case (a results file is appended to, run after run)."""
    out = {}
    for row in rows:
        if row.get("metric") == metric and row.get("value") is not None:
            out[case_key(row)] = row
    return out


def _interval(row: dict) -> tuple[float, float]:
    lo, hi = row.get("ci_low"), row.get("ci_high")
    if lo is None or hi is None:
        lo, hi = row.get("p20"), row.get("p80")
    value = row["value"]
    return (value if lo is None else min(lo, value)), (value if hi is None else max(hi, value))


def compare_rows(old_rows: Iterable[dict], new_rows: Iterable[dict]) -> list[Change]:
    """The change of every case timed in both (in the new rows' order)."""
    old = latest(old_rows)
    changes = []
    for key, new in latest(new_rows).items():
        if key not in old or not old[key]["value"] > 0:
            continue
        o = old[key]
        (o_lo, o_hi), (n_lo, n_hi) = _interval(o), _interval(new)
        low = n_lo / o_hi - 1 if o_hi > 0 else float("-inf")
        high = n_hi / o_lo - 1 if o_lo > 0 else float("inf")
        changes.append(Change(key, o, new, new["value"] / o["value"] - 1, low, high))
    return changes


def regressions(changes: Sequence[Change], pct: float) -> list[Change]:
    """Significant slowdowns of more than ``pct`` percent of the package's own backends (external baselines such as
    torch SDPA change with torch, not with this project)."""
    ours = set(backends.BACKENDS)
    return [c for c in changes if c.key[1] in ours and c.significant and 100 * c.change > pct]


def compare_table(changes: Sequence[Change], old_path: str | Path | None = None):
    """A rich table: one row per case, the old and new median times, the change and its significance."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(
        title=f"change against {old_path}" if old_path else "change",
        caption=(
            "change: new median time / old - 1 (+ = slower), with its interval from both runs' 95% intervals "
            "(p20–p80 where a run has none); significant when the interval excludes 0. "
            "Runs on other machines, thread counts or commits are named in the device and commit columns."
        ),
        caption_justify="left",
    )
    for name in ("case", "old ms", "new ms", "change", "interval", "significant", "device / commit"):
        table.add_column(name, justify="right" if name in ("old ms", "new ms", "change") else "left")
    for c in changes:
        significant = "yes" if c.significant else "no"
        style = "bold red" if c.significant and c.change > 0 else "green" if c.significant else ""
        context = _context(c.old, c.new)
        table.add_row(
            escape(c.label),
            f"{c.old['value']:.4g}",
            f"{c.new['value']:.4g}",
            f"[{style}]{100 * c.change:+.1f}%[/]" if style else f"{100 * c.change:+.1f}%",
            f"{100 * c.low:+.0f}% … {100 * c.high:+.0f}%",
            significant,
            escape(context),
        )
    if not changes:
        table.add_row("no case timed in both files", "", "", "", "", "", "")
    return table


def _context(old: dict, new: dict) -> str:
    parts = []
    if old.get("device") != new.get("device"):
        parts.append(f"{old.get('device')} → {new.get('device')}")
    if old.get("git_revision") != new.get("git_revision"):
        parts.append(f"{old.get('git_revision')} → {new.get('git_revision')}")
    return "; ".join(parts) or "same"
