"""The results file: one JSON object per line, appended, one line per (measurement, metric).

Columns (every line has all of them):

    op, backend, mode, shape, dtype, metric, value, p20, p80, device, versions, git_revision, timestamp, note,
    ci_low, ci_high, rounds, noisy, threads, machine

- ``shape``: the case's dimensions and flags as an object, e.g. ``{"B": 2, "H": 8, "N": 1024, "D": 64,
  "causal": true}``; ``versions``: ``{"python", "torch", "triton", "cuda", "metagpt_fast"}``.
- ``metric`` names carry their unit: ``time_ms`` (value = median, with p20/p80), ``tflops``, ``gb_per_s``,
  ``tokens_per_s`` (p20/p80 from the time percentiles: the p20 time gives the p80 throughput), ``mfu``,
  ``peak_mem_mib``, ``max_abs_err`` (against the float32/float64 reference), ``speedup_vs_reference``,
  ``speedup_vs_torch_sdpa``, and ``status`` (value null, ``note`` says why a backend did not run or was not timed).
- Interleaved timing (``metagpt_fast.bench.interleave``): ``time_ms`` and the speedups carry ``ci_low``/``ci_high``
  (the 95% bootstrap interval of the median; for a speedup, of the median of the per-round ratios, whose p20/p80 are
  in ``p20``/``p80``), ``rounds`` (the rounds timed) and, on speedups, ``noisy`` (true: the interval stayed wider
  than the tolerance until the time cap). Null where they do not apply.
- ``threads``: torch's CPU threads during the run; ``machine``: ``{"node", "system", "cpu", "cores", "gpu"}``.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path

import torch

COLUMNS = (
    "op",
    "backend",
    "mode",
    "shape",
    "dtype",
    "metric",
    "value",
    "p20",
    "p80",
    "device",
    "versions",
    "git_revision",
    "timestamp",
    "note",
    "ci_low",
    "ci_high",
    "rounds",
    "noisy",
    "threads",
    "machine",
)
RESULTS_FILE = "results.jsonl"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = _cpu_model() or platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    return f"CPU {cpu} ({threads} thread{'s' if threads != 1 else ''})"


@functools.cache
def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.cache
def versions() -> dict[str, str | None]:
    import metagpt_fast

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001  (a broken install may raise anything)
        triton_version = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "metagpt_fast": metagpt_fast.__version__,
    }


@functools.cache
def machine() -> dict[str, str | int | None]:
    """The machine the numbers come from: host name, OS, CPU model, logical cores and GPU (None without one)."""
    return {
        "node": platform.node(),
        "system": f"{platform.system()} {platform.release()}",
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


@functools.cache
def git_revision() -> str:
    """``git describe --always --dirty`` of the source tree the package runs from, or "unknown"."""
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=root,
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_row(
    *,
    op: str,
    backend: str,
    mode: str,
    shape: dict,
    dtype: torch.dtype | str,
    metric: str,
    value: float | None,
    device: str,
    p20: float | None = None,
    p80: float | None = None,
    note: str = "",
    ci_low: float | None = None,
    ci_high: float | None = None,
    rounds: int | None = None,
    noisy: bool | None = None,
) -> dict:
    """One line of the results file; non-finite numbers become null (JSON has no NaN)."""
    return {
        "op": op,
        "backend": backend,
        "mode": mode,
        "shape": dict(shape),
        "dtype": dtype if isinstance(dtype, str) else dtype_name(dtype),
        "metric": metric,
        "value": _finite(value),
        "p20": _finite(p20),
        "p80": _finite(p80),
        "device": device,
        "versions": versions(),
        "git_revision": git_revision(),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "note": note,
        "ci_low": _finite(ci_low),
        "ci_high": _finite(ci_high),
        "rounds": rounds,
        "noisy": noisy,
        "threads": torch.get_num_threads(),
        "machine": machine(),
    }


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class ResultsFile:
    """Appends rows to ``path`` (JSON lines), flushing after each batch so a killed run keeps what it measured."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.written: list[dict] = []  # the rows this object appended (this run's, for --compare)

    def append(self, rows: Iterable[dict]) -> None:
        lines = []
        for row in rows:
            missing = set(COLUMNS) - row.keys()
            if missing:
                raise ValueError(f"results row lacks columns {sorted(missing)}")
            lines.append(json.dumps({c: row[c] for c in COLUMNS}, sort_keys=False))
        if lines:
            self.written += [json.loads(line) for line in lines]
            with self.path.open("a", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")


def read_results(path: str | Path) -> list[dict]:
    """Every row of a results file (blank lines skipped)."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
