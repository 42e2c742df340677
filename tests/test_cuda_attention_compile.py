"""The CUDA attention kernels' static figures and gates for sm_80 and sm_90 (no GPU needed).

Every csrc/attention/*.cu is compiled by nvcc for both architectures and its SASS read with cuobjdump
(``metagpt_fast.devtools.cuda_attention``); the launch templates are compiled on the host with a launcher that records
each launch (kernel, threads, dynamic shared memory) instead of launching. The report prints, per kernel and arch:
registers, spills, threads, shared memory per CTA, CTAs per SM and what limits them, the HMMA / LDS / LDSM / LDGSTS /
LDG / STS counts and (LDS + LDSM) per HMMA of the whole kernel and of its main loop. The gates of
``cuda_attention.GATES`` are one test each: no kernel missing from the SASS or the ptxas log, no spills, at least one
CTA per SM, ldmatrix and cp.async loads in the forward, dK/dV and dQ kernels, and at most 1.5 (forward) / 1.75 (dK/dV,
dQ) shared-memory loads per HMMA. The gates themselves are checked on canned rows (quick tier), so none passes by
construction. Compiling is the slow tier; skipped when nvcc is missing.
"""

import importlib.util
import io
import json
from pathlib import Path

import pytest

from metagpt_fast.devtools import cuda_attention as cuda
from metagpt_fast.devtools import sass

ROOT = Path(__file__).resolve().parents[1]
NVCC = cuda.find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None or cuda.find_cuobjdump(NVCC) is None, reason="nvcc or cuobjdump not found (set CUDA_HOME)"
)
# slow: nvcc compiles every kernel for two architectures (about a minute on 2 cores).
compiled = [pytest.mark.slow, needs_nvcc]

# Kernel roles whose rewrite (issue 17: ldmatrix fragment loads, cp.async multi-stage copies, swizzled shared tiles) is
# not committed yet, with the reason: their async_loads and lds_per_hmma gates are expected to fail (strictly: a pass
# is reported, so the entry is removed as soon as the new kernel lands). The mma.sync kernels they replaced loaded
# every fragment register with its own LDS.32 (3-3.8 LDS per HMMA) and copied tiles with LDG + STS; the forward
# (88f1cca) and the backward (80b8ccc) now pass both gates, so nothing is pending.
PENDING: dict[str, str] = {}
# Kernels compiled but launched on none of the parts the templates tell apart, with the reason (a documented
# allowance, as for spills). None: the old forward<T, 64> instantiated a narrow tile that no part launched (two wide
# D = 64 CTAs fit everywhere); the launch templates now alias the two where they are the same.
ALLOWED_UNLAUNCHED: set[str] = set()


@pytest.fixture(scope="module")
def report():
    rows, lines = cuda.stats_rows(ROOT, jobs=2, nvcc=NVCC)
    for line in lines:
        print(line)
    for row in rows:
        print("  " + cuda.format_row(row))
    return rows


def _gate(rows, gate):
    failures = cuda.gate_failures(rows, gate)
    assert not failures, "\n".join(failures)


def _slow(fn):
    for mark in compiled:
        fn = mark(fn)
    return fn


@_slow
def test_every_kernel_compiles_for_sm80_and_sm90(report):
    kernels = {r["kernel"] for r in report}
    for kernel in kernels:
        assert {r["arch"] for r in report if r["kernel"] == kernel} == set(cuda.ARCHS), kernel
    assert {r["role"] for r in report} == {"forward", "dkdv", "dq", "delta"}, sorted(kernels)
    assert {r["dtype"] for r in report} == {"fp16", "bf16"}
    _gate(report, "compile")


@_slow
def test_every_compiled_kernel_is_launched(report):
    """A kernel the launch templates never launch is dead code (or launched in a form the recorder cannot name)."""
    assert set(cuda.unlaunched(report)) <= ALLOWED_UNLAUNCHED


@_slow
def test_no_register_spills(report):
    _gate(report, "spills")
    assert all(r["registers"] <= 255 for r in report)


@_slow
def test_at_least_one_cta_per_sm(report):
    _gate(report, "fits")
    launched = [r for r in report if r["launched_on"]]
    assert launched and all(r["ctas_per_sm"] >= 1 for r in launched)


@_slow
def test_launch_shapes_fit_shared_memory(report):
    """Shared memory per CTA (static + dynamic) of each launch fits the per-block opt-in limit of each part that
    launches it: 1 KB below the part's shared memory per SM."""
    for row in report:
        for part in row["launched_on"]:
            assert row["smem_per_cta"] <= cuda.LAUNCH_PARTS[part] - cuda.RESERVED_SHARED_PER_CTA, (part, row["kernel"])


def _by_role():
    """One case per kernel role, expected to fail (strictly) while the role's rewrite is pending."""
    params = []
    for role in cuda.ASYNC_ROLES:
        marks = [pytest.mark.xfail(strict=True, reason=PENDING[role])] if role in PENDING else []
        params.append(pytest.param(role, marks=marks, id=role))
    return pytest.mark.parametrize("role", params)


@_slow
@_by_role()
def test_tiles_load_with_ldmatrix_and_cp_async(report, role):
    rows = [r for r in report if r["role"] == role]
    assert rows
    _gate(rows, "async_loads")


@_slow
@_by_role()
def test_shared_loads_per_hmma_within_limit(report, role):
    rows = [r for r in report if r["role"] == role]
    assert rows
    _gate(rows, "lds_per_hmma")


# ----------------------------------------------------------------------------------------------------------------
# the gates and the figures on canned input (no compiler)

GOOD = {
    "kernel": "attention_forward_kernel<__half,ForwardTile<128,128,64,8>>", "arch": 80, "role": "forward",
    "dtype": "fp16", "registers": 200, "stack": 0, "spill_stores": 0, "spill_loads": 0, "spill_bytes": 0,
    "threads": 256, "smem_per_cta": 98304, "ctas_per_sm": 1, "occupancy_limit": "registers", "launched_on": ["x"],
    "opcodes": {"HMMA": 128, "LDS": 8, "LDSM": 112, "LDGSTS": 64, "LDG": 4, "STS": 16},
    "lds_per_hmma": 0.938, "loop_lds_per_hmma": 0.875,
}  # fmt: skip


@pytest.mark.parametrize(
    ("gate", "bad"),
    [
        ("compile", {"error": "no SASS for this kernel"}),
        ("spills", {"spill_stores": 8, "spill_loads": 8, "spill_bytes": 16}),
        ("spills", {"stack": 16, "spill_bytes": 16}),
        ("fits", {"ctas_per_sm": 0, "occupancy_limit": "shared"}),
        ("async_loads", {"opcodes": {**GOOD["opcodes"], "LDSM": 0}}),
        ("async_loads", {"opcodes": {**GOOD["opcodes"], "LDGSTS": 0}}),
        ("async_loads", {"role": "dq", "opcodes": {**GOOD["opcodes"], "LDGSTS": 0}}),
        ("lds_per_hmma", {"lds_per_hmma": 1.51}),
        ("lds_per_hmma", {"loop_lds_per_hmma": 1.51}),
        ("lds_per_hmma", {"role": "dkdv", "loop_lds_per_hmma": 1.76}),
        ("lds_per_hmma", {"role": "dq", "lds_per_hmma": 3.0}),
        ("lds_per_hmma", {"loop_lds_per_hmma": None}),  # no HMMA in any loop
        ("lds_per_hmma", {"lds_per_hmma": None, "loop_lds_per_hmma": None}),  # no HMMA at all
    ],
)
def test_gates_fail_bad_rows_and_pass_good_ones(gate, bad):
    assert cuda.gate_failures([GOOD], gate) == []
    [failure] = cuda.gate_failures([{**GOOD, **bad}], gate)
    assert failure.startswith("sm_80 attention_forward_kernel<")


@pytest.mark.parametrize(
    ("gate", "exempt"),
    [
        ("fits", {"ctas_per_sm": None, "launched_on": []}),  # never launched: test_every_compiled_kernel_is_launched
        ("async_loads", {"role": "delta", "opcodes": {**GOOD["opcodes"], "LDSM": 0, "LDGSTS": 0}}),
        ("lds_per_hmma", {"lds_per_hmma": 1.5, "loop_lds_per_hmma": 1.5}),  # exactly at the forward's limit
        ("lds_per_hmma", {"role": "dkdv", "lds_per_hmma": 1.75, "loop_lds_per_hmma": 1.6}),
        ("lds_per_hmma", {"role": "delta", "lds_per_hmma": None, "loop_lds_per_hmma": None}),
        ("spills", {"error": "no SASS for this kernel", "spill_bytes": None}),  # the compile gate reports it
    ],
)
def test_gates_leave_out_what_they_do_not_cover(gate, exempt):
    assert cuda.gate_failures([{**GOOD, **exempt}], gate) == []


@pytest.mark.parametrize(
    ("arch", "registers", "threads", "smem", "expected"),
    [
        (80, 246, 256, 69632, (1, "registers")),  # 248 x 32 x 8 warps = 63488 of 65536
        (80, 246, 128, 52224, (2, "registers")),
        (90, 128, 256, 69632, (2, "registers")),  # 4096 per warp: 16 warps, 2 CTAs of 8
        (90, 64, 256, 69632, (3, "shared")),  # 233472 // (69632 + 1024) = 3; registers allow 4
        (80, 64, 256, 69632, (2, "shared")),  # 167936 // 70656 = 2
        (90, 46, 128, 0, (10, "registers")),  # 48 x 32 = 1536 per warp: 42 warps, 10 CTAs of 4
        (90, 16, 32, 0, (32, "ctas")),
        (90, 16, 1024, 0, (2, "threads")),
        (80, 255, 256, 0, (1, "registers")),
        (80, 64, 128, 166912, (1, "shared")),  # exactly the per-SM capacity with the reserved KB
        (80, 64, 128, 166913, (0, "shared")),
    ],
)
def test_ctas_per_sm(arch, registers, threads, smem, expected):
    assert cuda.ctas_per_sm(arch, registers, threads, smem) == expected


def test_roles_and_dtypes_from_symbols():
    assert cuda.role_of("attention_backward_dkdv_kernel<__half,DkdvTile<64,32,64,4>>") == "dkdv"
    assert cuda.role_of("attention_backward_dq_kernel<__half,DqTile<64,64,64,4>>") == "dq"
    assert cuda.role_of("attention_backward_delta_kernel<__nv_bfloat16>") == "delta"
    assert cuda.role_of("_ZN12metagpt_fast9attention24attention_forward_kernelI6__halfEEvv") == "forward"
    assert cuda.role_of("softmax_kernel") is None
    assert cuda.dtype_of("attention_forward_kernel<__nv_bfloat16,X>") == "bf16"
    assert cuda.dtype_of("attention_forward_kernel<__half,X>") == "fp16"


def test_launch_lines_parsed():
    out = "launch _Z1kv 256 69632\nsomething else\nlaunch _Z1dv 128 0\n"
    assert cuda.parse_launches(out) == [("_Z1kv", 256, 69632), ("_Z1dv", 128, 0)]


# A kernel whose HMMA sit in a loop (0x40-0xa0) that holds a tile-copy loop of its own (0x50-0x70): the innermost
# loop has no HMMA, so the main loop is the enclosing one. A loop after it without HMMA is not taken.
_SASS = """
	code for sm_80
		Function : _Z6kernelv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0040*/                   LDSM.16.M88.4 R4, [R2] ;
        /*0050*/                   LDG.E.128 R8, [R6.64] ;
        /*0060*/                   STS.128 [R3], R8 ;
        /*0070*/              @P0  BRA 0x50 ;
        /*0080*/                   HMMA.16816.F32 R12, R4, R10, R12 ;
        /*0090*/                   LDS R5, [R3] ;
        /*00a0*/              @P1  BRA 0x40 ;
        /*00b0*/                   LDS R5, [R3] ;
        /*00c0*/              @P2  BRA 0xb0 ;
        /*00d0*/                   EXIT ;
"""


def test_main_loop_is_the_innermost_loop_with_hmma():
    [listing] = sass.listings(_SASS).values()
    loop = cuda.matmul_loop(listing)
    assert (loop.start, loop.end) == (0x40, 0xA0)
    row = cuda.kernel_row(80, "_Z6kernelv", "attention_forward_kernel<__half,T>", None, listing, None)
    assert row["opcodes"]["HMMA"] == 1 and row["opcodes"]["LDS"] == 2 and row["opcodes"]["LDSM"] == 1
    assert row["lds_per_hmma"] == 3.0 and row["loop_lds_per_hmma"] == 2.0 and row["loop_instructions"] == 7
    assert row["ctas_per_sm"] is None and cuda.gate_failures([row], "fits") == []


def _stats_script():
    spec = importlib.util.spec_from_file_location("cuda_sass_stats", ROOT / "scripts" / "cuda_sass_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("bad", "status"), [({}, 0), ({"spill_bytes": 8, "spill_stores": 8}, 1)])
def test_stats_script_prints_json_rows_and_fails_on_a_gate(bad, status):
    """scripts/cuda_sass_stats.py: one JSON row per kernel and arch on stdout, the table and the gates on stderr,
    exit status 1 while a gate fails."""
    row = {**GOOD, "symbol": "_Z1kv", "static_smem": 0, "threads": 256, "dynamic_smem": 98304, "loop_instructions": 900,
           "loop_opcodes": GOOD["opcodes"], **bad}  # fmt: skip
    out, err = io.StringIO(), io.StringIO()
    assert _stats_script().report([row], ["x.cu: compiled"], out, err) == status
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [row]
    assert "x.cu: compiled" in err.getvalue() and f"spills {status}" in err.getvalue()
    assert "sm_80 attention_forward_kernel<__half,ForwardTile<128,128,64,8>>: 200 regs" in err.getvalue()
