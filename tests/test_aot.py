"""Ahead-of-time compile of every Triton kernel of the package for sm_80 and sm_90, without a GPU.

The cases of ``metagpt_fast.devtools.aot`` (one per configuration the kernels' launchers and autotuners may pick) are
compiled by ``python -m metagpt_fast.devtools.aot`` in a subprocess (the test process runs Triton under the
interpreter, which has no compiler). The report prints registers, shared memory, spill bytes and the Hopper figures
(HGMMA, their waits, TMA and cp.async loads, instructions per main-loop step) per kernel. Each gate of
``aot.GATES`` is one test: a compile error, spills a case does not justify, sm_90 attention matmuls without wgmma,
wgmma that ptxas serialises (its advisories C7510-C7515), more than one tensor-core wait per four wgmma in a 16-bit
forward or dQ kernel, tensor-core products that several warps repeat, a main-loop step over its instruction
budget, or a Hopper forward that loads K and V without TMA (or with cp.async). The gates themselves are checked on
canned rows, so none of them passes by construction.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from metagpt_fast.devtools import aot  # noqa: E402  (after the importorskip)

slow = pytest.mark.slow  # compiles every case twice: minutes on a few cores without triton's cache


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
            continue
        line = (
            f"sm_{row['arch']} {row['label']}: {row['registers']} regs, {row['shared_bytes']} B shared, "
            f"{row['spill_bytes']} B spilled, wgmma={row['uses_wgmma']}"
        )
        if ops := row["opcodes"]:  # the SASS figures (sm_90)
            line += (
                f", HGMMA {ops['HGMMA']}, DEPBAR {ops['WARPGROUP.DEPBAR']}, UTMALDG {ops['UTMALDG']}, "
                f"LDGSTS {ops['LDGSTS']}, loop {row['loop_instructions']}, ptxas {row['ptxas_advisories']}, "
                f"replicated {row['replicated_dots']}"
            )
        print(line)
    return rows


def _gate(rows, gate):
    failures = aot.gate_failures(rows, gate)
    assert not failures, "\n".join(failures)


@slow
def test_every_kernel_compiles_for_sm80_and_sm90(aot_report):
    assert aot_report, "no cases in metagpt_fast.devtools.aot"
    _gate(aot_report, "compile")
    assert {r["arch"] for r in aot_report} == {80, 90}
    assert len({(r["label"], r["arch"]) for r in aot_report}) == len(aot_report), "two cases with one label"


def test_every_kernel_has_a_case():
    """Each @triton.jit kernel a kernel module exports in KERNELS is compiled by at least one case."""
    from metagpt_fast.kernels.triton import (
        attention,
        attention_fused_bwd,
        bias_gelu,
        decode,
        flash,
        linear_cross_entropy,
        norms,
        positional,
        rotary,
    )

    modules = (
        attention, attention_fused_bwd, positional, rotary, decode, flash, linear_cross_entropy, norms, bias_gelu,
    )  # fmt: skip
    compiled = {case.kernel for case in aot.all_cases()}
    kernels = [k for module in modules for k in module.KERNELS.values()]
    assert [k.__name__ for k in kernels if k not in compiled] == []


def test_case_labels_are_unique():
    """Reports and gates key on the label: two cases with one label would hide one of them."""
    labels = [case.label for case in aot.all_cases()]
    assert sorted(label for label in set(labels) if labels.count(label) > 1) == []


def test_attention_autotuner_keys_on_length_buckets():
    """The attention autotuners key on kernel arguments, with the sequence lengths as powers of 2 (one tuning per
    bucket, not per length)."""
    from metagpt_fast.kernels.triton import attention

    for kind in ("fwd", "dkdv", "dq"):
        tuned = attention._autotuned(kind, (16, 128, False), (9, 0))
        assert set(tuned.keys) <= set(attention.KERNELS[kind].arg_names), kind
        assert {"Nq_bucket", "Nk_bucket"} <= set(tuned.keys) and not {"Nq", "Nk"} & set(tuned.keys), kind
        assert [tuple(c.kwargs.values()) for c in tuned.configs] == [
            (m, n) for m, n, _, _ in attention.tiles(kind, (16, 128, False), (9, 0))
        ]
    assert attention.length_buckets(1000, 17) == (1024, 32)
    assert attention.length_buckets(1024, 1) == (1024, 1)


@slow
def test_no_unjustified_spills(aot_report):
    _gate(aot_report, "spills")


@slow
def test_hopper_attention_uses_wgmma(aot_report):
    _gate(aot_report, "wgmma")


@slow
def test_main_loop_found_in_every_attention_kernel(aot_report):
    """The per-step figures exist for every sm_90 streaming kernel (the reader found its main loop)."""
    hopper = [r for r in aot_report if r["arch"] >= 90 and r["role"] in ("fwd", "dq", "dkdv")]
    assert hopper
    missing = [r["label"] for r in hopper if not r["loop_instructions"]]
    assert not missing


@slow
def test_ptxas_does_not_serialise_wgmma(aot_report):
    hopper = [r for r in aot_report if r["arch"] >= 90 and "error" not in r]
    if all(r["ptxas_advisories"] is None for r in hopper):
        pytest.skip(f"ptxas advisories not available: {hopper[0]['ptxas'] if hopper else 'no sm_90 rows'}")
    _gate(aot_report, "serialised_wgmma")


@slow
def test_forward_and_dq_do_not_wait_after_every_wgmma(aot_report):
    _gate(aot_report, "waits_per_wgmma")


@slow
def test_no_tensor_core_product_is_repeated_by_several_warps(aot_report):
    _gate(aot_report, "replicated_products")


@slow
def test_hopper_forward_main_loop_within_its_budget(aot_report):
    budgeted = [r for r in aot_report if r.get("loop_budget") and r["arch"] >= 90]
    assert budgeted, "no sm_90 case carries a loop budget"
    _gate(aot_report, "loop_budget")


@slow
def test_hopper_attention_streams_its_tiles_with_tma(aot_report):
    """The forward's K and V, dQ's K and V and dK/dV's Q and dO (but at D=128: attention.BLOCK_POINTER_FAMILIES)."""
    expecting = [r for r in aot_report if r.get("expect_tma") and r["arch"] >= 90]
    assert {r["dtype"] for r in expecting} == {"bf16"} and {r["role"] for r in expecting} == {"fwd", "dq", "dkdv"}
    _gate(aot_report, "tma")


@slow
def test_hopper_forward_warp_specialises_its_one_loop_form(aot_report):
    expecting = [r for r in aot_report if r.get("expect_warp_specialized") and r["arch"] >= 90]
    assert expecting, "no warp-specialised case"
    _gate(aot_report, "warp_specialized")


# ----------------------------------------------------------------------------------------------------------------
# the gates on canned rows (no compiler)

GOOD = {
    "label": "_attn_fwd[...,w8,s3,bf16]", "arch": 90, "role": "fwd", "dtype": "bf16", "allowed_spill_bytes": 0,
    "expect_wgmma": True, "registers": 186, "spill_bytes": 0, "uses_wgmma": True,
    "opcodes": {"HGMMA": 24, "WARPGROUP.DEPBAR": 4}, "replicated_dots": [], "replication": 1,
    "allowed_replication": 1, "ptxas_advisories": [], "loop_budget": 550, "loop_instructions_per_128_rows": 516.0,
    "expect_tma": True, "cp_async_rows": False, "expect_warp_specialized": True, "warp_specialized": True,
}  # fmt: skip
GOOD["opcodes"] = {**GOOD["opcodes"], "UTMALDG": 8, "LDGSTS": 0}
WGMMA_X2 = {"replicated_dots": ["64x32 mma v3 warpsPerCTA=[8, 1] x2"], "replication": 2}
MMA_X4 = {"replicated_dots": ["32x16 mma v2 warpsPerCTA=[1, 8] x4"], "replication": 4}


@pytest.mark.parametrize(
    ("gate", "bad"),
    [
        ("compile", {"error": "CompilationError: ..."}),
        ("spills", {"spill_bytes": 8}),
        ("wgmma", {"uses_wgmma": False}),
        ("serialised_wgmma", {"ptxas_advisories": ["C7515"]}),
        ("serialised_wgmma", {"ptxas_advisories": ["C7510", "C7999"]}),
        ("waits_per_wgmma", {"opcodes": {"HGMMA": 24, "WARPGROUP.DEPBAR": 24}}),
        ("waits_per_wgmma", {"role": "dq", "dtype": "fp16", "opcodes": {"HGMMA": 36, "WARPGROUP.DEPBAR": 10}}),
        ("replicated_products", WGMMA_X2),
        ("replicated_products", MMA_X4),
        ("replicated_products", {**MMA_X4, "allowed_replication": 2}),
        ("loop_budget", {"loop_instructions_per_128_rows": 551.0}),
        ("loop_budget", {"loop_instructions_per_128_rows": None}),  # no main loop found
        ("tma", {"opcodes": {**GOOD["opcodes"], "UTMALDG": 0}}),
        ("tma", {"opcodes": {**GOOD["opcodes"], "LDGSTS": 16}}),
        ("tma", {"cp_async_rows": True, "opcodes": {**GOOD["opcodes"], "UTMALDG": 0, "LDGSTS": 16}}),
        ("warp_specialized", {"warp_specialized": False}),
    ],
)
def test_gates_fail_bad_rows_and_pass_good_ones(gate, bad):
    assert aot.gate_failures([GOOD], gate) == []
    [failure] = aot.gate_failures([{**GOOD, **bad}], gate)
    assert failure.startswith("sm_90 _attn_fwd[")


@pytest.mark.parametrize(
    ("gate", "exempt"),
    [
        ("spills", {"spill_bytes": 48, "allowed_spill_bytes": 48}),  # a documented allowance
        ("wgmma", {"uses_wgmma": False, "arch": 80}),
        ("serialised_wgmma", {"ptxas_advisories": None}),  # ptxas not run
        ("serialised_wgmma", {"ptxas_advisories": ["C7999"]}),  # not a serialisation advisory
        ("waits_per_wgmma", {"role": "dkdv", "opcodes": {"HGMMA": 24, "WARPGROUP.DEPBAR": 24}}),
        ("waits_per_wgmma", {"dtype": "fp32", "opcodes": {"HGMMA": 24, "WARPGROUP.DEPBAR": 24}}),
        ("waits_per_wgmma", {"opcodes": {"HGMMA": 24, "WARPGROUP.DEPBAR": 6}}),  # exactly 0.25 per HGMMA
        ("replicated_products", {"replicated_dots": ["16x16 fma warpsPerCTA=[8, 1] x2"]}),  # FMA units, float32
        ("replicated_products", {**MMA_X4, "arch": 80}),
        ("replicated_products", {**WGMMA_X2, "allowed_replication": 2}),  # a documented allowance
        ("loop_budget", {"loop_instructions_per_128_rows": 550.0}),
        ("loop_budget", {"loop_budget": None, "loop_instructions_per_128_rows": 900.0}),
        ("loop_budget", {"arch": 80, "loop_instructions_per_128_rows": 900.0}),
        ("tma", {"expect_tma": False, "opcodes": {**GOOD["opcodes"], "UTMALDG": 0, "LDGSTS": 16}}),
        ("tma", {"arch": 80, "opcodes": {}}),  # no SASS figures on sm_80
        ("tma", {"cp_async_rows": True, "opcodes": {**GOOD["opcodes"], "LDGSTS": 8}}),  # dK/dV's row vectors
        ("warp_specialized", {"expect_warp_specialized": False, "warp_specialized": False}),
        ("warp_specialized", {"arch": 80, "warp_specialized": False}),
    ],
)
def test_gates_leave_out_what_they_do_not_cover(gate, exempt):
    assert aot.gate_failures([{**GOOD, **exempt}], gate) == []
