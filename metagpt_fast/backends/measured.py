"""Measured speed per size class: the table that ``auto``'s priorities read before their static order.

``measured_speed.json`` (next to this module) is written by ``python -m metagpt_fast.bench.calibrate`` on one
machine and committed with the date, the machine and the command. Each entry is one *size class* of one op:

    {"op": "attention", "device": "cpu", "dtype": "float32", "mode": "fwd", "n": 1024, "head_dim": 64,
     "causal": true, "speedup": {"reference": [1.0, 1.0, 1.0], "cpu": [7.1, 6.8, 7.3]}}

``speedup[backend]`` is ``[median, ci_low, ci_high]`` of that backend's per-round speedup over the reference
(interleaved rounds, ``bench/interleave.py``). A backend's measured priority is its place against the reference:
``PRIORITY_STEP * (place of the reference - its place)`` in the order of the medians, so a kernel measured slower than
the reference gets a negative priority (``auto`` then keeps the reference), and the fastest measured kernel ranks
first. A backend whose interval contains 1 (a tie with the reference, or too noisy to tell), a backend that an entry
does not name, an input outside every measured class (another head dim, a mask, dropout, N more than twice away
from every measured N), or a missing or ill-formed table gives the static priority: nothing here raises, at import
or at selection.

Size classes (:func:`attention_class`): the device (``cpu``, or ``cuda-sm90`` by compute capability), the dtype,
``fwd`` or ``fwd+bwd`` (whether a gradient will be taken), the measured N nearest in log scale (within a factor of 2),
the head dim rounded up to a measured one (within a factor of 2), and causal or not.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("metagpt_fast.backends")

# The committed table, or the one METAGPT_FAST_SPEED_TABLE names (a machine calibrated with ``--out``); read at import.
TABLE_ENV_VAR = "METAGPT_FAST_SPEED_TABLE"
DEFAULT_TABLE_PATH = Path(__file__).with_name("measured_speed.json")
TABLE_PATH = Path(os.environ.get(TABLE_ENV_VAR) or DEFAULT_TABLE_PATH)
FORMAT_VERSION = 1
PRIORITY_STEP = 10
# An N is served by the nearest measured N when within this factor of it, else the static order holds.
N_REACH = 2.0

_ENTRY_KEYS = ("op", "device", "dtype", "mode", "n", "head_dim", "causal", "speedup")


class Table:
    """The size classes of a loaded table: ``(op, device, dtype, mode, causal) -> {head_dim: [(lo, hi, ranking)]}``,
    each measured N serving ``lo <= N < hi`` (integer bounds, so a lookup on a traced symbolic N is plain
    comparisons: torch.compile guards on them instead of failing on float math)."""

    def __init__(self, entries: list[Mapping[str, Any]] | None = None, meta: Mapping[str, Any] | None = None):
        self.meta = dict(meta or {})
        sizes: dict[tuple, dict[int, dict[int, dict[str, int]]]] = {}
        for e in entries or ():
            key = (e["op"], e["device"], e["dtype"], e["mode"], bool(e["causal"]))
            sizes.setdefault(key, {}).setdefault(int(e["head_dim"]), {})[int(e["n"])] = priorities(e["speedup"])
        self.classes: dict[tuple, dict[int, list[tuple[int, int, dict[str, int]]]]] = {}
        for key, dims in sizes.items():
            for d, by_n in dims.items():
                ns = sorted(m for m in by_n if m > 0)
                # The nearest measured N in log scale, within a factor of N_REACH: bounds at the geometric midpoints.
                bounds = [math.ceil(ns[0] / N_REACH)]
                bounds += [math.ceil(math.sqrt(a * b)) for a, b in zip(ns, ns[1:], strict=False)]
                bounds += [math.floor(ns[-1] * N_REACH) + 1]
                ranges = [(bounds[i], bounds[i + 1], by_n[m]) for i, m in enumerate(ns)]
                self.classes.setdefault(key, {})[d] = ranges

    def __len__(self) -> int:
        return sum(len(r) for dims in self.classes.values() for r in dims.values())

    def lookup(self, op: str, device: str, dtype: str, mode: str, causal: bool, n, head_dim):
        """The measured priorities ``{backend: priority}`` of the class that serves this input, or None."""
        dims = self.classes.get((op, device, dtype, mode, bool(causal)))
        if not dims:
            return None
        for d in sorted(dims):  # the smallest measured head dim at or above the input's, within a factor of 2
            if head_dim <= d and d < 2 * head_dim:
                for lo, hi, ranking in dims[d]:
                    if lo <= n and n < hi:
                        return ranking
                return None
        return None


def priorities(speedup: Mapping[str, Any]) -> dict[str, int]:
    """``{backend: PRIORITY_STEP * (place of the reference - its place)}`` in the order of the median speedups.

    A backend whose interval contains 1 (not measurably faster or slower than the reference) is left out: its static
    priority holds there."""
    for b, v in speedup.items():
        if not float(v[0]) > 0:
            raise ValueError(f"speedup of {b!r} must be a positive median, got {v[0]}")
    medians = {
        str(b): float(v[0]) for b, v in speedup.items() if b == "reference" or not float(v[1]) <= 1.0 <= float(v[2])
    }
    medians["reference"] = 1.0
    order = sorted(medians, key=lambda b: (-medians[b], b != "reference"))  # a tie keeps the reference
    ref = order.index("reference")
    return {b: PRIORITY_STEP * (ref - i) for i, b in enumerate(order) if b != "reference"}


def parse(data: Any) -> Table:
    """A :class:`Table` from the decoded JSON; raises ValueError on any ill-formed part."""
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        raise ValueError(f"expected an object with version {FORMAT_VERSION}")
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise ValueError("entries must be a list")
    for e in entries:
        if not isinstance(e, dict) or any(k not in e for k in _ENTRY_KEYS):
            raise ValueError(f"each entry needs {_ENTRY_KEYS}, got {e!r}")
        if not isinstance(e["speedup"], dict) or not all(
            isinstance(v, list) and len(v) == 3 and all(isinstance(x, int | float) for x in v)
            for v in e["speedup"].values()
        ):
            raise ValueError(f"speedup must map backends to [median, ci_low, ci_high], got {e['speedup']!r}")
    return Table(entries, {k: v for k, v in data.items() if k != "entries"})


def load(path: Path | str | None = None) -> Table:
    """The table at ``path`` (default :data:`TABLE_PATH`); an empty table, with a warning, if it is missing or
    ill-formed (the static priorities then hold everywhere)."""
    path = Path(path) if path is not None else TABLE_PATH
    try:
        return parse(json.loads(path.read_text()))
    except FileNotFoundError:
        logger.info("no measured speed table at %s: static priorities", path)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        logger.warning("ignoring the measured speed table %s (%s): static priorities", path, exc)
    return Table()


_table = load()


def table() -> Table:
    return _table


def set_table(new: Table) -> Table:
    """Replaces the loaded table (tests, a freshly calibrated machine); returns the previous one."""
    global _table
    previous, _table = _table, new
    from metagpt_fast.backends import registry  # the priorities read the table: cached selections are stale

    registry.invalidate()
    return previous


def device_class(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    return device.type


def needs_grad(*tensors: Any) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def attention_class(inputs: Mapping[str, Any]) -> tuple | None:
    """``(device, dtype, mode, causal, n, head_dim)`` of an attention input, or None where no class applies (a mask,
    dropout, keys and queries of different lengths, or no tensors to classify)."""
    q, k, v = (inputs.get(name) for name in ("query", "key", "value"))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return None
    if inputs.get("attn_mask") is not None or inputs.get("dropout_p", 0.0) > 0.0 or q.shape[-2] != k.shape[-2]:
        return None
    mode = "fwd+bwd" if needs_grad(q, k, v) else "fwd"
    dtype = str(q.dtype).removeprefix("torch.")
    return (
        device_class(q.device),
        dtype,
        mode,
        bool(inputs.get("is_causal")),
        q.shape[-2],
        max(q.shape[-1], v.shape[-1]),
    )


def attention_priority(backend: str, static: int, inputs: Mapping[str, Any]) -> int:
    """``backend``'s priority for an attention input: the measured one where the table has the input's class, else
    ``static``."""
    size = attention_class(inputs)
    if size is None:
        return static
    device, dtype, mode, causal, n, head_dim = size
    measured = _table.lookup("attention", device, dtype, mode, causal, n, head_dim)
    if measured is None or backend not in measured:
        return static
    return measured[backend]
