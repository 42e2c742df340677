"""Reads compiled NVIDIA GPU code with ``cuobjdump``: per-kernel resource usage and the SASS instruction stream.

Works on a bare cubin (what ``triton.compile`` produces) and on a host binary with an embedded fatbin (the nvcc-built
extension), where every kernel comes once per architecture:

- :func:`resource_usage` — registers, stack, shared and local memory of each kernel (``--dump-resource-usage``);
  stack or local bytes mean register spills;
- :func:`sass` — the disassembly (``-sass``); :func:`functions` splits it into the opcodes of each kernel and
  :func:`count_opcodes` counts opcode families in it (tensor-core ``HGMMA``/``HMMA``, ``LDSM``, ``LDGSTS``, ...);
  :func:`listings` keeps each instruction's address and branch target, from which :func:`loops` finds the loops
  and :func:`main_loop` the one that carries a kernel's matmuls.

:func:`parse_ptxas` reads the same numbers from ``ptxas -v`` (``nvcc -Xptxas -v``) while compiling, with the spill
stores and loads apart; :func:`advisories` reads its performance advisories (``C7515``: wgmma serialised), and
:func:`run_ptxas` runs a ptxas recent enough to print them (:func:`find_ptxas`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

# Opcode families worth watching in attention kernels: Hopper warpgroup MMA and its wait, Ampere MMA, shared-memory
# matrix loads, asynchronous global->shared copies, TMA loads, plain global / shared loads, the exp2 unit.
OPCODES = ("HGMMA", "WARPGROUP.DEPBAR", "HMMA", "LDSM", "LDGSTS", "UTMALDG", "LDG", "LDS", "MUFU.EX2")

_ARCH = re.compile(r"^\s*(?:arch =|code for|\.target)\s+(sm_\w+)")
_USAGE_FUNCTION = re.compile(r"^\s*Function (\S+):\s*$")
_FIELDS = ("REG", "STACK", "SHARED", "LOCAL")  # KernelResources order
_USAGE_FIELD = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")
_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_PTXAS_PROPERTIES = re.compile(r"Function properties for (\S+)")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)\s*$")
# "/*0090*/   @!P0 LDG.E.128 R4, desc[UR6][R2.64] ;" -> "LDG.E.128" (an optional predicate, then the opcode).
# Instructions predicated on "@!PT" never run (ptxas pads with them) and are left out.
_INSTRUCTION = re.compile(
    r"^\s*/\*[0-9a-f]+\*/\s+(?!@!PT\s)(?:@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)"
)
# The same with the address and the operands: "/*3240*/  @!P0 BRA 0x1790 ;" -> ("3240", "BRA", " 0x1790 ").
_ADDRESSED = re.compile(
    r"^\s*/\*([0-9a-f]+)\*/\s+(?!@!PT\s)(?:@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)([^;]*);"
)
# cuobjdump prints a branch's target as an absolute address, its last operand ("BRA 0x1790", "BRA.U !UP0, 0x1790").
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)\s*$")
# "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized ..."
_ADVISORY = re.compile(r"\((C\d{4})\)\s*(.*)")
_RELEASE = re.compile(r"release (\d+)\.(\d+)")
# ptxas advisories that a wgmma was serialised (each wgmma waits for the previous one to finish): C7510-C7515.
SERIALIZATION_ADVISORIES = tuple(f"C{code}" for code in range(7510, 7516))
# The first ptxas release known to print them.
MIN_PTXAS_ADVISORIES = (12, 8)


@dataclasses.dataclass(frozen=True)
class KernelResources:
    arch: str | None  # "sm_90"; None in a bare cubin, whose report names no architecture
    function: str  # the kernel's (mangled) symbol
    registers: int
    stack: int
    shared: int
    local: int

    @property
    def spill_bytes(self) -> int:
        return max(self.stack, self.local)


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int  # byte offset in the function
    opcode: str  # with its modifiers: "HGMMA.64x64x16.F32.BF16"
    target: int | None = None  # a branch's target address


@dataclasses.dataclass(frozen=True)
class Loop:
    """A backward branch and the instructions from its target to it (inclusive): one static iteration."""

    start: int  # address of the first instruction (the branch target)
    end: int  # address of the backward branch
    opcodes: tuple[str, ...]

    @property
    def instructions(self) -> int:
        return len(self.opcodes)


@dataclasses.dataclass(frozen=True)
class Advisory:
    code: str  # "C7515"
    message: str


@dataclasses.dataclass(frozen=True)
class PtxasKernel:
    arch: str  # "sm_90"
    function: str
    registers: int
    stack: int  # stack frame bytes
    spill_stores: int
    spill_loads: int
    shared: int  # static shared memory bytes


def find_cuobjdump(cuda_home: str | os.PathLike | None = None) -> str | None:
    """``cuobjdump`` from ``cuda_home/bin`` (the toolkit that built the binary) when given, else the copy in triton's
    wheel (the one matching triton's ptxas), else the one on ``PATH``."""
    candidates = [Path(cuda_home) / "bin" / "cuobjdump"] if cuda_home else []
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    found = next((str(c) for c in candidates if c.is_file()), None)
    return found or shutil.which("cuobjdump")


def _run(binary: str | os.PathLike, args: list[str], tool: str | None) -> str:
    tool = tool or find_cuobjdump()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (CUDA toolkit bin/, triton's wheel or PATH)")
    return subprocess.run([tool, *args, str(binary)], capture_output=True, text=True, check=True).stdout


def parse_resource_usage(text: str) -> list[KernelResources]:
    """The kernels of a ``cuobjdump --dump-resource-usage`` report, in report order."""
    kernels = []
    arch = function = None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch = m.group(1)
        elif m := _USAGE_FUNCTION.match(line):
            function = m.group(1)
        elif function is not None and "REG:" in line:
            fields = dict(_USAGE_FIELD.findall(line))
            kernels.append(KernelResources(arch, function, *(int(fields.get(k, 0)) for k in _FIELDS)))
            function = None
    return kernels


def parse_ptxas(text: str) -> list[PtxasKernel]:
    """The kernels of a ``ptxas -v`` log, in log order. Stack and spills are those ptxas reports for the entry
    function itself (not for the device functions it calls)."""
    kernels: list[dict] = []
    properties_of = None
    for line in text.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            counts = dict.fromkeys(("registers", "stack", "spill_stores", "spill_loads", "shared"), 0)
            kernels.append({"arch": m.group(2), "function": m.group(1), **counts})
        elif m := _PTXAS_PROPERTIES.search(line):
            properties_of = m.group(1)
        elif kernels and (m := _PTXAS_FRAME.search(line)) and properties_of == kernels[-1]["function"]:
            kernels[-1].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif kernels and (m := _PTXAS_USED.search(line)):
            kernels[-1].update(registers=int(m.group(1)), shared=int(m.group(2) or 0))
    return [PtxasKernel(**k) for k in kernels]


def advisories(text: str) -> list[Advisory]:
    """The coded advisories (``C7515`` ...) of a ``ptxas -v`` log, in log order."""
    return [Advisory(m.group(1), m.group(2).strip()) for line in text.splitlines() if (m := _ADVISORY.search(line))]


def ptxas_release(tool: str | os.PathLike) -> tuple[int, int] | None:
    """(major, minor) of a ptxas binary (``--version``), None when it does not run."""
    try:
        out = subprocess.run([str(tool), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = _RELEASE.search(out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def find_ptxas(minimum: tuple[int, int] = MIN_PTXAS_ADVISORIES) -> tuple[str | None, str]:
    """A ``ptxas`` of release ``minimum`` or newer, and a line saying which (or why there is none).

    Looked for in the CUDA toolkit (``CUDA_HOME``, ``CUDA_PATH``, ``/usr/local/cuda``), then in triton's wheel (the
    ptxas that built triton's cubins), then on ``PATH``; the first recent enough is taken."""
    candidates = [Path(os.environ[v]) / "bin" / "ptxas" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append(Path("/usr/local/cuda/bin/ptxas"))
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas")
    except ImportError:
        pass
    if on_path := shutil.which("ptxas"):
        candidates.append(Path(on_path))
    seen = []
    for candidate in dict.fromkeys(candidates):
        if not candidate.is_file():
            continue
        release = ptxas_release(candidate)
        seen.append(f"{candidate} ({'.'.join(map(str, release)) if release else 'unknown release'})")
        if release is not None and release >= minimum:
            return str(candidate), f"{candidate} {release[0]}.{release[1]}"
    wanted = ".".join(map(str, minimum))
    return None, f"no ptxas >= {wanted} (found: {', '.join(seen) or 'none'})"


def run_ptxas(ptx: str | os.PathLike, arch: str, tool: str) -> subprocess.Popen:
    """Starts ``ptxas -v -arch=<arch>`` on a PTX file (output discarded) and returns the process; its log (stderr
    and stdout together, for :func:`advisories` and :func:`parse_ptxas`) comes from ``communicate()``."""
    return subprocess.Popen(
        [tool, "-v", f"-arch={arch}", str(ptx), "-o", os.devnull],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def resource_usage(binary: str | os.PathLike, tool: str | None = None) -> list[KernelResources]:
    """Resource usage of every kernel in a cubin or a binary with an embedded fatbin."""
    return parse_resource_usage(_run(binary, ["--dump-resource-usage"], tool))


def sass(binary: str | os.PathLike, tool: str | None = None, arch: str | None = None) -> str:
    """The SASS text of a cubin or fatbin (``cuobjdump -sass``), of one architecture (``"sm_90"``) when given."""
    return _run(binary, ["-sass", *(["-arch", arch] if arch else [])], tool)


def instructions(text: str) -> list[str]:
    """The opcode (with its modifiers, ``HGMMA.64x128x16.F32.BF16``) of every instruction in a SASS text, in order;
    instructions that never run (predicated on ``@!PT``) are left out."""
    return [m.group(1) for line in text.splitlines() if (m := _INSTRUCTION.match(line))]


def functions(text: str) -> dict[tuple[str | None, str], list[str]]:
    """The opcodes of each kernel in a SASS text, keyed by (architecture, function)."""
    result: dict[tuple[str | None, str], list[str]] = {}
    arch = None
    current: list[str] | None = None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch = m.group(1)
        elif m := _SASS_FUNCTION.match(line):
            current = result.setdefault((arch, m.group(1)), [])
        elif current is not None and (m := _INSTRUCTION.match(line)):
            current.append(m.group(1))
    return result


def listings(text: str) -> dict[tuple[str | None, str], list[Instruction]]:
    """The instructions of each kernel in a SASS text with their addresses and branch targets, keyed like
    :func:`functions` (same instructions, ``@!PT`` padding left out)."""
    result: dict[tuple[str | None, str], list[Instruction]] = {}
    arch = None
    current: list[Instruction] | None = None
    for line in text.splitlines():
        if m := _ARCH.match(line):
            arch = m.group(1)
        elif m := _SASS_FUNCTION.match(line):
            current = result.setdefault((arch, m.group(1)), [])
        elif current is not None and (m := _ADDRESSED.match(line)):
            address, opcode, operands = int(m.group(1), 16), m.group(2), m.group(3)
            target = None
            if opcode == "BRA" or opcode.startswith("BRA."):
                t = _BRANCH_TARGET.search(operands.strip())
                target = int(t.group(1), 16) if t else None
            current.append(Instruction(address, opcode, target))
    return result


def loops(listing: list[Instruction], innermost: bool = True) -> list[Loop]:
    """The loops of one kernel (a value of :func:`listings`), in address order: each backward branch (target below
    its own address; the ``BRA`` to itself that ends a kernel is no loop) with the instructions from its target to
    it. This is the static body of one iteration: both sides of a branch inside it count, and a block that ptxas
    placed outside the range (rare) is missed. ``innermost``: only loops that contain no other loop."""
    found = []
    for branch in listing:
        if branch.target is not None and branch.target < branch.address:
            body = tuple(i.opcode for i in listing if branch.target <= i.address <= branch.address)
            found.append(Loop(branch.target, branch.address, body))
    if innermost:  # no other loop within its range (each branch address ends one loop)
        found = [loop for loop in found if not any(loop.start <= o.start and o.end < loop.end for o in found)]
    return sorted(found, key=lambda loop: (loop.start, loop.end))


# Matmul instructions that identify a kernel's main loop: tensor-core products, else (float32 on FMA units) FFMA.
_MATMUL_FAMILIES = (("HGMMA", "HMMA"), ("FFMA",))


def main_loop(listing: list[Instruction]) -> Loop | None:
    """The loop where a streaming kernel (attention) spends its time at long sequences: of the innermost loops that
    issue the most matmul instructions (``HGMMA`` + ``HMMA``; ``FFMA`` in a kernel with neither), the shortest.

    Attention kernels run their matmuls in two copies of one loop: over the blocks that need no per-element mask and
    over those that straddle the causal diagonal or the end of the sequence. Both issue the same matmuls; the
    unmasked one is shorter and runs all but a few iterations, so it is the one whose length is "instructions per
    step". None for a kernel without loops."""
    candidates = loops(listing)
    if not candidates:
        return None
    for families in _MATMUL_FAMILIES:
        weights = [sum(count_opcodes(loop.opcodes, families).values()) for loop in candidates]
        if max(weights) > 0:
            break
    hottest = [loop for loop, weight in zip(candidates, weights, strict=True) if weight == max(weights)]
    return min(hottest, key=lambda loop: loop.instructions)


def count_opcodes(sass_or_opcodes: str | Iterable[str], names: Iterable[str] = OPCODES) -> dict[str, int]:
    """How many instructions of each opcode family in ``names``: a family counts its opcode with any modifiers
    (``LDG`` counts ``LDG.E.128`` but not ``LDGSTS``; ``MUFU.EX2`` counts ``MUFU.EX2`` only).

    Takes a SASS text or a list of opcodes (a value of :func:`functions`)."""
    opcodes = instructions(sass_or_opcodes) if isinstance(sass_or_opcodes, str) else list(sass_or_opcodes)
    return {name: sum(op == name or op.startswith(name + ".") for op in opcodes) for name in names}
