"""Reads compiled NVIDIA GPU code with ``cuobjdump``: per-kernel resource usage and the SASS instruction stream.

Works on a bare cubin (what ``triton.compile`` produces) and on a host binary with an embedded fatbin (the nvcc-built
extension), where every kernel comes once per architecture:

- :func:`resource_usage` — registers, stack, shared and local memory of each kernel (``--dump-resource-usage``);
  stack or local bytes mean register spills;
- :func:`sass` — the disassembly (``-sass``); :func:`functions` splits it into the opcodes of each kernel and
  :func:`count_opcodes` counts opcode families in it (tensor-core ``HGMMA``/``HMMA``, ``LDSM``, ``LDGSTS``, ...).

:func:`parse_ptxas` reads the same numbers from ``ptxas -v`` (``nvcc -Xptxas -v``) while compiling, with the spill
stores and loads apart.
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


def count_opcodes(sass_or_opcodes: str | Iterable[str], names: Iterable[str] = OPCODES) -> dict[str, int]:
    """How many instructions of each opcode family in ``names``: a family counts its opcode with any modifiers
    (``LDG`` counts ``LDG.E.128`` but not ``LDGSTS``; ``MUFU.EX2`` counts ``MUFU.EX2`` only).

    Takes a SASS text or a list of opcodes (a value of :func:`functions`)."""
    opcodes = instructions(sass_or_opcodes) if isinstance(sass_or_opcodes, str) else list(sass_or_opcodes)
    return {name: sum(op == name or op.startswith(name + ".") for op in opcodes) for name in names}
