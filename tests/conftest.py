"""Test-wide setup.

Without CUDA the Triton kernels run under Triton's interpreter, which must be switched on before
Triton is imported; this file is loaded before any test module. The `gpu` marker tags tests that
need a CUDA device (they skip themselves without one).

Every test runs with TF32 off (`_exact_fp32`, autouse): on Ampere and Hopper, cuDNN runs float32
convolutions in TF32 by default (10 mantissa bits), and a CPU emulation of TF32 convolutions on
the tiny preset put the per-step trajectory error past 1e-4 by step 4 of 10, far outside the
1e-5 the fp32 comparisons with the reference allow. On a CPU the flags change nothing.
"""
import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def fp32_settings() -> tuple[bool, bool, str]:
    """(matmul allow_tf32, cudnn allow_tf32, float32 matmul precision): what decides TF32 for fp32 ops."""
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


def set_fp32_settings(settings: tuple[bool, bool, str]) -> None:
    """Set the three of fp32_settings() (the legacy flags: torch 2.11 on the GPU machine reads them)."""
    matmul, cudnn, precision = settings
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn
    torch.set_float32_matmul_precision(precision)


@contextlib.contextmanager
def exact_fp32():
    """TF32 off for cuBLAS matmuls and cuDNN convolutions inside the block, restored afterwards.

    Through the legacy flags, as the rest of the project uses; where something set torch's newer
    fp32_precision API, torch (2.9+) refuses legacy reads, and that API is saved and set instead.
    """
    try:
        before = fp32_settings()
    except RuntimeError:  # "mix of the legacy and new APIs"
        with _exact_fp32_new_api():
            yield
        return
    set_fp32_settings((False, False, "highest"))
    try:
        yield
    finally:
        set_fp32_settings(before)


@contextlib.contextmanager
def _exact_fp32_new_api():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    matmul.fp32_precision = conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


@pytest.fixture(autouse=True)
def _exact_fp32():
    """Every test runs inside exact_fp32() (see the module docstring)."""
    with exact_fp32():
        yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many small ops: on a shared 2-core machine, threads
    spin-waiting for each other made a tiny training step 20x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
