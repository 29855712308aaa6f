"""Test-wide setup.

Without CUDA the Triton kernels run under Triton's interpreter, which must be switched on before
Triton is imported; this file is loaded before any test module. The `gpu` marker tags tests that
need a CUDA device (they skip themselves without one).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many small ops: on a shared 2-core machine, threads
    spin-waiting for each other made a tiny training step 20x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
