"""The compiled extension: it loads, declares every op, and its CUDA kernels were compiled for sm_80 and sm_90
without spilling (``cuobjdump --dump-resource-usage`` on the built library, read by ``metagpt_fast.devtools.sass``;
registers are printed)."""

import os

import pytest
import torch

from metagpt_fast import _extension
from metagpt_fast.devtools import sass

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


def test_cuda_kernels_compiled_for_sm80_sm90_without_spills(extension):
    if not _cuda_build_expected():
        pytest.skip("no CUDA part expected: torch without CUDA, no nvcc, or METAGPT_FAST_SKIP_CUDA_BUILD")
    assert _extension.has_cuda_kernels(), "torch has CUDA and nvcc is present, but the extension has no CUDA kernels"
    for name in CUDA_POSITIONAL_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"metagpt_fast::{name}", "CUDA"), name
    tool = sass.find_cuobjdump(_extension.find_cuda_home())
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit bin/, triton's bundled copy or PATH)")
    usage = sorted(sass.resource_usage(extension.__file__, tool), key=lambda k: k.arch or "")
    archs = {k.arch for k in usage}
    for arch in REQUIRED_ARCHS:
        assert arch in archs, f"no kernels for {arch} in {extension.__file__} (found {sorted(archs)})"
    problems = []
    for k in usage:
        print(f"{k.arch} REG={k.registers:3d} STACK={k.stack:4d} LOCAL={k.local:4d} SHARED={k.shared:6d} {k.function}")
        allowed = next((b for name, b in JUSTIFIED_LOCAL_BYTES.items() if name in k.function), 0)
        if k.spill_bytes > allowed:
            problems.append(f"{k.arch} {k.function}: STACK={k.stack} LOCAL={k.local} (spills)")
    assert not problems, "\n".join(problems)
