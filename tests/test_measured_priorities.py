"""``auto`` follows the measured speed table (backends/measured.py, written by bench/calibrate.py): the table is read,
a class it ranks the reference first gets the reference, unmeasured classes keep the static order, and a missing or
ill-formed table falls back to the static order without raising; the CPU attention's AVX-512 tile path and its
portable path agree."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import AVAILABLE_BACKENDS

import metagpt_fast
from metagpt_fast import backends
from metagpt_fast.backends import measured

needs_cpu = pytest.mark.skipif("cpu" not in AVAILABLE_BACKENDS, reason="the compiled cpu backend is not available")


def entry(n, head_dim, causal, cpu, mode="fwd", dtype="float32"):
    return dict(
        op="attention", device="cpu", dtype=dtype, mode=mode, n=n, head_dim=head_dim, causal=causal,
        speedup={"reference": [1.0, 1.0, 1.0], "cpu": [cpu, cpu * 0.95, cpu * 1.05]},
    )  # fmt: skip


def table(*entries):
    return {"version": measured.FORMAT_VERSION, "measured": "test", "entries": list(entries)}


@pytest.fixture
def use_table():
    previous = measured.table()
    yield lambda data: measured.set_table(measured.parse(data))
    measured.set_table(previous)


def inputs(n=64, d=16, causal=False, grad=False, **extra):
    q, k, v = (torch.randn(1, 2, n, d, requires_grad=grad) for _ in range(3))
    args = dict(query=q, key=k, value=v, attn_mask=None, dropout_p=0.0, is_causal=causal, scale=None, enable_gqa=False)
    return {**args, **extra}


def test_priorities_follow_the_medians():
    assert measured.priorities({"reference": [1, 1, 1], "cpu": [2.0, 1.9, 2.1]}) == {"cpu": 10}
    assert measured.priorities({"reference": [1, 1, 1], "cpu": [0.8, 0.7, 0.9]}) == {"cpu": -10}
    assert measured.priorities({"cpu": [1.0, 0.9, 1.1]}) == {}  # a tie (or noise): the static priority holds
    assert measured.priorities({"cpu": [0.95, 0.7, 1.2]}) == {}
    ranks = measured.priorities({"triton": [3.0, 3, 3], "cuda": [4.0, 4, 4], "reference": [1, 1, 1]})
    assert ranks == {"cuda": 20, "triton": 10}


def test_lookup_classes():
    t = measured.parse(table(entry(128, 64, False, 2.0), entry(2048, 64, False, 0.5), entry(512, 128, True, 3.0)))
    assert len(t) == 3
    look = lambda n, d, causal=False, mode="fwd": t.lookup("attention", "cpu", "float32", mode, causal, n, d)  # noqa: E731
    assert look(128, 64) == {"cpu": 10}
    assert look(255, 40) == {"cpu": 10}  # nearest N in log scale; head dim rounded up to a measured one
    assert look(1500, 64) == {"cpu": -10}
    assert look(4096, 64) == {"cpu": -10}  # within a factor of 2 of 2048
    assert look(8192 + 1, 64) is None  # beyond it: the static order
    assert look(64, 64) == {"cpu": 10} and look(63, 64) is None
    assert look(512, 16) is None  # no measured head dim within a factor of 2
    assert look(512, 128, causal=True) == {"cpu": 10} and look(512, 128) is None
    assert look(128, 64, mode="fwd+bwd") is None


@needs_cpu
def test_auto_reads_the_table(use_table):
    use_table(table(entry(64, 16, False, 0.5), entry(64, 16, True, 2.0), entry(64, 16, False, 3.0, mode="fwd+bwd")))
    with torch.no_grad():
        assert backends.select("attention", **inputs()).backend == "reference"  # measured slower: the reference
        assert backends.select("attention", **inputs(causal=True)).backend == "cpu"
        assert backends.select("attention", **inputs(d=64)).backend == "cpu"  # unmeasured class: static order
        assert backends.select("attention", **inputs(attn_mask=torch.ones(64, 64, dtype=torch.bool))).backend == "cpu"
    assert backends.select("attention", **inputs(grad=True)).backend == "cpu"  # the fwd+bwd class
    use_table(table())
    with torch.no_grad():
        assert backends.select("attention", **inputs()).backend == "cpu"


@pytest.mark.parametrize(
    "text",
    [
        "not json {",
        json.dumps({"version": 99, "entries": []}),
        json.dumps({"version": 1, "entries": {}}),
        json.dumps(table({"op": "attention"})),
        json.dumps(table({**entry(64, 16, False, 1.0), "speedup": {"cpu": "fast"}})),
        json.dumps(table({**entry(64, 16, False, 1.0), "speedup": {"cpu": [-1.0, 0, 0]}})),
    ],
)
def test_ill_formed_table_falls_back(tmp_path, caplog, text):
    path = tmp_path / "t.json"
    path.write_text(text)
    t = measured.load(path)
    assert len(t) == 0 and t.lookup("attention", "cpu", "float32", "fwd", False, 64, 16) is None
    assert "ignoring the measured speed table" in caplog.text


def test_missing_table_and_import_fall_back(tmp_path, monkeypatch):
    assert len(measured.load(tmp_path / "absent.json")) == 0
    bad = tmp_path / "bad.json"
    bad.write_text("[")
    monkeypatch.setenv(measured.TABLE_ENV_VAR, str(bad))
    try:
        importlib.reload(measured)  # the import-time load: falls back, never raises
        assert len(measured.table()) == 0
        assert measured.attention_priority("cpu", 10, inputs()) == 10
    finally:
        monkeypatch.undo()
        importlib.reload(measured)


def test_committed_table_is_read():
    if os.environ.get(measured.TABLE_ENV_VAR):
        pytest.skip(f"{measured.TABLE_ENV_VAR} names another table")
    data = json.loads(measured.DEFAULT_TABLE_PATH.read_text())
    assert data["measured"] and data["machine"] and data["command"].startswith("python -m metagpt_fast.bench.calibrate")
    assert len(measured.table()) == len(data["entries"]) > 0


@needs_cpu
def test_calibrate_writes_a_readable_table(tmp_path):
    from metagpt_fast.bench import calibrate

    out = tmp_path / "speed.json"
    out.write_text(json.dumps(table({**entry(64, 16, False, 1.0), "device": "cuda-sm90"})))  # kept: not re-measured
    argv = ["--quick", "--n", "32", "--head-dims", "16", "--dtypes", "float32", "--modes", "fwd", "--out", str(out)]
    assert calibrate.main(argv) == 0
    data = json.loads(out.read_text())
    assert {e["device"] for e in data["entries"]} == {"cpu", "cuda-sm90"}
    cpu = [e for e in data["entries"] if e["device"] == "cpu"]
    assert sorted(e["causal"] for e in cpu) == [False, True] and all("cpu" in e["speedup"] for e in cpu)
    assert len(measured.load(out)) == 3


@needs_cpu
@pytest.mark.slow  # three fresh interpreters: about 45 s on 2 loaded cores
def test_portable_cpu_path_matches_the_tiles(tmp_path):
    """The portable (BLAS) path of the forward and backward (METAGPT_FAST_CPU_TILES=0) and the AVX2 tiles
    (METAGPT_FAST_CPU_TILES=avx2, where the CPU has AVX2) against the default (the best tiles the CPU runs; the parity
    tests compare that one with the reference) on odd shapes."""
    script = textwrap.dedent(
        """
        import sys, torch, metagpt_fast
        torch.manual_seed(0)
        outs = []
        for n, d, dv, causal, dtype in [(77, 40, 24, True, torch.float32), (300, 64, 64, False, torch.float32),
                                        (130, 128, 96, True, torch.bfloat16)]:
            q, k = torch.randn(2, 3, n, d).to(dtype), torch.randn(2, 3, n, d).to(dtype)
            v = torch.randn(2, 3, n, dv).to(dtype)
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            out = metagpt_fast.scaled_dot_product_attention(q, k, v, is_causal=causal, backend="cpu")
            outs += [out.detach(), *torch.autograd.grad(out, (q, k, v), torch.randn_like(out))]
        torch.save(outs, sys.argv[1])
        """
    )
    results = {}
    for flag in ("0", "avx2", "1"):
        path = str(tmp_path / f"out{flag}.pt")
        env = {**os.environ, "METAGPT_FAST_CPU_TILES": flag}
        subprocess.run([sys.executable, "-c", script, path], env=env, check=True, timeout=120)
        results[flag] = torch.load(path)
    for portable, avx2, tiles in zip(results["0"], results["avx2"], results["1"], strict=True):
        tol = 1e-5 if portable.dtype == torch.float32 else 1e-2
        torch.testing.assert_close(tiles, portable, atol=tol, rtol=tol)
        torch.testing.assert_close(avx2, portable, atol=tol, rtol=tol)


@needs_cpu
@pytest.mark.slow  # an Inductor compile
def test_lookup_traces_with_symbolic_sizes(use_table):
    """torch.compile with dynamic shapes traces the lookup (integer bounds on a symbolic N, no float math) and
    follows the table on both sides of a bound."""
    use_table(table(entry(64, 16, True, 2.0), entry(256, 16, True, 0.5)))
    compiled = torch.compile(
        lambda q, k, v: metagpt_fast.scaled_dot_product_attention(q, k, v, is_causal=True), dynamic=True, fullgraph=True
    )
    for n in (40, 100, 200, 300):
        q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
        with torch.no_grad():
            torch.testing.assert_close(
                compiled(q, k, v), metagpt_fast.scaled_dot_product_attention(q, k, v, is_causal=True)
            )
        assert backends.select("attention", **inputs(n=n, causal=True)).backend == ("cpu" if n < 128 else "reference")
