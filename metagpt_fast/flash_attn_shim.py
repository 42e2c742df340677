"""An opt-in ``flash_attn`` module for machines without flash-attn, so code written against it runs unchanged::

    import metagpt_fast.flash_attn_shim

    metagpt_fast.flash_attn_shim.install()  # True: `import flash_attn` now gives metagpt_fast's functions
    from flash_attn import flash_attn_func  # on CPU, CUDA (Triton / CUDA / C++ kernels) or any device (reference)

:func:`install` registers two modules in ``sys.modules``, ``flash_attn`` and ``flash_attn.flash_attn_interface``,
holding :func:`metagpt_fast.flash_attn_func` and its varlen / packed forms (and ``flash_attn_with_kvcache`` when the
package has it). It never shadows a real flash-attn: when one is importable (``importlib.util.find_spec``) or another
``flash_attn`` module is already imported, it installs nothing and returns False (``reason()`` says why).
:func:`uninstall` removes the shim's modules again.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import metagpt_fast

__all__ = ["FUNCTIONS", "install", "installed", "reason", "uninstall"]

FUNCTIONS = (
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
)
"""The names the shim exports (``flash_attn_with_kvcache`` only where the package provides it)."""

MODULES = ("flash_attn", "flash_attn.flash_attn_interface")
# flash-attn's API level the functions follow (softcap came with flash-attn 2.6); the local part says who serves it.
VERSION = "2.6.3+metagpt_fast"
_MARK = "__metagpt_fast_shim__"
_reason: str | None = None


def installed() -> bool:
    """Whether the shim's ``flash_attn`` module is the one in ``sys.modules``."""
    return getattr(sys.modules.get("flash_attn"), _MARK, False)


def reason() -> str | None:
    """Why the last :func:`install` installed nothing (None after a successful one)."""
    return _reason


def _real_flash_attn() -> str | None:
    """Why a real flash-attn is there (already imported, or importable), or None."""
    module = sys.modules.get("flash_attn")
    if module is not None:
        return f"a flash_attn module is already imported ({getattr(module, '__file__', None) or module!r})"
    try:
        spec = importlib.util.find_spec("flash_attn")
    except (ImportError, ValueError) as exc:  # a broken installation is still an installation: leave it alone
        return f"flash_attn is installed but its spec cannot be read ({type(exc).__name__}: {exc})"
    if spec is not None:
        return f"flash_attn is installed at {spec.origin or spec.submodule_search_locations}"
    return None


def _module(name: str, doc: str, package: bool) -> types.ModuleType:
    module = types.ModuleType(name, doc)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        module.__path__ = []
    setattr(module, _MARK, True)
    for function in FUNCTIONS:
        if hasattr(metagpt_fast, function):
            setattr(module, function, getattr(metagpt_fast, function))
    module.__all__ = [f for f in FUNCTIONS if hasattr(module, f)]
    return module


def install(*, strict: bool = False) -> bool:
    """Registers the shim as ``flash_attn`` if no real flash-attn is importable; returns whether it did.

    ``strict=True`` raises ``ImportError`` with the reason instead of returning False. Installing twice is a no-op
    that returns True.
    """
    global _reason
    if installed():
        _reason = None
        return True
    why = _real_flash_attn()
    if why is not None:
        _reason = f"the flash_attn shim is not installed: {why}; it never shadows a real flash-attn"
        if strict:
            raise ImportError(_reason)
        return False
    package = _module("flash_attn", "flash-attn's API served by metagpt_fast (metagpt_fast.flash_attn_shim).", True)
    package.__version__ = VERSION
    interface = _module("flash_attn.flash_attn_interface", "flash-attn's interface, served by metagpt_fast.", False)
    package.flash_attn_interface = interface
    sys.modules["flash_attn"] = package
    sys.modules["flash_attn.flash_attn_interface"] = interface
    _reason = None
    return True


def uninstall() -> bool:
    """Removes the shim's modules from ``sys.modules``; returns whether they were there (a real flash-attn is never
    touched)."""
    if not installed():
        return False
    for name in MODULES:
        if getattr(sys.modules.get(name), _MARK, False):
            del sys.modules[name]
    return True
