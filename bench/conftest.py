"""pytest-benchmark suites of fastddpm: collection, devices and the numbers every result records.

    pytest bench/ --benchmark-only                 # every suite; CUDA cases skip without a GPU
    pytest bench/ --benchmark-only -m gpu          # only the CUDA cases (bench/gpu_check.sh)

bench/ lies outside `testpaths`, so the test command never runs it. Files here are named
bench_*.py (collected by the hook below, not by pytest's test_*.py rule) and hold test_*
functions. A test that takes a `device` argument runs once per device: "cpu", and "cuda"
marked `gpu` and skipped without CUDA. The `case` fixture says what to time there: the tiny
preset on a CPU (so the suite runs in minutes on two cores), the cifar10 preset at batch 256
on a GPU (the size the DDPM paper's sampling figures are quoted at).

Timing rules every suite keeps: the timed function ends with a device synchronize (`synced`);
compilation, capture and autotuning happen in an untimed first call (the `first_call` fixture,
whose seconds go into extra_info as first_call_s); the `record_rates` fixture turns the median
into images/s and achieved TFLOP/s (FLOPs from torch's FLOP counter via `case.gflop_per_image`).
"""
from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass

import pytest
import torch

from fastddpm.backends import get_backend
from fastddpm.bench import random_model
from fastddpm.errors import BackendUnavailableError
from fastddpm.generate import forward_gflops
from fastddpm.unet import PRESETS


def pytest_addoption(parser):
    parser.addoption("--bench-cpu-compile", action="store_true", default=False,
                     help="also time torch.compile cases on the CPU (inductor takes about a minute per case "
                          "on a small CPU, so they are skipped by default)")
    parser.addoption("--bench-cpu-cifar10", action="store_true", default=False,
                     help="also time the cifar10 preset on the CPU in bench_onnx.py (minutes a case)")
    parser.addoption("--bench-jsonl", default=None, metavar="FILE",
                     help="append each timed case to FILE as one JSON line as soon as it finishes (what a "
                          "time-out leaves; --benchmark-json is written only at the end); every suite may "
                          "append to one FILE: each line names its suite")


def pytest_collect_file(file_path, parent):
    """Collect bench/bench_*.py as test modules (pytest's default rule wants test_*.py).

    A file named on the command line is collected by pytest itself, so it is left alone here.
    """
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    """Run every test that takes `device` on the CPU and, marked gpu, on CUDA."""
    if "device" not in metafunc.fixturenames:
        return
    for marker in metafunc.definition.iter_markers("parametrize"):
        if "device" in [n.strip() for n in (marker.args[0].split(",") if isinstance(marker.args[0], str)
                                            else marker.args[0])]:
            return  # the suite chose its own devices
    metafunc.parametrize("device", [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)])


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


def pytest_benchmark_update_machine_info(config, machine_info):
    """What moves the numbers besides the code: the accelerator, torch, the threads.

    Only what stays put between runs on one machine: pytest-benchmark warns when a compared
    run's machine_info differs. The load, which does not, goes into each case's extra_info.
    """
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "torch_threads": torch.get_num_threads(),
            # whether fp32 cases ran their convolutions / matmuls in TF32 (cuDNN's default: yes)
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    machine_info["fastddpm"] = info


@pytest.fixture(autouse=True)
def _append_result(request):
    """With --bench-jsonl FILE: after each timed case, one line {suite, name, median_s, iqr_s, rounds,
    extra_info}; suite is the file's name without bench_ ("kernels" for bench_kernels.py)."""
    yield
    path = request.config.getoption("--bench-jsonl")
    benchmark = request.node.funcargs.get("benchmark") if path else None
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is None:  # not a benchmark, skipped before timing, or --benchmark-disable
        return
    suite = request.node.path.stem.removeprefix("bench_")
    record = {"suite": suite, "name": request.node.nodeid, "median_s": stats.median, "iqr_s": stats.iqr,
              "rounds": stats.rounds,
              "extra_info": benchmark.extra_info}
    with open(path, "a") as f:  # one write of one line: a kill leaves whole lines before it
        f.write(json.dumps(record, default=str) + "\n")


@dataclass(frozen=True)
class BenchCase:
    """What a suite times on one device: a preset at a batch size, and a short sampling run."""

    device: torch.device
    preset: str
    batch: int
    short_steps: int  # steps of the "short sampling run"

    @property
    def gflop_per_image(self) -> float:
        return forward_gflops(PRESETS[self.preset])

    def shape(self) -> tuple[int, int, int, int]:
        c = PRESETS[self.preset]
        return (self.batch, c.in_channels, c.image_size, c.image_size)

    def model(self, precision: str) -> torch.nn.Module:
        """Seeded random weights (output convs re-randomised); bf16 in channels-last, fp32 in NCHW."""
        model = random_model(self.preset, self.device)
        if precision == "bf16":
            return model.to(torch.bfloat16).to(memory_format=torch.channels_last)
        return model

    def inputs(self, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh x_t [B, C, H, W] ~ N(0, 1) and timesteps t [B] in 0..999 (never zeros)."""
        gen = torch.Generator(self.device).manual_seed(1)
        x = torch.randn(self.shape(), generator=gen, device=self.device)
        t = torch.randint(0, 1000, (self.batch,), generator=gen, device=self.device)
        if precision == "bf16":
            x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        return x, t


@pytest.fixture
def case(device) -> BenchCase:
    if device == "cuda":
        return BenchCase(torch.device("cuda"), "cifar10", batch=256, short_steps=20)
    return BenchCase(torch.device("cpu"), "tiny", batch=8, short_steps=5)


@pytest.fixture
def usable_backend(request):
    """usable_backend(name, device) -> the fastddpm Backend, or a skip saying why it cannot run here.

    Skips what backends.check refuses (not implemented, no CUDA, no Triton, ...) and, unless
    --bench-cpu-compile is given, torch.compile on the CPU.
    """
    def get(name: str, device: torch.device):
        backend = get_backend(name)
        try:
            backend.check(device)
        except BackendUnavailableError as e:
            pytest.skip(str(e))
        if name == "compile" and device.type == "cpu" and not request.config.getoption("--bench-cpu-compile"):
            pytest.skip("torch.compile on the CPU takes about a minute per case; pass --bench-cpu-compile")
        return backend
    return get


def _synced(fn, device: torch.device):
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out
    return run


def _first_call(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _record_rates(benchmark, *, images: int, gflop: float, first_call_s: float, **extra) -> None:
    info = benchmark.extra_info
    info.update(extra, images_per_call=images, gflop_per_call=gflop, first_call_s=first_call_s)
    if hasattr(os, "getloadavg"):  # other work on the machine moves CPU timings
        info["load_average"] = os.getloadavg()[0]
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    median = stats.stats.median
    info["images_per_s"] = images / median
    info["tflops"] = gflop / median / 1000.0


@pytest.fixture
def synced():
    """synced(fn, device): fn followed by a device synchronize, so a timed call ends when the GPU's work does."""
    return _synced


@pytest.fixture
def first_call():
    """first_call(fn) -> seconds of one untimed call (compilation, capture and autotuning land there)."""
    return _first_call


@pytest.fixture
def record_rates(benchmark):
    """record_rates(images=, gflop=, first_call_s=, **extra): extra_info from the benchmark's median.

    images: images one timed call produces (or runs a forward for); gflop: FLOP of one call / 1e9.
    Adds images_per_s and achieved tflops (not under --benchmark-disable, which times nothing) and
    the 1-minute load average.
    """
    return functools.partial(_record_rates, benchmark)

