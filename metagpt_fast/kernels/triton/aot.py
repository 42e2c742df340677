"""Ahead-of-time compilation of Triton kernels for NVIDIA targets, without a GPU.

``triton.compile`` lowers a kernel for a given ``GPUTarget`` down to a cubin; ``cuobjdump --dump-resource-usage``
(shipped in triton's wheel) then reports registers, stack (spills), local memory and shared memory. This is how CI
catches register spills and missing tensor-core instructions that the CPU interpreter can never show.

Each kernel module declares its cases as ``AOT_CASES``: a list of :class:`AotCase` covering every configuration its
autotuner may pick; ``tests/test_aot.py`` compiles them all for sm_80 and sm_90.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from typing import Any

import triton
from triton.backends.compiler import GPUTarget

ARCHS = (80, 90)


@dataclasses.dataclass(frozen=True)
class AotCase:
    kernel: Any  # a @triton.jit function
    signature: dict[str, str]  # argument -> triton type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict[str, Any]  # values of the constexpr arguments
    num_warps: int = 4
    num_stages: int = 2
    # Kernels whose matmuls must lower to Hopper tensor-core wgmma on sm_90.
    expect_wgmma: bool = False
    # Allowed stack bytes, with the reason in a comment at the case's definition; 0 means spills fail the check.
    allowed_spill_bytes: int = 0
    # Arguments Triton's launcher would see as multiples of 16 (aligned pointers, strides): enables vector loads.
    divisible_by_16: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{self.kernel.__name__}[{consts},w{self.num_warps},s{self.num_stages}]"


@dataclasses.dataclass(frozen=True)
class AotStats:
    label: str
    arch: int
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    uses_wgmma: bool

    @property
    def spill_bytes(self) -> int:
        return max(self.stack_bytes, self.local_bytes)


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_case(case: AotCase, arch: int) -> AotStats:
    """Compiles ``case`` for ``sm_<arch>`` and returns its resource usage."""
    attrs = {(case.kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in case.divisible_by_16}
    source = triton.compiler.ASTSource(
        fn=case.kernel, signature=case.signature, constexprs=case.constexprs, attrs=attrs
    )
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": case.num_warps, "num_stages": case.num_stages},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        report = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout

    def field(name: str) -> int:
        found = re.search(rf"\b{name}:(\d+)", report)
        return int(found.group(1)) if found else 0

    return AotStats(
        label=case.label,
        arch=arch,
        registers=field("REG"),
        stack_bytes=field("STACK"),
        local_bytes=field("LOCAL"),
        shared_bytes=max(field("SHARED"), int(getattr(compiled.metadata, "shared", 0) or 0)),
        uses_wgmma="wgmma" in compiled.asm["ptx"],
    )


def discover_cases() -> list[AotCase]:
    """Every ``AOT_CASES`` entry of the modules in this package."""
    import importlib
    import pkgutil

    import metagpt_fast.kernels.triton as package

    cases = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        cases += getattr(module, "AOT_CASES", [])
    return cases


def main() -> int:
    """Compiles every case for every arch and prints one JSON object per line (kernel stats or an error)."""
    import json

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: ahead-of-time compilation needs triton's real compiler")
    for case in discover_cases():
        for arch in ARCHS:
            row = {"label": case.label, "arch": arch, "allowed_spill_bytes": case.allowed_spill_bytes,
                   "expect_wgmma": case.expect_wgmma}
            try:
                row.update(dataclasses.asdict(compile_case(case, arch)), spill_bytes=None)
                row["spill_bytes"] = max(row["stack_bytes"], row["local_bytes"])
            except Exception as exc:  # reported, and failed by the test
                row["error"] = f"{type(exc).__name__}: {exc}"
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
