"""The compiled extension: it loads, declares every op, and its CUDA kernels were compiled for sm_80 and sm_90
without spilling (``cuobjdump --dump-resource-usage`` on the built library; registers are printed)."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from metagpt_fast import _extension

OPS = (
    "attention_fwd",
    "attention_bwd",
    "embed_positions_fwd",
    "embed_positions_bwd",
    "add_positional_encoding_fwd",
    "add_positional_encoding_bwd",
    "rotary",
    "rotary_",
)
CUDA_POSITIONAL_OPS = OPS[2:]
REQUIRED_ARCHS = ("sm_80", "sm_90")
# Kernels allowed a non-zero stack/local size, with the measured bytes and why (none so far).
JUSTIFIED_LOCAL_BYTES: dict[str, int] = {}


@pytest.fixture(scope="module")
def extension():
    if _extension.find_cxx() is None:
        pytest.skip("no C++ compiler: the package runs without the extension")
    module = _extension.load()
    assert module is not None, f"extension failed to load: {_extension.unavailable_reason()}"
    return module


def test_every_op_is_declared_with_cpu_kernels(extension):
    for name in OPS:
        assert hasattr(torch.ops.metagpt_fast, name), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"metagpt_fast::{name}", "CPU"), name


def test_sources_leave_cuda_bindings_out_of_cpu_builds():
    root = _extension.csrc_dir()
    assert root is not None
    cpu_only = _extension.sources(root, with_cuda=False)
    full = _extension.sources(root, with_cuda=True)
    assert not any(s.endswith((".cu", "_cuda.cpp")) for s in cpu_only)
    assert set(cpu_only) < set(full)
    assert any(s.endswith("positional_cuda.cpp") for s in full)


def test_unsupported_cuda_arch_is_an_error():
    home = _extension.find_cuda_home()
    if home is None:
        pytest.skip("no nvcc")
    assert {"80", "90"} <= _extension.nvcc_archs(home)
    with pytest.raises(ValueError, match="cannot target"):
        _extension.cuda_archs(home, "80;12")


def _cuda_build_expected() -> bool:
    return (
        torch.version.cuda is not None
        and _extension.find_cuda_home() is not None
        and os.environ.get("METAGPT_FAST_SKIP_CUDA_BUILD", "0") in ("", "0")
    )


def _cuobjdump() -> str | None:
    candidates = [Path(_extension.find_cuda_home() or "/nonexistent") / "bin" / "cuobjdump", shutil.which("cuobjdump")]
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c and Path(c).exists()), None)


def _resource_usage(library: str, tool: str) -> dict[str, list[dict]]:
    """{arch: [{function, REG, STACK, SHARED, LOCAL}, ...]} parsed from cuobjdump --dump-resource-usage."""
    text = subprocess.run([tool, "--dump-resource-usage", library], capture_output=True, text=True, check=True).stdout
    usage: dict[str, list[dict]] = {}
    arch = None
    function = None
    for line in text.splitlines():
        if m := re.search(r"arch = (sm_\d+a?)", line):
            arch = m.group(1)
            usage.setdefault(arch, [])
        elif m := re.match(r"\s*Function (\S+):", line):
            function = m.group(1)
        elif function and arch and "REG:" in line:
            fields = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            usage[arch].append({"function": function, **fields})
            function = None
    return usage


def test_cuda_kernels_compiled_for_sm80_sm90_without_spills(extension):
    if not _cuda_build_expected():
        pytest.skip("no CUDA part expected: torch without CUDA, no nvcc, or METAGPT_FAST_SKIP_CUDA_BUILD")
    assert _extension.has_cuda_kernels(), "torch has CUDA and nvcc is present, but the extension has no CUDA kernels"
    for name in CUDA_POSITIONAL_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"metagpt_fast::{name}", "CUDA"), name
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit bin/ or triton's bundled copy)")
    usage = _resource_usage(extension.__file__, tool)
    for arch in REQUIRED_ARCHS:
        assert usage.get(arch), f"no kernels for {arch} in {extension.__file__} (found {sorted(usage)})"
    problems = []
    for arch, kernels in sorted(usage.items()):
        for k in kernels:
            print(
                f"{arch} REG={k['REG']:3d} STACK={k['STACK']:4d} LOCAL={k['LOCAL']:4d} SHARED={k['SHARED']:6d} "
                f"{k['function']}"
            )
            local = max(k["STACK"], k["LOCAL"])
            allowed = next((b for name, b in JUSTIFIED_LOCAL_BYTES.items() if name in k["function"]), 0)
            if local > allowed:
                problems.append(f"{arch} {k['function']}: STACK={k['STACK']} LOCAL={k['LOCAL']} (spills)")
    assert not problems, "\n".join(problems)
