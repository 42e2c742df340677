"""The CPU emulation of the CUDA warp primitives (csrc/attention/attention_emulation.h) against the PTX semantics, and
proof that it catches what a GPU would: a removed barrier or cp.async wait makes results wrong or aborts.

csrc/attention/emulation_selftest.cc holds small test-only kernels written against warp_primitives.cuh; it is built
with the host compiler and -DMGF_ATTENTION_EMULATION (C++20) and driven through ctypes. Kernels the emulation must
refuse abort the process with an "emulation: ..." message, so those run in a subprocess. The slow tests rebuild the
self-test kernels, and the real attention kernels (attention_emulation.cc), with one block_sync() or cp.async wait
removed by the emulation's test hooks (-DMGF_EMULATION_DROP_SYNC_LINE / _WAIT_LINE) and check they fail for some
schedule seed, while the unmodified build passes for every seed. Skipped without a compiler or the CUDA headers.
"""

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ATTENTION = ROOT / "csrc" / "attention"
SEEDS = (1, 2, 3, 4, 5, 6, 7, 8)


def _build(tmp_dir: Path, source: Path, name: str, defines: tuple[str, ...] = ()) -> Path:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    cuda_home = Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")
    if cxx is None or not (cuda_home / "include" / "cuda_fp16.h").exists():
        pytest.skip("needs a host C++ compiler and the CUDA headers (cuda_fp16.h) to run the emulation")
    library = tmp_dir / f"{name}.so"
    proc = subprocess.run(
        [cxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-DMGF_ATTENTION_EMULATION", *(f"-D{d}" for d in defines),
         f"-I{ATTENTION}", f"-I{ROOT / 'csrc' / 'include'}", f"-I{cuda_home / 'include'}", str(source),
         "-o", str(library)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"{source.name} failed to compile:\n{proc.stderr[-4000:]}"
    return library


@pytest.fixture(scope="module")
def selftest_path(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("emulator"), ATTENTION / "emulation_selftest.cc", "selftest")


@pytest.fixture(scope="module")
def selftest(selftest_path):
    lib = ctypes.CDLL(str(selftest_path))
    lib.mgf_selftest_set_seed.argtypes = [ctypes.c_uint64]
    lib.mgf_selftest_fast_exp2.argtypes = [ctypes.c_float]
    lib.mgf_selftest_fast_exp2.restype = ctypes.c_float
    return lib


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _source_line(path: Path, marker: str) -> int:
    """The 1-based line of ``path`` that contains ``marker`` (exactly one)."""
    lines = [i for i, line in enumerate(path.read_text().splitlines(), 1) if marker in line]
    assert len(lines) == 1, (path.name, marker, lines)
    return lines[0]


# Runs ``body`` (Python source using ``lib``) in a fresh interpreter, so an emulation abort cannot take pytest down.
_ISOLATED = """
import ctypes, json, sys
lib = ctypes.CDLL(sys.argv[1])
{body}
"""


def _isolated(library: Path, body: str, timeout: int = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    code = _ISOLATED.format(body=textwrap.dedent(body))
    env = dict(os.environ, **(env or {}), PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    return subprocess.run([sys.executable, "-c", code, str(library)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)  # fmt: skip


# ------------------------------------------------------------------------------------------------------ semantics


def _expected_ldmatrix(num: int, trans: bool) -> list[list[int]]:
    """PTX ldmatrix .x<num>[.trans] over the tile of (r << 8) | c, with the selftest's quadrant row addresses: matrix
    i starts at row 8 (i % 2), column 8 (i // 2)."""
    tile = [[(r << 8) | c for c in range(16)] for r in range(16)]
    out = []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        regs = []
        for i in range(num):
            r0, c0 = 8 * (i % 2), 8 * (i // 2)
            if trans:
                lo, hi = tile[r0 + 2 * t][c0 + g], tile[r0 + 2 * t + 1][c0 + g]
            else:
                lo, hi = tile[r0 + g][c0 + 2 * t], tile[r0 + g][c0 + 2 * t + 1]
            regs.append(lo | (hi << 16))
        out.append(regs)
    return out


def test_ldmatrix_follows_the_ptx_fragment_layout(selftest):
    """x1/x2/x4 and .trans give every lane the elements PTX specifies (x1/x2 ignore lanes 8-31/16-31's addresses,
    which are misaligned and outside shared memory), and x4 / x2 / x2.trans equal the mma A and B fragments that
    load_a / load_b build from the same tile (the layout documented in warp_primitives.cuh)."""
    out = (ctypes.c_uint32 * (5 * 32 * 4))()
    mismatches = (ctypes.c_int * 3)()
    assert selftest.mgf_selftest_ldmatrix(out, mismatches) == 0
    for v, (num, trans) in enumerate([(1, False), (2, False), (4, False), (2, True), (4, True)]):
        got = [[out[(v * 32 + lane) * 4 + i] for i in range(num)] for lane in range(32)]
        assert got == _expected_ldmatrix(num, trans), f"ldmatrix x{num}{'.trans' if trans else ''}"
    assert list(mismatches) == [0, 0, 0], "ldmatrix x4 / x2 / x2.trans against load_a / load_b (n-major / k-major)"


def test_cp_async_lands_only_at_the_wait_that_retires_its_group(selftest):
    src = torch.randint(0, 255, (2, 64, 16), dtype=torch.uint8)
    out = torch.zeros(64, 5, 3, 16, dtype=torch.uint8)
    assert selftest.mgf_selftest_cp_async(_ptr(src), _ptr(out)) == 0
    fill, zero = torch.full((16,), 0xFF, dtype=torch.uint8), torch.zeros(16, dtype=torch.uint8)
    for tid in range(64):
        row0, row1 = src[0, tid], src[1, tid]
        seen = out[tid]
        expected = [
            (fill, fill, fill),  # issued and committed, not waited for: shared memory still holds the 0xff fill
            (row0, fill, fill),  # wait<1>: group 0 landed, group 1 (the newest) pending
            (row0, row1, fill),  # wait<0>: both groups; the uncommitted zero-fill copy is not waited for
            (row0, row1, zero),  # wait_all: everything, the !valid copy zero-filled
        ]
        for point, rows in enumerate(expected):
            for r in range(3):
                assert torch.equal(seen[point, r], rows[r]), (tid, point, r)
        other = tid ^ 32  # another warp's rows, after its wait_all and a block_sync
        for r, rows in enumerate((src[0, other], src[1, other], zero)):
            assert torch.equal(seen[4, r], rows), (tid, "other warp", r)


def test_a_missing_barrier_gives_wrong_results_for_some_seed(selftest):
    """Two warps read each other's plain shared-memory stores: with the block_sync() every seed is right; without it
    the seeded schedule makes some seeds read the 0xff fill (NaN), not all. The same seed gives the same schedule."""
    expected = torch.tensor([float((tid ^ 32) + 1) for tid in range(64)])

    def run(with_barrier, seed):
        out = torch.zeros(64)
        selftest.mgf_selftest_set_seed(seed)
        assert selftest.mgf_selftest_barrier(with_barrier, _ptr(out)) == 0
        return out

    seeds = range(1, 17)
    for seed in seeds:
        assert torch.equal(run(1, seed), expected), seed
    without = {seed: run(0, seed) for seed in seeds}
    wrong = [seed for seed, out in without.items() if not torch.equal(out, expected)]
    assert wrong, "no seed caught the missing barrier"
    assert len(wrong) < len(seeds), "every seed failed: the schedule is not what varies"
    torch.testing.assert_close(run(0, wrong[0]), without[wrong[0]], rtol=0, atol=0, equal_nan=True)


def test_lanes_see_each_other_only_after_warp_sync(selftest):
    """Each lane reads its neighbour's plain shared-memory store: right after warp_sync() for every seed; without it
    some lane always runs before its neighbour (the lane order is a rotation), and reads the 0xff fill."""
    expected = torch.tensor([float((lane + 1) % 32 + 1) for lane in range(32)])
    for seed in SEEDS[:4]:
        for with_sync in (1, 0):
            out = torch.zeros(32)
            selftest.mgf_selftest_set_seed(seed)
            assert selftest.mgf_selftest_warp_sync(with_sync, _ptr(out)) == 0
            assert torch.equal(out, expected) == bool(with_sync), (seed, with_sync, out)


def test_plain_stores_read_by_another_warps_ldmatrix_need_a_barrier(selftest, selftest_path):
    """Each of two warps stores a tile with plain stores and ldmatrix-reads the other's: right after a block_sync();
    without it the race detector aborts, naming both warps, whatever the seed."""
    out = torch.zeros(64)
    assert selftest.mgf_selftest_plain_store(1, _ptr(out)) == 0
    assert torch.equal(out, torch.tensor([float(4 * (lane // 4) * 4 + 2 * (lane % 4) + 1) for lane in range(32)] * 2))
    for seed in SEEDS[:3]:
        proc = _isolated(
            selftest_path,
            f"""
            lib.mgf_selftest_set_seed.argtypes = [ctypes.c_uint64]
            lib.mgf_selftest_set_seed({seed})
            lib.mgf_selftest_plain_store(0, (ctypes.c_float * 64)())
            """,
        )
        assert proc.returncode != 0 and "stored to it with no block_sync() in between" in proc.stderr, proc.stderr


def _pipeline_inputs(k: int):
    gen = torch.Generator().manual_seed(k)
    a = torch.randn(64, k, generator=gen).half()
    b = torch.randn(k, 32, generator=gen).half()
    return a, b, a.float() @ b.float()


@pytest.mark.parametrize("k", [72, 96])  # 72: the last K tile is 8 of 32 columns, the rest zero-filled
def test_cp_async_pipeline_with_ldmatrix_and_mma_matches_matmul(selftest, k):
    a, b, reference = _pipeline_inputs(k)
    for seed in SEEDS[:4]:
        c = torch.full((64, 32), float("nan"))
        selftest.mgf_selftest_set_seed(seed)
        assert selftest.mgf_selftest_pipeline(_ptr(a), _ptr(b), _ptr(c), k) == 0
        # Products of fp16 values are exact in fp32; only the order of the fp32 sums differs from torch's.
        torch.testing.assert_close(c, reference, rtol=1e-5, atol=1e-4, msg=f"seed {seed}")


def test_fast_exp2_is_exp2_with_denormals_flushed(selftest):
    for x in (0.0, 1.0, -3.5, 10.25, -126.0):
        assert selftest.mgf_selftest_fast_exp2(x) == pytest.approx(2.0**x, rel=1e-6)
    assert selftest.mgf_selftest_fast_exp2(-130.0) == 0.0  # 2^-130 is denormal: flushed
    assert selftest.mgf_selftest_fast_exp2(float("-inf")) == 0.0
    assert selftest.mgf_selftest_fast_exp2(float("inf")) == float("inf")


@pytest.mark.parametrize(
    "which,message",
    [
        (0, "ldmatrix in warp 0 of block (0, 0, 0): lane 0's row address"),
        (1, "finished with 1 cp.async copies never retired by a cp_async_wait"),
        (2, "lanes 0 and 1 reached different warp-collective operations"),
        (3, "is not 16 aligned bytes of the block's shared memory"),
    ],
    ids=["ldmatrix-misaligned", "cp-async-never-waited", "divergent-collective", "cp-async-to-global"],
)
def test_the_emulation_aborts_on_what_the_hardware_forbids(selftest_path, which, message):
    proc = _isolated(
        selftest_path,
        f"""
        buf = (ctypes.c_uint8 * 4096)()
        src = ctypes.addressof(buf) + (-ctypes.addressof(buf)) % 16
        lib.mgf_selftest_error({which}, ctypes.c_void_p(src))
        """,
    )
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr


# -------------------------------------------------------------- removing a wait or a barrier must fail (slow)

# Zero inputs: the race detector aborts whatever the data (no torch import: the subprocess starts in milliseconds).
_PIPELINE_SEED = """
lib.mgf_selftest_set_seed.argtypes = [ctypes.c_uint64]
lib.mgf_selftest_set_seed({seed})
a, b, c = (ctypes.c_uint16 * (64 * 96))(), (ctypes.c_uint16 * (96 * 32))(), (ctypes.c_float * (64 * 32))()
lib.mgf_selftest_pipeline(a, b, c, 96)
"""


@pytest.mark.slow  # a build of the self-test kernels with a line removed at compile time
@pytest.mark.parametrize(
    "kind,marker,caught,hook",
    [
        ("WAIT", "PIPELINE_WAIT", "while thread", "define"),  # ldmatrix of bytes whose copy is still pending
        ("SYNC", "PIPELINE_SYNC_AFTER_WAIT", "shared-memory race", "environment"),  # another warp's copy, same epoch
        ("SYNC", "PIPELINE_SYNC_BEFORE_REFILL", "shared-memory race", "environment"),  # refill of a buffer being read
    ],
    ids=["no-wait", "no-barrier-after-wait", "no-barrier-before-refill"],
)
def test_selftest_pipeline_without_one_wait_or_barrier_fails(tmp_path, selftest_path, kind, marker, caught, hook):
    """The cp.async + ldmatrix pipeline with one wait or block_sync() removed (by the compile-time hook, or the same
    hook set in the environment) aborts with the race detector's message, whatever the seed: the detector does not
    depend on the schedule. The unmodified build passes every seed (the quick test above)."""
    line = _source_line(ATTENTION / "emulation_selftest.cc", marker)
    drop = f"MGF_EMULATION_DROP_{kind}_LINE"
    if hook == "define":
        library, env = _build(tmp_path, ATTENTION / "emulation_selftest.cc", "dropped", (f"{drop}={line}",)), {}
    else:
        library, env = selftest_path, {drop: str(line), "MGF_EMULATION_DROP_FILE": "emulation_selftest.cc"}
    for seed in SEEDS[:3]:
        proc = _isolated(library, _PIPELINE_SEED.format(seed=seed), env=env)
        assert proc.returncode != 0 and caught in proc.stderr, (seed, proc.stdout, proc.stderr[-2000:])
    # The same hook naming another file removes nothing.
    if hook == "environment":
        proc = _isolated(library, _PIPELINE_SEED.format(seed=1), env=dict(env, MGF_EMULATION_DROP_FILE="other.cc"))
        assert proc.returncode == 0, proc.stderr[-2000:]


# The real attention kernels, forward and backward, for several schedule seeds, compared with the reference through
# test_attention's helpers (the ctypes signature of the emulation library lives there).
ATTENTION_SEEDS = SEEDS[:3]


def attention_seed_results(lib, seeds) -> dict[int, bool]:
    """Per schedule seed, whether the kernels match the reference (test_attention's parity checks) on two cases:
    forward and backward with several key tiles per query block and several query blocks; and a forward whose first
    query blocks visit no key tile (bottom-right causal with Nq >> Nk: out 0, lse +inf; their Q copies are still
    pending at the epilogue)."""
    import math

    import test_attention as ta

    lib.mgf_emulation_set_seed.argtypes = [ctypes.c_uint64]
    torch.manual_seed(0)
    q, k, v = ta._make_inputs(1, 1, 1, 150, 150, 64, torch.float16, "cpu", transposed=False)
    grad_out = torch.randn(1, 1, 150, 64).to(torch.float16)
    scale = 1.0 / math.sqrt(64)
    reference = ta._references(q, k, v, None, 0.0, False, scale, grad_out, None)
    window = (-1, 0, 1)
    wq, wk, wv = ta._make_inputs(1, 1, 1, 300, 40, 64, torch.float16, "cpu")
    window_ref = ta._flash_reference(wq, wk, wv, scale, window, 0.0)
    window_oracle = ta._flash_reference(wq.double(), wk.double(), wv.double(), scale, window, 0.0)
    empty = torch.isinf(window_oracle[1])
    results = {}
    for seed in seeds:
        lib.mgf_emulation_set_seed(seed)
        *fast, _ = ta.emulated_forward_backward(lib, q, k, v, None, 0.0, False, scale, ta.SEED, grad_out, ta.SM90)
        out, lse = ta.emulated_forward(lib, wq, wk, wv, None, 0.0, False, scale, ta.SEED, ta.SM90, window=window)
        try:
            ta._check_parity(fast, reference, f"seed {seed}")
            ta.assert_parity(out, window_ref[0], window_oracle[0], name=f"seed {seed} window out")
            assert not out[empty].any() and torch.equal(torch.isinf(lse), empty), f"seed {seed}: rows with no key"
            results[seed] = True
        except AssertionError:
            results[seed] = False
        print(json.dumps([seed, results[seed]]), flush=True)
    return results


# The kernels whose every barrier and wait must be necessary (the launch templates' kernels with a pipeline).
KERNELS = ("attention_forward_kernel", "attention_backward_dkdv_kernel", "attention_backward_dq_kernel")


def _kernel_body(name: str) -> tuple[Path, list[str]]:
    """The header (included by attention_launch.cuh) that defines kernel ``name``, and its lines, blank outside the
    kernel."""
    launch = (ATTENTION / "attention_launch.cuh").read_text()
    for header in re.findall(r'#include "(\w+\.cuh)"', launch):
        lines = (ATTENTION / header).read_text().splitlines()
        starts = [i for i, line in enumerate(lines) if re.search(rf"MGF_KERNEL .*\b{name}\(", line)]
        if starts:
            end = next(i for i in range(starts[0], len(lines)) if lines[i] == "}")
            return ATTENTION / header, [line if starts[0] <= i <= end else "" for i, line in enumerate(lines)]
    raise AssertionError(f"no {name} in the headers attention_launch.cuh includes")


def _drop_targets():
    """(kernel, kind, line) of every block_sync() and every cp_async_wait<N>() of KERNELS, as pytest params."""
    params = []
    for kernel in KERNELS:
        path, body = _kernel_body(kernel)
        for kind, call in (("SYNC", "block_sync()"), ("WAIT", "cp_async_wait<")):
            lines = [i for i, line in enumerate(body, 1) if call in line.split("//")[0]]
            params += [pytest.param(kernel, kind, line, id=f"{kind}-{path.name}:{line}") for line in lines]
    return params


@pytest.fixture(scope="module")
def attention_library(tmp_path_factory):
    """The attention emulation, checked to match the reference for every seed (so the failures below come from the
    removed line, and the kernels are race-free under these schedules). Lines are removed at run time (the
    environment's hooks), so this one build serves every removed line."""
    library = _build(tmp_path_factory.mktemp("attention_emulation"), ATTENTION / "attention_emulation.cc", "attention")
    results = attention_seed_results(ctypes.CDLL(str(library)), ATTENTION_SEEDS)
    assert all(results.values()), f"the unmodified attention emulation fails for some seed: {results}"
    return library


# One interpreter imports torch and the test helpers once (most of the cost), then runs each library in a forked
# child, so an emulation abort ends only that child. One torch thread: forking is safe with no thread pool.
_ATTENTION_FORKED = """
import ctypes, json, os, sys
import torch
torch.set_num_threads(1)
from test_cuda_emulator import attention_seed_results
library, hooks, seeds, directory = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
for i, hook in enumerate(hooks):
    out, err = (os.open(os.path.join(directory, f"{i}.{s}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC) for s in "oe")
    pid = os.fork()
    if pid == 0:
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.environ.update(hook)  # read by the library at its first barrier or wait
        code = 1
        try:
            attention_seed_results(ctypes.CDLL(library), seeds)
            code = 0
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.waitpid(pid, 0)
"""


@pytest.fixture(scope="module")
def dropped_outcomes(attention_library, tmp_path_factory):
    """(stdout, stderr) of the forward + backward runs with each drop target removed, by (kind, line, file)."""
    directory = tmp_path_factory.mktemp("dropped_runs")
    keys, hooks = [], []
    for target in _drop_targets():
        kernel, kind, line = target.values
        path, _ = _kernel_body(kernel)
        keys.append((kind, line, path.name))
        hooks.append({f"MGF_EMULATION_DROP_{kind}_LINE": str(line), "MGF_EMULATION_DROP_FILE": path.name})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    argv = [sys.executable, "-c", _ATTENTION_FORKED, str(attention_library), json.dumps(hooks),
            json.dumps(list(ATTENTION_SEEDS)), str(directory)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {key: ((directory / f"{i}.o").read_text(), (directory / f"{i}.e").read_text()) for i, key in enumerate(keys)}


@pytest.mark.slow  # builds the attention emulation, runs it with each line removed in turn
@pytest.mark.parametrize("kernel,kind,line", _drop_targets())
def test_real_kernel_without_one_barrier_or_wait_fails(dropped_outcomes, kernel, kind, line):
    """With one block_sync() or cp.async wait of a forward or backward kernel removed, some seed fails: wrong results,
    or an emulation abort (the race detector, a copy never retired)."""
    path, body = _kernel_body(kernel)
    stdout, stderr = dropped_outcomes[kind, line, path.name]
    results = {json.loads(x)[0]: json.loads(x)[1] for x in stdout.splitlines() if x.startswith("[")}
    aborted = "emulation: " in stderr
    completed = len(results) == len(ATTENTION_SEEDS)
    assert aborted or (completed and not all(results.values())), (
        f"{path.name}:{line} ({body[line - 1].strip()}) removed, yet every seed matched the reference: {results} "
        f"{stderr[-2000:]}"
    )
    print(f"{path.name}:{line} removed:", stderr.strip().splitlines()[0] if aborted else f"results {results}")


# ------------------------------------------------------------------------------------------ the device side (nvcc)

_DEVICE_PRIMITIVES = r"""
#include "warp_primitives.cuh"
using namespace metagpt_fast::attention;
__global__ void primitives(const __half* g, float* out, int n) {
  __shared__ __align__(16) __half s[32 * 8 * 2];
  const int l = threadIdx.x;
  cp_async_16(s + l * 8, g + l * 8, l < n);
  cp_async_commit();
  cp_async_16(s + 256 + l * 8, g + 256 + l * 8, true);
  cp_async_commit();
  cp_async_wait<1>();
  cp_async_wait_all();
  block_sync();
  warp_sync();
  uint32_t a1[1], a2[2], a4[4], t2[2], t4[4];
  ldmatrix_x1(a1, s + (l % 8) * 8);
  ldmatrix_x2(a2, s + (l % 16) * 8);
  ldmatrix_x4(a4, s + l * 8);
  ldmatrix_x2_trans(t2, s + (l % 16) * 8);
  ldmatrix_x4_trans(t4, s + l * 8);
  float c[4] = {0, 0, 0, 0};
  const uint32_t b[2] = {a2[0], t2[1]};
  mma_16816<__half>(c, a4, b);
  mma_16816<__half>(c, t4, b);
  out[l] = fast_exp2(c[0] + c[1] + c[2] + c[3] + a1[0]);
}
"""


@pytest.mark.slow  # nvcc
def test_device_primitives_compile_to_the_ptx_instructions(tmp_path):
    """The device side of every primitive compiles for sm_80 and sm_90 and emits the PTX instruction it names."""
    nvcc = Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda") / "bin" / "nvcc"
    if not nvcc.exists():
        pytest.skip("nvcc not found (set CUDA_HOME)")
    source = tmp_path / "primitives.cu"
    source.write_text(_DEVICE_PRIMITIVES)
    for arch in (80, 90):
        proc = subprocess.run(
            [str(nvcc), "-std=c++17", "-O3", f"-arch=sm_{arch}", f"-I{ATTENTION}", f"-I{ROOT / 'csrc' / 'include'}",
             "-ptx", str(source), "-o", str(tmp_path / f"sm_{arch}.ptx")],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        ptx = (tmp_path / f"sm_{arch}.ptx").read_text()
        for instruction in (
            "cp.async.cg.shared.global",
            "cp.async.commit_group",
            "cp.async.wait_group 1",
            "cp.async.wait_all",
            "ldmatrix.sync.aligned.m8n8.x1.shared.b16",
            "ldmatrix.sync.aligned.m8n8.x2.shared.b16",
            "ldmatrix.sync.aligned.m8n8.x4.shared.b16",
            "ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16",
            "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16",
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
            "ex2.approx.ftz.f32",
            "bar.warp.sync",
        ):
            assert instruction in ptx, (arch, instruction)
