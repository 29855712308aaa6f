"""One reverse-process step, and a short sampling run, per backend and precision.

    pytest bench/bench_sampling.py --benchmark-only

test_sampling_step  the body of the sampling loop once, at the middle step of a short respaced
                    process: the model under the backend (prepared as `sample` prepares it) and
                    the backend's step update (the fused Triton step for "triton", else
                    sampling.reference_step). State in float32, the model in its precision.
                    Backends that own the whole loop ("graph", "onnx") are timed by the run below.
test_short_run      `sample(...)` from x_T to x_0 over `case.short_steps` steps (5 on a CPU with
                    the tiny preset, 20 on a GPU with cifar10 at batch 256), every backend.

Precision: fp32 in NCHW, bf16 in channels-last. extra_info: images_per_s, tflops (forward
FLOPs only: the step update's few FLOP per element are left out) and, for the run, ms_per_step.
"""
from __future__ import annotations

import pytest
import torch

from fastddpm.backends import group_norm_impl
from fastddpm.errors import FastDDPMError
from fastddpm.generate import default_diffusion, respaced_for
from fastddpm.sampling import reference_step, sample

BACKENDS = ("reference", "triton", "compile", "graph", "onnx")
PRECISIONS = ("fp32", "bf16")


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_sampling_step(benchmark, case, backend_name, precision, usable_backend, synced, first_call,
                       record_rates):
    backend = usable_backend(backend_name, case.device)
    if backend.run is not None:
        pytest.skip(f"backend {backend_name!r} owns the whole sampling loop; timed by test_short_run")
    process = respaced_for(default_diffusion(), case.short_steps, "ancestral")
    k = process.num_steps // 2
    model = case.model(precision)
    fn = backend.prepare_model(model) if backend.prepare_model is not None else model
    step = backend.step or reference_step
    x, _ = case.inputs("fp32")  # the sampler's state stays float32
    t = process.tables(case.device, torch.float32)["timesteps"][k].expand(case.batch)
    model_dtype = next(model.parameters()).dtype

    def one_step():
        out = fn(x.to(model_dtype), t).to(torch.float32)
        return step(process, x, k, out, seed=0)[0]

    with torch.no_grad(), group_norm_impl(model, backend.group_norm_silu):
        timed = synced(one_step, case.device)
        first_s = first_call(timed)
        x_prev = benchmark(timed)
    assert x_prev.shape == x.shape and torch.isfinite(x_prev).all()
    record_rates(images=case.batch, gflop=case.gflop_per_image * case.batch, first_call_s=first_s,
                 preset=case.preset, batch=case.batch, precision=precision, backend=backend_name, k=k)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_short_run(benchmark, case, backend_name, precision, usable_backend, synced, first_call, record_rates):
    usable_backend(backend_name, case.device)
    process = respaced_for(default_diffusion(), case.short_steps, "ancestral")
    model = case.model(precision)

    def run():
        return sample(model, process, case.shape(), seed=0, backend=backend_name)

    timed = synced(run, case.device)
    try:
        first_s = first_call(timed)
    except FastDDPMError as e:  # a backend that refuses this configuration at run time
        pytest.skip(str(e))
    x0 = benchmark(timed)
    assert x0.shape == case.shape() and torch.isfinite(x0).all()
    steps = process.num_steps
    record_rates(images=case.batch, gflop=case.gflop_per_image * case.batch * steps, first_call_s=first_s,
                 preset=case.preset, batch=case.batch, precision=precision, backend=backend_name, steps=steps)
    if benchmark.stats is not None:
        benchmark.extra_info["ms_per_step"] = 1000.0 * benchmark.stats.stats.median / steps
