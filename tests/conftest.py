"""Test setup: without a GPU, Triton kernels run under the interpreter (set before triton is first imported)."""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

try:  # property-test profiles (HYPOTHESIS_PROFILE=ci|dev); hypothesis comes with the test extra
    import hypothesis_profiles
except ImportError:
    pass
else:
    hypothesis_profiles.load_profile()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
