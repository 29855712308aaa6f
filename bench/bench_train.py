"""Training throughput: one optimizer step of the trainer, per precision, eager and compiled.

    pytest bench/bench_train.py --benchmark-only              # CPU cases (tiny); CUDA cases skip
    pytest bench/bench_train.py --benchmark-only -m gpu       # the cifar10 preset at batch 128 on CUDA
    python bench/bench_train.py [--device cuda] [--steps 30]  # the table with speed-ups and the goals

What is timed: `Trainer.train_step()` exactly as `fastddpm train` runs it: draw the batch (uint8
to the device, flip), the timesteps and the counter-based noise, forward under autocast, the
loss reduced in float32, backward (GradScaler for fp16), gradient clipping, the one all-reduce
and host sync of the step's statistics, Adam and the EMA update. Data are random uint8 images
(1,024 of them) at the preset's resolution, so nothing is read from disk.

Cases: the tiny preset at batch 8 on a CPU, the cifar10 preset at batch 128 on CUDA (the DDPM
paper's training batch); precision fp32 / bf16 / fp16 (autocast, float32 master weights), eager
and torch.compile (compiled cases skip on a CPU unless --bench-cpu-compile: Inductor takes
minutes there). The first steps (compilation, autotuning, allocator warm-up) are untimed.
extra_info: images_per_s, tflops (3x the forward FLOPs per image: forward plus a backward of
about twice its cost, an estimate), peak_memory_gib (CUDA: torch.cuda.max_memory_allocated over
the timed steps; CPU: the process's peak resident set, which includes everything else).

Goals on one H100 (issue: training engine): bf16 + compile >= 2.5x fp32 eager on the cifar10
preset, and >= 5,400 images/s at batch 128 (twice the DDPM paper's TPU v3-8, 21 steps/s at
batch 128). `python bench/bench_train.py --device cuda` prints both checks.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from fastddpm.unet import forward_gflops
from fastddpm.train import TrainConfig, Trainer
from fastddpm.unet import PRESETS

PRECISIONS = ("fp32", "bf16", "fp16")
CPU_CASE = ("tiny", 8)
CUDA_CASE = ("cifar10", 128)
WARMUP_STEPS = 3
GOAL_SPEEDUP, GOAL_IMAGES_PER_S = 2.5, 5400.0


@contextmanager
def trainer_for(preset: str, batch: int, device: str, precision: str, compile: bool):
    """A Trainer on 1,024 random uint8 images at the preset's resolution, in a temporary folder."""
    folder = tempfile.mkdtemp(prefix="bench_train.")
    try:
        c = PRESETS[preset]
        rng = np.random.default_rng(0)
        npz = os.path.join(folder, "data.npz")
        np.savez(npz, arr_0=rng.integers(0, 256, size=(1024, c.image_size, c.image_size, c.in_channels),
                                         dtype=np.uint8))
        cfg = TrainConfig(data=f"npz:{npz}", out=os.path.join(folder, "run"), model=preset, steps=10**9, batch=batch,
                          precision=precision, compile=compile, device=device, warmup=0, progress=False)
        yield Trainer(cfg)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _warm_up(trainer: Trainer) -> float:
    start = time.perf_counter()
    for _ in range(WARMUP_STEPS):
        trainer.train_step()
    _sync(trainer.device)
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    return time.perf_counter() - start


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_train_step(benchmark, device, precision, compiled, request, record_rates):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if compiled and device == "cpu" and not request.config.getoption("--bench-cpu-compile"):
        pytest.skip("torch.compile on the CPU takes minutes per case; pass --bench-cpu-compile")
    preset, batch = CUDA_CASE if device == "cuda" else CPU_CASE
    with trainer_for(preset, batch, device, precision, compiled) as trainer:
        first_s = _warm_up(trainer)

        def step():
            s = trainer.train_step()  # ends with a host sync (the step's statistics), so the GPU is done
            return s

        s = benchmark(step)
        assert s["finite"]
        record_rates(images=batch, gflop=3 * forward_gflops(trainer.model.config) * batch, first_call_s=first_s,
                     preset=preset, batch=batch, precision=precision, compile=compiled,
                     peak_memory_gib=_peak_memory_gib(trainer.device), skipped_steps=trainer.skipped_total)


# ------------------------------------------------------------------------------------ the table
def measure(preset: str, batch: int, device: str, precision: str, compile: bool, steps: int) -> dict:
    """images/s (median of `steps` timed steps after the warm-up), peak memory and the warm-up time."""
    with trainer_for(preset, batch, device, precision, compile) as trainer:
        first_s = _warm_up(trainer)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - start)
        median = float(np.median(times))
        return {"precision": precision, "compile": compile, "images_per_s": batch / median,
                "ms_per_step": 1000 * median, "tflops": 3 * forward_gflops(trainer.model.config) * batch / median / 1000,
                "peak_memory_gib": _peak_memory_gib(trainer.device), "warmup_s": first_s,
                "skipped": trainer.skipped_total}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="training throughput table (fastddpm train's step)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=30, help="timed steps per row (after 3 untimed)")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="compiled rows (auto: on CUDA only)")
    a = p.parse_args(argv)
    preset, batch = CUDA_CASE if a.device == "cuda" else CPU_CASE
    with_compile = a.compile == "on" or (a.compile == "auto" and a.device == "cuda")
    rows = []
    for compile in ([False, True] if with_compile else [False]):
        for precision in PRECISIONS:
            try:
                rows.append(measure(preset, batch, a.device, precision, compile, a.steps))
            except Exception as e:  # a row that breaks is reported, the table still prints
                rows.append({"precision": precision, "compile": compile, "error": f"{type(e).__name__}: {e}"})
            r = rows[-1]
            print(f"{preset} batch {batch} {a.device} {precision:5} {'compile' if compile else 'eager':8}"
                  + (f" {r['images_per_s']:9.1f} images/s {r['ms_per_step']:8.2f} ms/step "
                     f"{r['tflops']:7.2f} TFLOP/s  peak {r['peak_memory_gib']:.2f} GiB  warm-up {r['warmup_s']:.1f} s"
                     if "error" not in r else f"  FAILED {r['error']}"), flush=True)
    base = next((r for r in rows if r["precision"] == "fp32" and not r["compile"] and "error" not in r), None)
    best = next((r for r in rows if r["precision"] == "bf16" and r["compile"] and "error" not in r), None)
    if base and best:
        speedup = best["images_per_s"] / base["images_per_s"]
        print(f"bf16 + compile vs fp32 eager: {speedup:.2f}x (goal >= {GOAL_SPEEDUP}x on cifar10 / H100); "
              f"{best['images_per_s']:.0f} images/s (goal >= {GOAL_IMAGES_PER_S:.0f} at batch 128 on one H100)")


if __name__ == "__main__":
    main()
