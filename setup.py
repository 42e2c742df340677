"""Build entry point: the package, plus the compiled extension ``metagpt_fast._C`` from csrc/ when possible.

    pip install --no-build-isolation -e .          # or: python setup.py build_ext --inplace

The extension is compiled against the installed torch (hence no build isolation) with ninja: the C++ CPU kernels
whenever a C++ compiler is present, the CUDA kernels too when torch has CUDA and nvcc is found. Installing never
fails for want of torch, a compiler or CUDA: the package then runs without the extension (or builds it just in time
on first use) and ``metagpt-fast info`` says why. Knobs (see metagpt_fast/_extension.py): METAGPT_FAST_CUDA_ARCHS
(default "80;90"), METAGPT_FAST_SKIP_CUDA_BUILD, METAGPT_FAST_FORCE_CUDA_BUILD, MAX_JOBS, NVCC_THREADS,
METAGPT_FAST_DEBUG.
"""

import importlib.util
import os
import sys
import time
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _log(message: str) -> None:
    print(f"metagpt_fast setup: {message}", file=sys.stderr, flush=True)


def _load_config():
    """metagpt_fast/_extension.py by path: the one place that lists sources and flags (importing the package
    itself would need its dependencies)."""
    spec = importlib.util.spec_from_file_location("_metagpt_fast_build_config", ROOT / "metagpt_fast" / "_extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extension_kwargs() -> dict:
    config = _load_config()
    force_cuda = config.flag("METAGPT_FAST_FORCE_CUDA_BUILD")
    root = config.csrc_dir()
    if root is None:
        _log("no csrc/ sources: installing without the compiled extension")
        return {}
    if config.find_cxx() is None:
        _log("no C++ compiler found: installing without the compiled extension (metagpt-fast info says so)")
        return {}
    if importlib.util.find_spec("torch") is None:
        _log("torch is not importable at build time (use pip install --no-build-isolation): no compiled extension")
        return {}

    cuda_home, why_no_cuda = config.cuda_part_wanted()
    archs = []
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension when it is imported below
        try:
            archs = config.cuda_archs(cuda_home)
        except Exception as exc:
            if force_cuda:
                raise
            why_no_cuda, cuda_home = str(exc), None
    if why_no_cuda:
        if force_cuda:
            raise RuntimeError(f"METAGPT_FAST_FORCE_CUDA_BUILD is set but the CUDA part cannot be built: {why_no_cuda}")
        _log(f"building the C++ CPU part only: {why_no_cuda}")

    from torch.utils import cpp_extension

    with_cuda = cuda_home is not None
    if with_cuda:
        cpp_extension.CUDA_HOME = cuda_home
    srcs = [os.path.relpath(s, ROOT) for s in config.sources(root, with_cuda)]
    common = {
        "name": config.EXTENSION_NAME,
        "sources": srcs,
        "include_dirs": config.include_dirs(root),  # absolute: ninja runs in the build folder
        "extra_link_args": config.ld_flags(),
    }
    if with_cuda:
        _log(f"building C++ CPU + CUDA kernels for sm_{', sm_'.join(archs)} with nvcc from {cuda_home}")
        ext = cpp_extension.CUDAExtension(
            **common, extra_compile_args={"cxx": config.cxx_flags(True), "nvcc": config.nvcc_flags(archs)}
        )
    else:
        ext = cpp_extension.CppExtension(**common, extra_compile_args={"cxx": config.cxx_flags(False)})

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtension(base):
        """Times the build, and turns a failed compile into a package without the extension unless forced."""

        def run(self):
            start = time.perf_counter()
            try:
                super().run()
            except Exception as exc:
                if force_cuda:
                    raise
                _log(f"the extension failed to build, installing without it: {type(exc).__name__}: {exc}")
                return
            _log(f"extension built in {time.perf_counter() - start:.0f} s")

    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**_extension_kwargs())
