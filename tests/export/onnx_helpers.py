"""Helpers of the ONNX tests (import as `from onnx_helpers import ...`)."""
from __future__ import annotations

import contextlib

import torch

ORT_THREADS = 1  # for ort_sample.OnnxModel(threads=...) and the sessions the tests open


@contextlib.contextmanager
def one_torch_thread():
    """torch on one thread inside the block (restored after).

    These shapes are too small to gain from a second thread, and on a loaded two-core machine
    OpenMP's spinning threads made one tiny forward 10 to 60 times slower (measured 0.6-3.4 s
    against 0.05 s).
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
