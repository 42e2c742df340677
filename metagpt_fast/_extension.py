"""The compiled extension ``metagpt_fast._C`` (csrc/): load it, build it on first use, or say why it is missing.

Order of attempts in :func:`load`:

1. the prebuilt module ``metagpt_fast._C`` (``pip install --no-build-isolation .`` or
   ``python setup.py build_ext --inplace``);
2. a just-in-time build of csrc/ with ``torch.utils.cpp_extension.load`` and ninja, cached by torch under
   ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) and rebuilt only when a source changes;
   ``METAGPT_FAST_NO_JIT=1`` turns it off;
3. otherwise the reason is recorded and returned by :func:`unavailable_reason`; the package keeps working with its
   other backends.

The build configuration (sources, compiler flags, CUDA architectures) lives here and ``setup.py`` loads this file
by path, so both build paths compile the same thing. Environment knobs (flash-attention's style):

- ``METAGPT_FAST_CUDA_ARCHS``: ``;``-separated compute capabilities, default ``80;90`` (``90a`` for Hopper-only
  instructions); each is checked against ``nvcc --list-gpu-arch``. The JIT build defaults to the visible GPU's.
- ``METAGPT_FAST_SKIP_CUDA_BUILD=1``: build the CPU part only.
- ``METAGPT_FAST_FORCE_CUDA_BUILD=1``: a CUDA part that cannot be built is an error instead of a warning.
- ``MAX_JOBS``: parallel compile jobs (read by torch's ninja build); ``NVCC_THREADS``: nvcc ``--threads``
  (default 2: the two architectures compile in parallel).
- ``METAGPT_FAST_DEBUG=1``: ``-O0 -g`` host code and ``-lineinfo`` device code.

Nothing here imports torch at module level: ``setup.py`` must work without it.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

EXTENSION_NAME = "metagpt_fast._C"
JIT_NAME = "metagpt_fast_C"
DEFAULT_CUDA_ARCHS = "80;90"
CUDA_MACRO = "METAGPT_FAST_WITH_CUDA"

_PACKAGE_DIR = Path(__file__).resolve().parent

_module = None
_reason: str | None = None
_attempted = False


def flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to something other than 0/false/no/off."""
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


# --------------------------------------------------------------------------------------------------- configuration


def csrc_dir() -> Path | None:
    """The csrc/ folder of a source checkout (next to the package), or None when the sources are not shipped."""
    for candidate in (_PACKAGE_DIR.parent / "csrc", _PACKAGE_DIR / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    return None


def sources(root: Path, with_cuda: bool) -> list[str]:
    """By folder: ``ops.cpp`` and ``cpu/*.cpp`` always (the schemas and CPU kernels); with CUDA, the ``.cpp``
    bindings and ``.cu`` kernels of every other folder (``attention/``, ``positional/``). ``include/`` holds headers."""
    cpp = [root / "ops.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    cu = []
    if with_cuda:
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in ("cpu", "include")):
            cpp += sorted(folder.glob("*.cpp"))
            cu += sorted(folder.glob("*.cu"))
    return [str(p) for p in cpp + cu]


def find_cuda_home() -> str | None:
    """CUDA toolkit root: ``CUDA_HOME``/``CUDA_PATH``, else /usr/local/cuda when it has nvcc, else nvcc's parent."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return home
    if Path("/usr/local/cuda/bin/nvcc").exists():  # /usr/local/bin/nvcc may be a wrapper: its parent has no lib64
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = Path(nvcc).resolve().parent.parent
        if (home / "lib64").is_dir() or (home / "lib").is_dir():
            return str(home)
    return None


def find_cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")


def nvcc_archs(cuda_home: str) -> set[str]:
    """Compute capabilities this nvcc can target, from ``nvcc --list-gpu-arch`` (``compute_90`` -> ``90``)."""
    out = subprocess.run(
        [str(Path(cuda_home) / "bin" / "nvcc"), "--list-gpu-arch"], capture_output=True, text=True, check=True
    ).stdout
    return {line.strip().removeprefix("compute_") for line in out.split() if line.strip().startswith("compute_")}


def cuda_archs(cuda_home: str, requested: str | None = None) -> list[str]:
    """The requested architectures (``METAGPT_FAST_CUDA_ARCHS``, default 80;90) that nvcc supports.

    Raises ValueError when one is not supported: a silent drop would ship a library without the kernels asked for.
    """
    requested = requested or os.environ.get("METAGPT_FAST_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS
    archs = [a.strip().removeprefix("sm_").removeprefix("compute_") for a in requested.replace(",", ";").split(";")]
    archs = [a for a in archs if a]
    supported = nvcc_archs(cuda_home)
    missing = [a for a in archs if a not in supported]
    if missing:
        raise ValueError(
            f"METAGPT_FAST_CUDA_ARCHS asks for {missing}, which nvcc in {cuda_home} cannot target "
            f"(it supports {sorted(supported)})"
        )
    return archs


def debug() -> bool:
    return flag("METAGPT_FAST_DEBUG")


def cxx_flags(with_cuda: bool) -> list[str]:
    # No -std: torch's build adds the standard its headers need (C++17 or C++20 depending on the version).
    # -fopenmp: at::parallel_for is an inline template whose OpenMP pragma is compiled into this library; without
    # the flag it silently runs on one thread. libgomp.so.1 is then shared with torch (same soname, loaded once).
    flags = ["-fvisibility=hidden", "-fopenmp"]
    flags += ["-O0", "-g", "-DMETAGPT_FAST_DEBUG"] if debug() else ["-O3"]
    if with_cuda:
        flags.append(f"-D{CUDA_MACRO}")
    return flags


def ld_flags() -> list[str]:
    return ["-fopenmp"]


def nvcc_flags(archs: list[str]) -> list[str]:
    flags = [f"-D{CUDA_MACRO}", "--expt-relaxed-constexpr", f"--threads={os.environ.get('NVCC_THREADS', '2')}"]
    flags += ["-O0", "-g", "-lineinfo", "-DMETAGPT_FAST_DEBUG"] if debug() else ["-O3", "-lineinfo"]
    for arch in archs:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return flags


def include_dirs(root: Path) -> list[str]:
    return [str(root / "include")]


# --------------------------------------------------------------------------------------------------------- loading


def cuda_part_wanted() -> tuple[str | None, str | None]:
    """(cuda_home, None) when a build (setup.py or JIT) should include the CUDA kernels, else (None, why not)."""
    import torch

    if flag("METAGPT_FAST_SKIP_CUDA_BUILD"):
        return None, "METAGPT_FAST_SKIP_CUDA_BUILD is set"
    if torch.version.cuda is None:
        return None, "this torch build has no CUDA"
    home = find_cuda_home()
    if home is None:
        return None, "nvcc not found (set CUDA_HOME)"
    return home, None


def _jit_build(verbose: bool):
    import torch
    from torch.utils import cpp_extension

    root = csrc_dir()
    if root is None:
        raise RuntimeError("the csrc/ sources are not available (installed without them)")
    if find_cxx() is None:
        raise RuntimeError("no C++ compiler found (set CXX)")
    cuda_home, no_cuda = cuda_part_wanted()
    archs: list[str] = []
    if cuda_home is not None:
        os.environ.setdefault("CUDA_HOME", cuda_home)
        cpp_extension.CUDA_HOME = cuda_home  # read at import time; torch may have been imported with another
        if os.environ.get("METAGPT_FAST_CUDA_ARCHS") or not torch.cuda.is_available():
            archs = cuda_archs(cuda_home)
        else:  # the visible GPU only: a third of the compile time of the default list
            major, minor = torch.cuda.get_device_capability()
            archs = cuda_archs(cuda_home, f"{major}{minor}")
    with_cuda = cuda_home is not None
    srcs = sources(root, with_cuda)
    what = f"C++ CPU{' + CUDA (sm_' + ', sm_'.join(archs) + ')' if with_cuda else ''}"
    print(
        f"metagpt_fast: building the {what} extension from {len(srcs)} sources with ninja "
        f"(first use only, cached afterwards; a few minutes){'' if with_cuda else f' [no CUDA part: {no_cuda}]'}...",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    module = cpp_extension.load(
        name=JIT_NAME,
        sources=srcs,
        extra_include_paths=include_dirs(root),
        extra_cflags=cxx_flags(with_cuda),
        extra_cuda_cflags=nvcc_flags(archs) if with_cuda else None,
        extra_ldflags=ld_flags(),
        with_cuda=with_cuda,
        is_python_module=True,
        verbose=verbose,
    )
    print(f"metagpt_fast: extension ready ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return module


def load(verbose: bool = False):
    """The extension module, building it just in time if needed; None (see :func:`unavailable_reason`) if it can't."""
    global _module, _reason, _attempted
    if _attempted:
        return _module
    _attempted = True
    import torch  # noqa: F401  (loads libtorch, which the extension links against)

    try:
        _module = importlib.import_module(EXTENSION_NAME)
        return _module
    except ImportError as exc:
        prebuilt = f"prebuilt {EXTENSION_NAME} not importable ({exc})"
    if flag("METAGPT_FAST_NO_JIT"):
        _reason = f"{prebuilt}; JIT build disabled by METAGPT_FAST_NO_JIT"
        return None
    try:
        _module = _jit_build(verbose)
    except Exception as exc:  # noqa: BLE001  (a missing toolchain must never break the package)
        lines = str(exc).strip().splitlines()
        _reason = f"{prebuilt}; JIT build failed: {type(exc).__name__}: {lines[-1] if lines else ''}"
        _module = None
    return _module


def unavailable_reason() -> str | None:
    """Why the extension could not be loaded (None if it is loaded); triggers :func:`load` if not yet attempted."""
    load()
    return _reason


def has_cuda_kernels() -> bool:
    """True when the loaded extension registered CUDA kernels (its CUDA part was built)."""
    if load() is None:
        return False
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key("metagpt_fast::rotary", "CUDA")
