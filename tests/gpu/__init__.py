"""GPU tests (run on the accelerator machine; skipped where CUDA or Triton is missing, as on CI)."""

import importlib.util

import pytest
import torch

# the marks of every test module that runs ffnkit's Triton kernels: `pytestmark = NEEDS_CUDA_TRITON`
NEEDS_CUDA_TRITON = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
        reason="needs a CUDA device and Triton",
    ),
]
