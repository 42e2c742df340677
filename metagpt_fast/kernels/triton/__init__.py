"""Triton kernels and launchers. Importing this package needs triton; the registry imports it lazily."""
