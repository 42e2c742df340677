"""Kernel sources: Triton kernels and their launchers (``triton/``); C++/CUDA kernels live in ``csrc/``."""
