"""The CUDA attention kernels compile for sm_80 and sm_90 without register spills (no GPU needed).

Each csrc/attention/*.cu is compiled with nvcc for both architectures (``-Xptxas -v``); the test prints registers,
shared memory and spill bytes per kernel and fails on a compile error or any spill. Dynamic shared memory per launch
(what the launch templates request, per head dim and architecture) comes from the launch templates themselves,
compiled on the host with a launcher that records instead of launching. Skipped when nvcc is missing.
"""

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from metagpt_fast.devtools import sass

ROOT = Path(__file__).resolve().parents[1]
ATTENTION = ROOT / "csrc" / "attention"
INCLUDE = ROOT / "csrc" / "include"
ARCHS = (80, 90)
# Shared memory per SM (bytes) of the parts the launch templates distinguish.
SHARED_PER_SM = {"sm_80 (A100)": 167936, "sm_86/89 (100 KB)": 102400, "sm_90 (H100/H200)": 233472}


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


NVCC = _nvcc()
# slow: nvcc compiles every kernel for two architectures (over a minute on 2 cores).
pytestmark = [pytest.mark.slow, pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)")]


def _demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = [re.sub(r"metagpt_fast::attention::|\(.*\)$|void ", "", s) for s in out]
    return dict(zip(names, short, strict=True))


def _compile(source: Path) -> tuple[Path, str, float]:
    import time

    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.run(
            [
                NVCC,
                "-std=c++17",
                "-O3",
                f"-I{INCLUDE}",
                *gencode,
                "-Xptxas",
                "-v",
                "-c",
                str(source),
                "-o",
                os.path.join(tmp, "kernel.o"),
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        elapsed = time.perf_counter() - start
    assert proc.returncode == 0, f"{source.name} failed to compile:\n{proc.stderr[-4000:]}"
    return source, proc.stderr, elapsed


def _parse(ptxas: str) -> list[dict]:
    return [
        dict(kernel=k.function, arch=int(k.arch.removeprefix("sm_")), registers=k.registers, static_smem=k.shared,
             stack=k.stack, spill_stores=k.spill_stores, spill_loads=k.spill_loads)
        for k in sass.parse_ptxas(ptxas)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def ptxas_report():
    sources = sorted(ATTENTION.glob("*.cu"))
    assert sources, "no .cu files under csrc/attention"
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_compile, sources))
    rows = []
    for source, log, elapsed in results:
        print(f"{source.name}: compiled for sm_{', sm_'.join(map(str, ARCHS))} in {elapsed:.0f} s")
        rows += _parse(log)
    names = _demangle(sorted({r["kernel"] for r in rows}))
    for r in sorted(rows, key=lambda r: (names[r["kernel"]], r["arch"])):
        print(
            f"  sm_{r['arch']} {names[r['kernel']]}: {r.get('registers')} registers, {r.get('static_smem')} B static "
            f"smem, {r.get('stack')} B stack, {r.get('spill_stores')} / {r.get('spill_loads')} B spill stores / loads"
        )
    return rows


def test_every_kernel_compiles_for_sm80_and_sm90(ptxas_report):
    kernels = {r["kernel"] for r in ptxas_report}
    for kernel in kernels:
        assert {r["arch"] for r in ptxas_report if r["kernel"] == kernel} == set(ARCHS), kernel
    for family in (
        "attention_forward_kernel",
        "attention_backward_dkdv_kernel",
        "attention_backward_dq_kernel",
        "attention_backward_delta_kernel",
    ):
        assert any(family in k for k in kernels), f"no {family} instantiated"
    # {fp16, bf16} x {64, 128} x {wide, narrow} forward tiles, {fp16, bf16} x {64, 128} dK/dV and dQ, 2 delta.
    assert len(kernels) == 8 + 4 + 4 + 2


def test_no_register_spills(ptxas_report):
    spilling = [r for r in ptxas_report if r["stack"] or r["spill_stores"] or r["spill_loads"]]
    assert not spilling, spilling
    assert all(r["registers"] <= 255 for r in ptxas_report)


_SHAPES_PROGRAM = r"""
#include <cstdio>
#include <typeinfo>
#include "attention_launch.cuh"
using namespace metagpt_fast::attention;
struct Record {
  const char* what;
  template <typename Kernel>
  int operator()(Kernel, const LaunchShape& s, const AttentionParams& p) const {
    std::printf("%s D=%d: %d threads, %d B dynamic shared memory\n", what, p.head_dim, s.threads, s.shared_bytes);
    return 0;
  }
};
int main(int argc, char** argv) {
  AttentionParams p;
  p.batch = p.heads_q = p.heads_k = 1;
  p.n_q = p.n_k = 128;
  p.shared_memory_per_sm = std::atoi(argv[1]);
  for (int d : {64, 128}) {
    p.head_dim = d;
    forward_any_head_dim<__half>(p, Record{"forward"});
    backward_any_head_dim<__half>(p, Record{"backward (delta, dK/dV, dQ)"});
  }
}
"""


def test_launch_shapes_fit_shared_memory():
    """Prints the shared memory each launch requests per architecture and checks it fits the per-block limit."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    cuda_include = Path(NVCC).resolve().parent.parent / "include"
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "shapes.cc", Path(tmp) / "shapes"
        src.write_text(_SHAPES_PROGRAM)
        subprocess.run(
            [
                cxx,
                "-std=c++17",
                "-O0",
                "-DMGF_ATTENTION_EMULATION",
                f"-I{ATTENTION}",
                f"-I{INCLUDE}",
                f"-I{cuda_include}",
                str(src),
                "-o",
                str(exe),
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
        for part, smem in SHARED_PER_SM.items():
            out = subprocess.run([str(exe), str(smem)], check=True, capture_output=True, text=True).stdout
            print(f"{part}:\n  " + out.strip().replace("\n", "\n  "))
            requested = [int(b) for b in re.findall(r"(\d+) B dynamic", out)]
            # Per-block opt-in limit is 1 KB below the per-SM capacity on these parts.
            assert requested and max(requested) <= smem - 1024, (part, requested)
