"""Test-wide setup.

Without CUDA the Triton kernels run under Triton's interpreter, which must be switched on before
Triton is imported; this file is loaded before any test module. The `gpu` marker tags tests that
need a CUDA device (they skip themselves without one).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
