"""One U-Net forward, per backend and precision.

    pytest bench/bench_unet.py --benchmark-only

Each case times model(x_t, t) for a batch (see conftest's `case`: tiny at batch 8 on a CPU,
cifar10 at batch 256 on a GPU) the way `sample` calls it under that backend: the backend's
model wrapper (torch.compile for "compile") and its GroupNorm+SiLU implementation (the Triton
kernel for "triton") swapped in. Backends that own the whole sampling loop ("graph", "onnx")
have no forward of their own to time here; bench_sampling.py's short run times them.

Precision: fp32 in NCHW (the reference's), bf16 in channels-last (the fast paths').
extra_info: images_per_s and tflops (12.44 GFLOP per cifar10 image, attention included).
"""
from __future__ import annotations

import pytest
import torch

from fastddpm.backends import group_norm_impl

BACKENDS = ("reference", "triton", "compile", "graph", "onnx")
PRECISIONS = ("fp32", "bf16")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_unet_forward(benchmark, case, backend_name, precision, usable_backend, synced, first_call,
                      record_rates):
    backend = usable_backend(backend_name, case.device)
    if backend.run is not None:
        pytest.skip(f"backend {backend_name!r} owns the whole sampling loop; timed in bench_sampling.py")
    model = case.model(precision)
    fn = backend.prepare_model(model) if backend.prepare_model is not None else model
    x, t = case.inputs(precision)

    def forward():
        return fn(x, t)

    with torch.no_grad(), group_norm_impl(model, backend.group_norm_silu):
        timed = synced(forward, case.device)
        first_s = first_call(timed)
        out = benchmark(timed)
    assert out.shape == x.shape and torch.isfinite(out.float()).all()
    record_rates(images=case.batch, gflop=case.gflop_per_image * case.batch, first_call_s=first_s,
                 preset=case.preset, batch=case.batch, precision=precision, backend=backend_name)
