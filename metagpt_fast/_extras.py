"""Optional dependencies: imported only where used, with an error that names the extra to install.

``rich`` (tables, progress bars) and ``matplotlib`` (plots) serve the benchmark and profiling tooling only, so they
live in the ``bench`` extra; ``import metagpt_fast``, ``metagpt-fast info``, ``train`` and ``generate`` work without
them. A leaf module: it imports nothing from the package.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA_OF = {"rich": "bench", "matplotlib": "bench"}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra provides it."""


def import_optional(module: str, purpose: str) -> ModuleType:
    """``importlib.import_module(module)``, raising :class:`MissingExtraError` (naming the extra) when the
    distribution is missing. ``purpose`` completes "... is needed for <purpose>"."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.partition(".")[0]
        extra = EXTRA_OF.get(top, "bench")
        raise MissingExtraError(
            f'{top} is needed for {purpose}; install it with: pip install "metagpt-fast[{extra}]"'
        ) from exc


def has_module(module: str) -> bool:
    """Whether ``module`` imports (for code that has a plain fallback)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True
