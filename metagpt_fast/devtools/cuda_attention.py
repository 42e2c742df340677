"""Static figures and gates of the CUDA attention kernels (csrc/attention/*.cu) for sm_80 and sm_90, without a GPU.

Each ``.cu`` file is compiled by nvcc for both architectures (``-Xptxas -v``: registers, spills, static shared
memory); the object's SASS (``cuobjdump -sass``, read by :mod:`metagpt_fast.devtools.sass`) gives each kernel's
instruction counts, of the whole kernel and of its main loop (:func:`sass.main_loop`). The launch templates
(attention_launch.cuh) are compiled on the host with the CPU emulation and a launcher that records instead of
launching: it names each launched kernel by its symbol (``dladdr`` on the kernel's function pointer, the same
Itanium mangling nvcc gives the device symbol) with its threads and dynamic shared memory per launch, for every part
whose shared memory per SM the templates distinguish. From those, CTAs per SM (:func:`ctas_per_sm`).

One JSON-ready row per (kernel, arch) (:func:`stats_rows`); :data:`GATES` are the checks on a row, the same way as
:data:`metagpt_fast.devtools.aot.GATES` for the Triton kernels. ``scripts/cuda_sass_stats.py`` prints the rows and the
gates; ``tests/test_cuda_attention_compile.py`` runs each gate as a test and checks the gates on canned rows.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from metagpt_fast.devtools import sass

ARCHS = (80, 90)
# Per-SM limits of the parts whose occupancy is recorded: A100 (sm_80) and H100 / H200 (sm_90).
REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
CTAS_PER_SM = 32
SHARED_PER_SM = {80: 167936, 90: 233472}  # 164 KB, 228 KB
# Shared memory the driver reserves per CTA on sm_80 and newer (cudaDevAttrReservedSharedMemoryPerBlock); cuobjdump
# shows it as the static SHARED of sm_90 kernels, ptxas does not count it.
RESERVED_SHARED_PER_CTA = 1024
# Registers are allocated per warp in units of 256 (8 per thread).
REGISTER_UNIT = 256
# Shared memory per SM of the parts the launch templates tell apart (bytes): the launch shapes are read for each.
LAUNCH_PARTS = {"sm_80 (A100)": 167936, "sm_86/89 (100 KB)": 102400, "sm_90 (H100/H200)": 233472}

# Opcode families recorded per kernel (``LDS`` counts every width: LDS, LDS.64, LDS.U.128; not LDSM).
OPCODES = ("HMMA", "LDS", "LDSM", "LDGSTS", "LDG", "STS", "STG", "BAR.SYNC")
# Kernel roles, from the symbol (first match wins).
ROLES = (("delta", "delta"), ("dkdv", "dkdv"), ("dq", "dq"), ("forward", "forward"))
# Gate limits: shared-memory load instructions (LDS + LDSM) per HMMA, whole kernel and main loop.
MAX_LDS_PER_HMMA = {"forward": 1.5, "dkdv": 1.75, "dq": 1.75}
# Roles that stream tiles through shared memory and must load them with cp.async (LDGSTS) and ldmatrix (LDSM).
ASYNC_ROLES = ("forward", "dkdv", "dq")


def find_nvcc() -> str | None:
    """``nvcc`` from ``CUDA_HOME`` (or ``/usr/local/cuda``), else the one on ``PATH``."""
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


def find_cuobjdump(nvcc: str | None = None) -> str | None:
    """``cuobjdump`` of the toolkit that builds the kernels (``CUDA_HOME``, ``/usr/local/cuda``, ``nvcc``'s folder),
    else the one :func:`sass.find_cuobjdump` finds (triton's wheel, ``PATH``)."""
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    if nvcc is not None:
        homes.append(str(Path(nvcc).resolve().parent.parent))
    for home in filter(None, homes):
        if (Path(home) / "bin" / "cuobjdump").is_file():
            return str(Path(home) / "bin" / "cuobjdump")
    return sass.find_cuobjdump()


def role_of(symbol: str) -> str | None:
    """``forward``, ``dkdv``, ``dq`` or ``delta`` from a kernel's (mangled or demangled) name; None if none fits."""
    name = symbol.lower()
    return next((role for key, role in ROLES if key in name), None)


def demangle(symbols: Iterable[str]) -> dict[str, str]:
    """Short readable names (namespace, ``void`` and argument list left out) of mangled kernel symbols."""
    symbols = list(symbols)
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not symbols:
        return {s: s for s in symbols}
    out = subprocess.run([cxxfilt], input="\n".join(symbols), capture_output=True, text=True).stdout.splitlines()
    short = [re.sub(r"metagpt_fast::attention::|\(.*\)$|^void ", "", s).replace(" ", "") for s in out]
    return dict(zip(symbols, short, strict=True))


def dtype_of(name: str) -> str | None:
    if "__nv_bfloat16" in name or "bfloat16" in name:
        return "bf16"
    if "__half" in name:
        return "fp16"
    return None


# ------------------------------------------------------------------------------------------------------ occupancy


def ctas_per_sm(arch: int, registers: int, threads: int, shared_bytes: int) -> tuple[int, str]:
    """CTAs of one kernel resident per SM, and what limits it (``registers``, ``shared``, ``threads``, ``ctas``).

    ``shared_bytes``: static + dynamic shared memory of one CTA; the driver's 1 KB per CTA is added here. Registers
    are allocated per warp in units of 256 and warps take whole register shares (the occupancy calculator's rule)."""
    warps = math.ceil(threads / 32)
    per_warp = math.ceil(registers * 32 / REGISTER_UNIT) * REGISTER_UNIT
    limits = {
        "registers": (REGISTERS_PER_SM // per_warp) // warps if per_warp else CTAS_PER_SM,
        "shared": SHARED_PER_SM[arch] // (shared_bytes + RESERVED_SHARED_PER_CTA),
        "threads": THREADS_PER_SM // (32 * warps),
        "ctas": CTAS_PER_SM,
    }
    limiter = min(limits, key=lambda k: limits[k])
    return limits[limiter], limiter


# ------------------------------------------------------------------------------------------------------ compiling


def compile_source(source: Path, include: Path, nvcc: str, out_dir: Path, archs: Iterable[int] = ARCHS):
    """Compiles one ``.cu`` file for ``archs`` into ``out_dir``; returns (object path, ptxas log). Raises
    ``RuntimeError`` with nvcc's messages when the compile fails."""
    obj = out_dir / (source.stem + ".o")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    cmd = [nvcc, "-std=c++17", "-O3", f"-I{include}", *gencode, "-Xptxas", "-v", "-c", str(source), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{source.name} failed to compile:\n{proc.stderr[-4000:]}")
    return obj, proc.stderr


_SHAPES_PROGRAM = r"""
#include <dlfcn.h>
#include <cstdio>
#include <cstdlib>
#include "attention_launch.cuh"
using namespace metagpt_fast::attention;
// Records each launch: the kernel's symbol (dladdr; the program is linked with -rdynamic), threads, dynamic shared
// memory in bytes.
struct Record {
  template <typename Kernel>
  int operator()(Kernel kernel, const LaunchShape& s, const AttentionParams&) const {
    Dl_info info{};
    const bool named = dladdr(reinterpret_cast<void*>(kernel), &info) != 0 && info.dli_sname != nullptr;
    std::printf("launch %s %d %d\n", named ? info.dli_sname : "?", s.threads, s.shared_bytes);
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
    forward_any_head_dim<__half>(p, Record{});
    forward_any_head_dim<__nv_bfloat16>(p, Record{});
    backward_any_head_dim<__half>(p, Record{});
    backward_any_head_dim<__nv_bfloat16>(p, Record{});
  }
}
"""

_LAUNCH = re.compile(r"^launch (\S+) (\d+) (\d+)$")


def parse_launches(text: str) -> list[tuple[str, int, int]]:
    """(symbol, threads, dynamic shared bytes) of each ``launch`` line the shapes program printed."""
    return [(m.group(1), int(m.group(2)), int(m.group(3))) for line in text.splitlines() if (m := _LAUNCH.match(line))]


def launch_shapes(attention: Path, include: Path, nvcc: str) -> dict[str, dict[str, Any]]:
    """What the launch templates launch: symbol -> ``{"threads", "dynamic_smem", "parts"}`` (the parts of
    :data:`LAUNCH_PARTS` that launch it). Raises ``RuntimeError`` when the program does not build, or when one kernel
    is launched with two shapes."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no host C++ compiler (g++ / c++)")
    cuda_include = Path(nvcc).resolve().parent.parent / "include"
    shapes: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "shapes.cc", Path(tmp) / "shapes"
        src.write_text(_SHAPES_PROGRAM)
        cmd = [cxx, "-std=c++20", "-O0", "-rdynamic", "-DMGF_ATTENTION_EMULATION", f"-I{attention}", f"-I{include}",
               f"-I{cuda_include}", str(src), "-o", str(exe), "-ldl"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"the launch-shapes program failed to build:\n{proc.stderr[-4000:]}")
        for part, smem in LAUNCH_PARTS.items():
            out = subprocess.run([str(exe), str(smem)], check=True, capture_output=True, text=True).stdout
            for symbol, threads, dynamic in parse_launches(out):
                entry = shapes.setdefault(symbol, {"threads": threads, "dynamic_smem": dynamic, "parts": []})
                if (entry["threads"], entry["dynamic_smem"]) != (threads, dynamic):
                    raise RuntimeError(f"{symbol} launched with two shapes: {entry} and {threads}, {dynamic}")
                if part not in entry["parts"]:
                    entry["parts"].append(part)
    return shapes


# ------------------------------------------------------------------------------------------------------ the rows


def _ratio(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 3) if denominator else None


def matmul_loop(listing: list[sass.Instruction]) -> sass.Loop | None:
    """The main loop of a CUDA attention kernel: :func:`sass.main_loop` where the innermost loops carry the HMMA;
    else (a loop over keys that holds loops of its own, e.g. a tile copy that ptxas did not unroll) the loops that
    issue HMMA and contain no other loop issuing HMMA, of which the ones with the most HMMA, the shortest. None
    without a loop that issues HMMA."""
    loop = sass.main_loop(listing)
    if loop is not None and sass.count_opcodes(loop.opcodes, ("HMMA",))["HMMA"]:
        return loop
    weighted = [(lp, sass.count_opcodes(lp.opcodes, ("HMMA",))["HMMA"]) for lp in sass.loops(listing, innermost=False)]
    carrying = [(lp, w) for lp, w in weighted if w]

    def holds(outer: sass.Loop, inner: sass.Loop) -> bool:
        return outer is not inner and outer.start <= inner.start and inner.end <= outer.end

    innermost = [(lp, w) for lp, w in carrying if not any(holds(lp, o) for o, _ in carrying)]
    if not innermost:
        return None
    most = max(w for _, w in innermost)
    return min((lp for lp, w in innermost if w == most), key=lambda lp: lp.instructions)


def kernel_row(
    arch: int, symbol: str, name: str, ptxas: sass.PtxasKernel | None, listing: list[sass.Instruction],
    shape: dict[str, Any] | None,
) -> dict[str, Any]:  # fmt: skip
    """The row of one kernel on one arch: resources, occupancy, opcode counts and LDS-per-HMMA of the whole kernel
    and of its main loop."""
    opcodes = sass.count_opcodes([i.opcode for i in listing], OPCODES)
    loop = matmul_loop(listing)
    loop_opcodes = sass.count_opcodes(loop.opcodes, OPCODES) if loop else None
    row: dict[str, Any] = {
        "kernel": name, "symbol": symbol, "arch": arch, "role": role_of(name), "dtype": dtype_of(name),
        "registers": ptxas.registers if ptxas else None, "stack": ptxas.stack if ptxas else None,
        "spill_stores": ptxas.spill_stores if ptxas else None, "spill_loads": ptxas.spill_loads if ptxas else None,
        "static_smem": ptxas.shared if ptxas else None,
        "threads": shape["threads"] if shape else None, "dynamic_smem": shape["dynamic_smem"] if shape else None,
        "launched_on": shape["parts"] if shape else [],
        "opcodes": opcodes,
        "lds_per_hmma": _ratio(opcodes["LDS"] + opcodes["LDSM"], opcodes["HMMA"]),
        "loop_instructions": loop.instructions if loop else None,
        "loop_opcodes": loop_opcodes,
        "loop_lds_per_hmma": _ratio(loop_opcodes["LDS"] + loop_opcodes["LDSM"], loop_opcodes["HMMA"])
        if loop_opcodes else None,
    }  # fmt: skip
    row["spill_bytes"] = None if ptxas is None else ptxas.stack + ptxas.spill_stores + ptxas.spill_loads
    if ptxas is not None and shape is not None:
        row["smem_per_cta"] = ptxas.shared + shape["dynamic_smem"]
        row["ctas_per_sm"], row["occupancy_limit"] = ctas_per_sm(arch, ptxas.registers, shape["threads"],
                                                                 row["smem_per_cta"])  # fmt: skip
    else:
        row["smem_per_cta"] = row["ctas_per_sm"] = row["occupancy_limit"] = None
    return row


def rows_from(ptxas_log: str, sass_text: str, shapes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the kernels of one compiled object: its ptxas log and its SASS."""
    ptxas = {(k.arch, k.function): k for k in sass.parse_ptxas(ptxas_log)}
    listings = sass.listings(sass_text)
    symbols = sorted({f for _, f in ptxas} | {f for _, f in listings})
    names = demangle(symbols)
    rows = []
    for arch_name, symbol in sorted(set(ptxas) | set(listings), key=lambda k: (names[k[1]], k[0] or "")):
        arch = int((arch_name or "sm_0").removeprefix("sm_"))
        row = kernel_row(arch, symbol, names[symbol], ptxas.get((arch_name, symbol)),
                         listings.get((arch_name, symbol), []), shapes.get(symbol))  # fmt: skip
        if (arch_name, symbol) not in listings:
            row["error"] = "no SASS for this kernel"
        elif (arch_name, symbol) not in ptxas:
            row["error"] = "not in the ptxas log"
        rows.append(row)
    return rows


def stats_rows(root: Path, jobs: int = 2, nvcc: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Compiles every ``csrc/attention/*.cu`` of the checkout at ``root`` for :data:`ARCHS`; returns the rows of all
    kernels (sorted by kernel, arch) and one line per compiled file (its time). Compile errors raise."""
    import time

    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME)")
    tool = find_cuobjdump(nvcc)
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (CUDA toolkit bin/, triton's wheel or PATH)")
    attention, include = root / "csrc" / "attention", root / "csrc" / "include"
    sources = sorted(attention.glob("*.cu"))
    if not sources:
        raise FileNotFoundError(f"no .cu files under {attention}")
    shapes = launch_shapes(attention, include, nvcc)
    with tempfile.TemporaryDirectory() as tmp:

        def work(source: Path) -> tuple[Path, list[dict[str, Any]], float]:
            start = time.perf_counter()
            obj, log = compile_source(source, include, nvcc, Path(tmp))
            elapsed = time.perf_counter() - start
            return source, rows_from(log, sass.sass(obj, tool), shapes), elapsed

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            results = list(pool.map(work, sources))
    rows, lines = [], []
    for source, file_rows, elapsed in results:
        lines.append(f"{source.name}: compiled for sm_{', sm_'.join(map(str, ARCHS))} in {elapsed:.0f} s")
        rows += file_rows
    rows.sort(key=lambda r: (r["kernel"], r["arch"]))
    return rows, lines


def unlaunched(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Kernels compiled but never launched by the launch templates (dead instantiations, or a launch the shapes
    program cannot name)."""
    return sorted({r["kernel"] for r in rows if not r["launched_on"]})


def format_row(row: dict[str, Any]) -> str:
    """One line of the printed table."""
    if "error" in row:
        return f"sm_{row['arch']} {row['kernel']}: ERROR {row['error']}"
    ops = row["opcodes"]
    loop = row["loop_opcodes"] or {}
    return (
        f"sm_{row['arch']} {row['kernel']}: {row['registers']} regs, {row['spill_bytes']} B spill, "
        f"{row['threads']} threads, {row['smem_per_cta']} B smem, {row['ctas_per_sm']} CTA/SM "
        f"({row['occupancy_limit']}); HMMA {ops['HMMA']}, LDS {ops['LDS']}, LDSM {ops['LDSM']}, "
        f"LDGSTS {ops['LDGSTS']}, LDG {ops['LDG']}, STS {ops['STS']}; LDS/HMMA {row['lds_per_hmma']}; loop "
        f"{row['loop_instructions']} instr, HMMA {loop.get('HMMA')}, LDS {loop.get('LDS')}, LDSM {loop.get('LDSM')}, "
        f"LDS/HMMA {row['loop_lds_per_hmma']}"
    )


# ----------------------------------------------------------------------------------------------------------------
# gates: what tests/test_cuda_attention_compile.py and scripts/cuda_sass_stats.py fail on, read from the rows


def _error(row: dict[str, Any]) -> str | None:
    return row.get("error")


def _spills(row: dict[str, Any]) -> str | None:
    if "error" in row or not row["spill_bytes"]:
        return None
    return (
        f"{row['stack']} B stack, {row['spill_stores']} / {row['spill_loads']} B spill stores / loads "
        f"({row['registers']} registers)"
    )


def _fits(row: dict[str, Any]) -> str | None:
    if "error" in row or row["ctas_per_sm"] is None:  # not launched: see unlaunched()
        return None
    if row["ctas_per_sm"] < 1:
        return (
            f"0 CTAs per SM ({row['occupancy_limit']}): {row['registers']} registers x {row['threads']} threads, "
            f"{row['smem_per_cta']} B shared memory"
        )
    return None


def _async_loads(row: dict[str, Any]) -> str | None:
    if "error" in row or row["role"] not in ASYNC_ROLES:
        return None
    ops = row["opcodes"]
    if ops["LDSM"] == 0 or ops["LDGSTS"] == 0:
        return f"{ops['LDSM']} LDSM and {ops['LDGSTS']} LDGSTS: expected ldmatrix and cp.async loads"
    return None


def _lds_per_hmma(row: dict[str, Any]) -> str | None:
    limit = MAX_LDS_PER_HMMA.get(row.get("role"))
    if "error" in row or limit is None:
        return None
    whole, loop = row["lds_per_hmma"], row["loop_lds_per_hmma"]
    if whole is None or loop is None:
        return f"no HMMA{' in the main loop' if whole is not None else ''} (LDS/HMMA {whole}, main loop {loop})"
    if whole > limit or loop > limit:
        return f"(LDS + LDSM) per HMMA {whole} in the kernel, {loop} in the main loop (at most {limit})"
    return None


# name -> check of one row (a failure message, or None).
GATES: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "compile": _error,
    "spills": _spills,
    "fits": _fits,
    "async_loads": _async_loads,
    "lds_per_hmma": _lds_per_hmma,
}


def gate_failures(rows: Iterable[dict[str, Any]], gate: str) -> list[str]:
    """``sm_<arch> <kernel>: <message>`` for each row that fails ``gate``."""
    check = GATES[gate]
    return [f"sm_{row['arch']} {row['kernel']}: {message}" for row in rows if (message := check(row))]
