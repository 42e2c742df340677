"""Hypothesis profiles for the property tests, chosen with ``HYPOTHESIS_PROFILE`` (default ``ci``).

- ``ci``: 300 examples per op per backend, small shapes, derandomized (the same examples on every run, no example
  database), so the whole property suite stays within a few minutes on 2 CPU cores under ``TRITON_INTERPRET=1``.
- ``dev``: 2000 random examples per op per backend over larger shapes, with the example database, for runs by hand:
  ``HYPOTHESIS_PROFILE=dev pytest tests/test_property.py``.
"""

from __future__ import annotations

import dataclasses
import os

from hypothesis import HealthCheck, settings


@dataclasses.dataclass(frozen=True)
class Limits:
    batch: int  # largest batch size
    heads: int  # largest number of key/value heads (query heads = kv heads x GQA ratio)
    seq: int  # largest sequence length (queries, keys, tokens)
    head_dim: int  # largest head dim / model width
    vocab: int  # largest vocabulary
    position: int  # largest position (offset + length, or a position id)


LIMITS = {
    "ci": Limits(batch=2, heads=2, seq=20, head_dim=40, vocab=40, position=512),
    "dev": Limits(batch=3, heads=4, seq=96, head_dim=136, vocab=300, position=4096),
}

# Examples run their own torch code (seconds under the Triton interpreter): no deadline, no too-slow check. The
# autouse seed fixture of conftest.py is function-scoped; every example seeds its own generator instead.
_COMMON = dict(
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.register_profile("ci", max_examples=300, derandomize=True, database=None, **_COMMON)
settings.register_profile("dev", max_examples=2000, **_COMMON)


def profile_name() -> str:
    name = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    if name not in LIMITS:
        raise ValueError(f"HYPOTHESIS_PROFILE must be one of {sorted(LIMITS)}, got {name!r}")
    return name


def load_profile() -> None:
    settings.load_profile(profile_name())


def limits() -> Limits:
    return LIMITS[profile_name()]
