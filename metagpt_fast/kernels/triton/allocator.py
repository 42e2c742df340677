"""Global scratch memory for kernels that build tensor descriptors on the device.

Triton asks for that memory from the allocator set with ``triton.set_allocator`` (per thread: a ContextVar). The
attention and flash-attention launchers call :func:`ensure_allocator` before such a launch.
"""

import torch
import triton

from metagpt_fast._spec import triton_interpreted

INTERPRETED = triton_interpreted()


def _scratch(device: torch.device):
    def allocate(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)

    return allocate


def ensure_allocator(device: torch.device) -> None:
    """Unless the caller (or torch.compile's generated code) has set an allocator, set one that takes the scratch
    memory from torch's allocator on ``device`` (on the CPU under the interpreter)."""
    try:
        from triton.runtime import _allocation

        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):  # the private module moved: set ours
        unset = True
    if unset:
        triton.set_allocator(_scratch(torch.device("cpu") if INTERPRETED else device))
