"""ONNX Runtime against PyTorch eager: one eps-model call and a short sampling run.

    pytest bench/bench_onnx.py --benchmark-only            # the suite (CPU cases; CUDA ones skip)
    pytest bench/bench_onnx.py --benchmark-only -m gpu     # ORT CUDA vs the graph backend and diffusers
    python bench/bench_onnx.py [--presets tiny,cifar10]    # the CPU table with ratios, for the report

What is timed (the export itself is done once per case, untimed):
  eps call   tiny at batch 8 and cifar10 at batch 4 on a CPU, cifar10 at batch 256 on CUDA:
             eager-fp32   the reference U-Net, model(x, t) under no_grad
             ort-fp32     ONNX Runtime, GroupNorm as InstanceNormalization (the export default)
             ort-fp32-gn21  the same with GroupNormalization-21 (the GroupNorm form decision)
             ort-fp16     fp16 graph (on a CPU, ORT runs fp16 nodes without an fp16 kernel
                          through inserted casts)
  short run  from x_T to x_0 over a respaced process (5 steps on a CPU, 20 on CUDA):
             reference    fastddpm.sample(..., backend="reference"), fp32
             ort-eps      export/ort_sample.py's loop with the eps graph (numpy update), fp32
             ort-step     the same loop with the whole-step graph, fp32 (and -fp16)
             graph, diffusers  (CUDA only) the CUDA-graph backend and diffusers' DDPMPipeline loop

ORT sessions use ONNX Runtime's default threads (the physical cores) and torch its default
(torch.get_num_threads()); both are recorded in extra_info. extra_info: images_per_s.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import time

import numpy as np
import pytest
import torch

# skipped, not a collection error, where onnx or onnxruntime is missing (gpu_check's onnx step)
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fastddpm.bench import random_model  # noqa: E402
from fastddpm.export import ort_sample  # noqa: E402
from fastddpm.export.onnx_export import build_onnx  # noqa: E402
from fastddpm.generate import default_diffusion, respaced_for  # noqa: E402
from fastddpm.sampling import sample  # noqa: E402

CPU_CASES = {"tiny": 8, "cifar10": 4}  # preset -> batch of a CPU case
CUDA_CASE = ("cifar10", 256)
EPS_ENGINES = ("eager-fp32", "ort-fp32", "ort-fp32-gn21", "ort-fp16")
RUN_ENGINES = ("reference", "ort-eps-fp32", "ort-step-fp32", "ort-step-fp16", "graph", "diffusers")
ORT_VARIANTS = {  # engine -> build_onnx keyword arguments
    "ort-fp32": dict(), "ort-fp32-gn21": dict(group_norm="groupnorm21"), "ort-fp16": dict(dtype="fp16"),
    "ort-eps-fp32": dict(), "ort-step-fp32": dict(step_graph=True),
    "ort-step-fp16": dict(step_graph=True, dtype="fp16"),
}


@functools.lru_cache(maxsize=4)
def _model(preset: str):
    return random_model(preset, torch.device("cpu"))


_THREADS = 0  # ONNX Runtime intra-op threads (0: its default, the physical cores); the table's --threads


@functools.lru_cache(maxsize=16)
def _ort_model(preset: str, engine: str, provider: str) -> ort_sample.OnnxModel:
    """The preset's random model exported as `engine` asks, opened on `provider` (export untimed, cached)."""
    proto = build_onnx(_model(preset), default_diffusion(), **ORT_VARIANTS[engine])
    return ort_sample.OnnxModel(proto.SerializeToString(), provider=provider, threads=_THREADS)


def _inputs(preset: str, batch: int):
    c = _model(preset).config
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, c.in_channels, c.image_size, c.image_size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    return x, t


def eps_call(preset: str, batch: int, engine: str, device: str = "cpu"):
    """A no-argument function running one eps-model call of `engine` on fresh inputs."""
    x, t = _inputs(preset, batch)
    if engine == "eager-fp32":
        model = copy.deepcopy(_model(preset)).to(device)
        x, t = x.to(device), t.to(device)

        def run():
            with torch.no_grad():
                out = model(x, t)
            if device == "cuda":
                torch.cuda.synchronize()
            return out
        return run
    onnx_model = _ort_model(preset, engine, "cuda" if device == "cuda" else "cpu")
    xn, tn = x.numpy(), t.numpy()
    return lambda: onnx_model.eps(xn, tn)


def short_run(preset: str, batch: int, steps: int, engine: str, device: str = "cpu"):
    """A no-argument function sampling `batch` images in `steps` steps with `engine`."""
    full = default_diffusion()
    process = respaced_for(full, steps, "ancestral")
    c = _model(preset).config
    shape = (batch, c.in_channels, c.image_size, c.image_size)
    if engine in ("reference", "graph"):
        model = copy.deepcopy(_model(preset)).to(device)
        if engine == "graph":
            model = model.to(torch.float16)

        def run():
            x = sample(model, process, shape, seed=0, backend=engine)
            if device == "cuda":
                torch.cuda.synchronize()
            return x
        return run
    if engine == "diffusers":
        return _diffusers_run(_model(preset).config, shape, steps)
    onnx_model = _ort_model(preset, engine, "cuda" if device == "cuda" else "cpu")
    ours = ort_sample.Process.from_full(onnx_model.betas, steps, "ancestral", "eps", "fixedlarge")
    return lambda: ort_sample.sample_loop(onnx_model, ours, shape, seed=0)


def _diffusers_run(config, shape, steps: int):
    """diffusers' DDPMPipeline loop (UNet2DModel in the DDPM layout, fp16, random weights) on CUDA."""
    from diffusers import DDPMScheduler, UNet2DModel

    from fastddpm.bench import DDPM_SCHEDULER_CONFIG, diffusers_unet_kwargs

    unet = UNet2DModel(**diffusers_unet_kwargs(config)).to("cuda", torch.float16).eval()
    scheduler = DDPMScheduler(**DDPM_SCHEDULER_CONFIG)

    @torch.no_grad()
    def run():
        scheduler.set_timesteps(steps, device="cuda")
        x = torch.randn(shape, device="cuda", dtype=torch.float16)
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample
        torch.cuda.synchronize()
        return x
    return run


def _case(device: str, preset: str, config=None):
    if device == "cpu" and preset == "cifar10" and config is not None and not config.getoption("--bench-cpu-cifar10"):
        pytest.skip("cifar10 on a CPU takes minutes a case: pass --bench-cpu-cifar10 (or run this file as a script)")
    if device == "cuda":
        if preset != CUDA_CASE[0]:
            pytest.skip(f"on CUDA only {CUDA_CASE[0]} at batch {CUDA_CASE[1]} is timed")
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            pytest.skip("needs onnxruntime-gpu (the CUDA execution provider)")
        return CUDA_CASE[1], 20
    return CPU_CASES[preset], 5


def _threads(benchmark, engine: str) -> None:
    benchmark.extra_info.update(engine=engine, torch_threads=torch.get_num_threads(),
                                ort_threads="default (physical cores)")


# ------------------------------------------------------------------------------------------ pytest
@pytest.mark.parametrize("engine", EPS_ENGINES)
@pytest.mark.parametrize("preset", tuple(CPU_CASES))
def test_eps_call(benchmark, device, preset, engine, pytestconfig):
    batch, _ = _case(device, preset, pytestconfig)
    fn = eps_call(preset, batch, engine, device)
    fn()  # first call untimed: ORT's graph optimisation, oneDNN's primitive creation
    out = benchmark.pedantic(fn, rounds=5 if preset == "tiny" else 3, iterations=1, warmup_rounds=1)
    assert np.isfinite(np.asarray(out if isinstance(out, np.ndarray) else out.float().cpu())).all()
    _threads(benchmark, engine)
    benchmark.extra_info.update(preset=preset, batch=batch)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median


@pytest.mark.parametrize("engine", RUN_ENGINES)
@pytest.mark.parametrize("preset", tuple(CPU_CASES))
def test_short_run(benchmark, device, preset, engine, pytestconfig):
    batch, steps = _case(device, preset, pytestconfig)
    if engine in ("graph", "diffusers") and device != "cuda":
        pytest.skip(f"{engine} is a CUDA comparison")
    if engine == "diffusers":
        pytest.importorskip("diffusers")
    fn = short_run(preset, batch, steps, engine, device)
    fn()
    out = benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=0)
    assert out.shape[0] == batch
    _threads(benchmark, engine)
    benchmark.extra_info.update(preset=preset, batch=batch, steps=steps)
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info.update(images_per_s=batch / median, ms_per_step=1000.0 * median / steps)


# ------------------------------------------------------------------------------------------ table
def _medians(fns: dict, repeat: int) -> dict:
    """Median seconds of each fn, timed round-robin (engine after engine, `repeat` rounds) after
    one untimed call each, so a change in machine load hits every engine alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    """Print the CPU table: images/s of each engine and its ratio to PyTorch eager fp32."""
    import onnxruntime

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,cifar10")
    p.add_argument("--repeat", type=int, default=5, help="timed rounds per engine (round-robin)")
    p.add_argument("--steps", type=int, default=5, help="steps of the short run")
    p.add_argument("--threads", type=int, default=0,
                   help="threads for both torch and ONNX Runtime (0: each library's default)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        global _THREADS
        _THREADS = args.threads
    machine = {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__,
               "ort_threads": args.threads or "default", "load_average_start": os.getloadavg()}
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; torch {machine['torch']} "
          f"({machine['torch_threads']} threads), onnxruntime {machine['onnxruntime']} "
          f"({machine['ort_threads']} threads); load average {machine['load_average_start'][0]:.2f}")
    rows = []
    for preset in args.presets.split(","):
        batch = CPU_CASES[preset]
        for what, engines, make in (
                ("eps call", EPS_ENGINES, lambda e: eps_call(preset, batch, e)),
                (f"{args.steps}-step run", RUN_ENGINES[:4], lambda e: short_run(preset, batch, args.steps, e))):
            medians = _medians({e: make(e) for e in engines}, args.repeat)
            base = medians[engines[0]]
            for engine in engines:
                sec = medians[engine]
                rows.append(dict(preset=preset, what=what, engine=engine, batch=batch, seconds=sec,
                                 images_per_s=batch / sec, vs_eager=base / sec))
                print(f"{preset:8} {what:11} {engine:14} batch {batch:3}: {sec * 1000:9.1f} ms "
                      f"{batch / sec:9.2f} img/s  x{base / sec:.2f} vs {engines[0]}", flush=True)
    machine["load_average_end"] = os.getloadavg()
    print(f"load average at the end {machine['load_average_end'][0]:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
