"""Ahead-of-time compile of every Triton kernel of the package for sm_80 and sm_90, without a GPU.

The cases of ``metagpt_fast.devtools.aot`` (one per configuration the kernels' launchers and autotuners may pick) are
compiled by ``python -m metagpt_fast.devtools.aot`` in a subprocess (the test process runs Triton under the
interpreter, which has no compiler). The report prints registers, shared memory and spill bytes per kernel; a case
fails on a compile error, on spills it does not justify, or when sm_90 attention matmuls do not use wgmma.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.slow  # compiles every case twice: minutes on a few cores without triton's cache


@pytest.fixture(scope="module")
def aot_report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "metagpt_fast.devtools.aot"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for row in rows:
        if "error" in row:
            print(f"sm_{row['arch']} {row['label']}: ERROR {row['error']}")
        else:
            print(
                f"sm_{row['arch']} {row['label']}: {row['registers']} regs, {row['shared_bytes']} B shared, "
                f"{row['spill_bytes']} B spilled, wgmma={row['uses_wgmma']}"
            )
    return rows


def test_every_kernel_compiles_for_sm80_and_sm90(aot_report):
    assert aot_report, "no cases in metagpt_fast.devtools.aot"
    errors = [f"sm_{r['arch']} {r['label']}: {r['error']}" for r in aot_report if "error" in r]
    assert not errors, "\n".join(errors)
    assert {r["arch"] for r in aot_report} == {80, 90}


def test_every_kernel_has_a_case():
    """Each @triton.jit kernel a kernel module exports in KERNELS is compiled by at least one case."""
    from metagpt_fast.devtools import aot
    from metagpt_fast.kernels.triton import attention, positional, rotary

    compiled = {case.kernel for case in aot.all_cases()}
    kernels = [k for module in (attention, positional, rotary) for k in module.KERNELS.values()]
    assert [k.__name__ for k in kernels if k not in compiled] == []


def test_no_unjustified_spills(aot_report):
    spilling = [
        f"sm_{r['arch']} {r['label']}: {r['spill_bytes']} B (allowed {r['allowed_spill_bytes']})"
        for r in aot_report
        if "error" not in r and r["spill_bytes"] > r["allowed_spill_bytes"]
    ]
    assert not spilling, "\n".join(spilling)


def test_hopper_attention_uses_wgmma(aot_report):
    missing = [
        r["label"]
        for r in aot_report
        if "error" not in r and r["expect_wgmma"] and r["arch"] >= 90 and not r["uses_wgmma"]
    ]
    assert not missing, f"sm_90 kernels without wgmma: {missing}"
