"""`fastddpm calibrate`: Analytic-DPM's table Gamma_t for a checkpoint, stored in a new checkpoint.

    fastddpm calibrate --checkpoint C --data D [--limit N] [--batch B] [--seed S] --out C2.safetensors

Gamma_t = E ||eps_theta(x_t, t)||^2 / d (Bao et al. 2022, eq. 7) is estimated by Monte Carlo over
the first N training images of D, one x_t draw per image and timestep (noise from
fastddpm.noise at the image's index, so the table is repeatable), for every t of the full
process: T x ceil(N / B) model calls. C2 is C with the table (and its standard error per t, the
data, N, the seed and the cost) in meta["analytic_dpm"]; `fastddpm sample --variance analytic`
and `eval bpd --variance analytic` read it. The weights are copied unchanged.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from .analytic import estimate_gamma, gamma_summary
from .checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from .data import load_dataset_for
from .errors import DataError, OutputError
from .files import check_output_file
from .model_props import eval_mode
from .noise import check_seed
from .run_folder import output_file_lock
from .validate import ANALYTIC_KEY


@dataclass
class CalibrateRequest:
    """Everything `fastddpm calibrate` takes (see `fastddpm calibrate --help`)."""

    checkpoint: str
    data: str
    out: str
    limit: int | None = None  # the first N training images (default: all)
    batch: int = 256
    seed: int = 0
    device: str = "auto"
    progress: bool = True


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def calibrate(request: CalibrateRequest) -> dict:
    """Estimate Gamma_t for request.checkpoint on request.data and write the calibrated checkpoint.

    Returns the record stored in meta["analytic_dpm"] (gamma and gamma_stderr as lists [T], images,
    model_calls, seconds, data, seed). The output is checked before any work and locked while
    this runs; it may not be the input checkpoint itself.
    """
    check_seed(request.seed, "--seed")
    if request.batch < 1:
        raise DataError(f"--batch must be a positive integer, got {request.batch}")
    check_output_file(request.out, "--out")
    source = resolve_checkpoint(request.checkpoint)
    if _same_file(source, request.out):
        raise OutputError(f"--out {request.out!r} is the input checkpoint {request.checkpoint!r}; "
                          "write the calibrated checkpoint to a new file")
    with output_file_lock(request.out, "--out"):
        return _calibrate(request)


def _calibrate(request: CalibrateRequest) -> dict:
    from .distributed import resolve_device

    device = resolve_device(request.device)
    model, diffusion, meta = load_checkpoint(request.checkpoint, device=device)
    c = model.config
    data = load_dataset_for(request.data, c, "train")
    n = len(data) if request.limit is None else min(request.limit, len(data))
    if n < 2:
        raise DataError("calibration needs at least 2 images; raise --limit")
    batches = [data.batch(range(lo, min(lo + request.batch, n)), device=device) for lo in range(0, n, request.batch)]
    start, cpu_start = time.perf_counter(), time.process_time()
    with eval_mode(model), torch.no_grad():
        result = estimate_gamma(model, diffusion, batches, seed=request.seed, progress=request.progress)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    record = {"gamma_stderr": result["stderr"].tolist(), "images": n, "data": data.name, "seed": request.seed,
              "model_calls": result["model_calls"], "batch": request.batch, "seconds": seconds,
              "cpu_seconds": cpu_seconds, "threads": torch.get_num_threads(),
              "source": str(request.checkpoint)}
    kept = {k: v for k, v in meta.items() if k != ANALYTIC_KEY}
    save_checkpoint(request.out, model, diffusion.with_gamma(result["gamma"]), **kept, **{ANALYTIC_KEY: record})
    worst = float(result["stderr"].max())
    print(f"calibrated {request.checkpoint} on {n} images of {data.name}: {result['model_calls']} model calls "
          f"(T={diffusion.num_timesteps} x {math.ceil(n / request.batch)} batches), {seconds:.1f} s "
          f"({cpu_seconds:.1f} s of CPU); "
          f"{gamma_summary(result['gamma'])}, largest standard error {worst:.2e}; wrote {request.out}")
    return {**record, "gamma": result["gamma"].tolist()}
