"""``metagpt-fast profile``: a tiny MetaGPT profiled on the CPU writes a Chrome trace with the fused ops' ranges."""

from __future__ import annotations

import json

import pytest
import torch

from metagpt_fast import cli
from metagpt_fast.bench.profiling import OP_RANGE_PREFIX, profile_training
from metagpt_fast.bench.train_step import model_config

TINY = ["--embed-size", "32", "--layers", "1", "--heads", "2", "--seq-len", "16", "--batch-size", "2"]


def test_profile_cli_writes_a_trace_with_op_ranges(tmp_path, capsys):
    rc = cli.main(["profile", *TINY, "--steps", "2", "--backend", "reference", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "CPU ops by self time" in printed and "peak memory" in printed
    # The table shows the ranges with their backend (rich markup must not eat "[reference]").
    assert "metagpt_fast.attention[reference]" in printed
    (trace,) = tmp_path.glob("metagpt_*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    for op in ("attention", "embed_positions"):
        assert f"{OP_RANGE_PREFIX}{op}[reference]" in names
    assert {"train_step#0", "train_step#1"} <= names


def test_profile_training_result(tmp_path):
    cfg = model_config("tiny", 16, backend="reference")
    result = profile_training(cfg, 2, 1, "cpu", torch.float32, tmp_path, warmup=0, top=5)
    assert len(result.step_ms) == 1 and result.step_ms[0] > 0
    assert 1 <= len(result.top) <= 5
    assert all(row.self_ms >= 0 and 0 <= row.share <= 1 for row in result.top)
    assert result.top == sorted(result.top, key=lambda r: -r.self_ms)
    ranges = {r.name: r for r in result.op_ranges}
    # One attention range per layer per step; the embedding once per step.
    assert ranges["metagpt_fast.attention[reference]"].calls == cfg.num_layers
    assert ranges["metagpt_fast.embed_positions[reference]"].calls == 1
    assert result.peak_bytes is None or result.peak_bytes > 0


def test_profile_refuses_memory_snapshot_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU error")
    assert cli.main(["profile", *TINY, "--memory-snapshot", "--out", str(tmp_path)]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_profile_refuses_bad_counts(tmp_path, capsys):
    assert cli.main(["profile", *TINY, "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "steps" in capsys.readouterr().err
