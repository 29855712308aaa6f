"""`fastddpm eval bpd`: test-set negative log-likelihood of a checkpoint in bits per dimension.

The variational bound (DDPM eq. 5, in bits/dim as IDDPM reports it)

    -log p(x0) <= L_T + sum_{t>0} L_{t-1} + L_0
               =  KL(q(x_T|x0) || N(0,I))  +  sum_t KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t))  -  log p(x0|x1)

is computed term by term by `GaussianDiffusion.calc_bpd_loop` (one model call per timestep and
batch, x_t drawn with torch's generator seeded by `seed`) and averaged over the data set's test
split (digits: the held-out 20%; CIFAR-10: test_batch; image folders and .npz: every image).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

import torch

from .checkpoint import load_checkpoint
from .checkpoint import checkpoint_file
from .data import data_input_files, load_dataset_for
from .errors import DataError
from .files import atomic_write_bytes, check_output_file, refuse_overwriting_inputs
from .noise import check_seed
from .run_folder import output_file_lock


@dataclass
class BpdRequest:
    """Everything `fastddpm eval bpd` takes (see `fastddpm eval bpd --help`)."""

    checkpoint: str
    data: str
    batch: int = 256
    limit: int | None = None  # evaluate only the first N test images
    seed: int = 0
    device: str = "auto"
    clip_denoised: bool = True
    out: str | None = "bpd.json"
    progress: bool = True
    steps: int | None = None  # the bound of the K-step process (respaced "K": t = 0 and T - 1 kept)
    variance: str | None = None  # None: the checkpoint's; fixedlarge, fixedsmall, learned or analytic
    levels: int | None = None  # the data's grey levels: adds level_accuracy and exact_fraction per step
    versus: str | None = None  # a second checkpoint: evaluated on the same images and draws, paired


def evaluate_bpd(request: BpdRequest) -> dict:
    """Mean total bits/dim over the test images, with its standard error and the per-timestep terms.

    Returns (and writes to request.out, when set) a dict: bpd, bpd_stderr, prior_bpd, images,
    T (the number of steps of the process: K with --steps), timesteps (its original timesteps),
    variance, per_image_bpd (each image's total, in data order: for paired differences between
    models evaluated with the same seed, images and batch, which then share their x_t draws), and
    per_timestep = {vb, vb_sq, mse, xstart_mse}: lists of length T in step order, each the mean over
    images (vb in bits/dim and vb_sq its square, the second moment E[L_t^2] of IDDPM eq. 18; mse the
    eps-prediction error; xstart_mse the x0 error); with request.levels also level_accuracy (share
    of pixels whose rounded x0 prediction is the right level) and exact_fraction (share of images
    recovered exactly).
    request.out is checked before any work (a folder, an empty name, an unwritable place are
    refused at once) and locked while the evaluation runs.
    """
    check_seed(request.seed, "--seed")
    run = _evaluate if request.versus is None else _evaluate_pair
    if request.out is None:
        return run(request)
    check_output_file(request.out, "--out")
    inputs = evaluation_inputs(request.checkpoint, request.data)
    if request.versus is not None:
        inputs += [(checkpoint_file(request.versus), "--versus")]
    refuse_overwriting_inputs([(request.out, "--out")], inputs)
    with output_file_lock(request.out, "--out"):
        return run(request)


def _evaluate_pair(request: BpdRequest) -> dict:
    """--versus B: both checkpoints on the same test images with the same x_t seed (and so the same
    x_t draws when their processes have the same number of steps), and the per-image paired
    difference A - B with its standard error (fastddpm.stats.paired_difference)."""
    from dataclasses import replace

    from .stats import paired_difference

    a = _evaluate(replace(request, versus=None, out=None))
    b = _evaluate(replace(request, checkpoint=request.versus, versus=None, out=None))
    d = paired_difference(a["per_image_bpd"], b["per_image_bpd"])
    result = {**a, "versus": {k: b[k] for k in ("checkpoint", "bpd", "bpd_stderr", "T", "per_image_bpd")},
              "paired_difference": d, "shared_xt_draws": a["T"] == b["T"], "request": asdict(request)}
    se = "n/a (one image)" if d["se"] is None else f"{d['se']:.4f}"
    print(f"paired over the same {d['n']} images: {request.checkpoint} - {request.versus} = {d['mean']:+.4f} "
          f"+- {se} bits/dim (SE)" + ("" if result["shared_xt_draws"] else
                                      "; the two processes differ in steps, so their x_t draws are not shared"))
    if request.out is not None:
        atomic_write_bytes(request.out, (json.dumps(result, indent=1) + "\n").encode())
        print(f"wrote {request.out}")
    return result


def process_for(diffusion, steps: int | None, variance: str | None):
    """The process whose bound `eval bpd` computes: the checkpoint's, with `variance` (None: its own)
    and respaced to `steps` evenly spaced steps ("K", which keeps t = 0 and T - 1; None: all T).

    The respaced process's bound is a bound on the same likelihood (Nichol & Dhariwal 2021,
    sec. 4: the K-step model is a diffusion model of its own): L_T + sum_k L_k + L_0 over its
    steps, with its own betas beta'_k = 1 - alphabar_{t_k} / alphabar_{t_{k-1}}.
    """
    from .errors import FastDDPMError

    if variance is not None:
        diffusion = diffusion.with_variance(variance)
    if steps is not None:
        T = diffusion.num_timesteps
        if not 1 <= steps <= T:
            raise FastDDPMError(f"--steps must be between 1 and the model's T = {T}, got {steps}")
        if steps < T:
            diffusion = diffusion.respace(str(steps))
    return diffusion


def evaluation_inputs(checkpoint, data) -> list[tuple]:
    """(path, flag) of every file an evaluation of `checkpoint` on `data` reads: the outputs must not
    be one of them (fastddpm.files.refuse_overwriting_inputs)."""
    return [(checkpoint_file(checkpoint), "--checkpoint")] + [(p, "--data") for p in data_input_files(data)]


def _evaluate(request: BpdRequest) -> dict:
    from tqdm.auto import tqdm

    from .generate import resolve_device

    device = resolve_device(request.device)
    model, diffusion, _ = load_checkpoint(request.checkpoint, device=device)
    diffusion = process_for(diffusion, request.steps, request.variance)
    c = model.config
    data = load_dataset_for(request.data, c, "test")
    n = len(data) if request.limit is None else min(request.limit, len(data))
    if n < 1:
        raise DataError("--limit must leave at least one image to evaluate")
    T = diffusion.num_steps
    torch.manual_seed(request.seed)
    totals, priors = [], []
    keys = ("vb", "vb_sq", "mse", "xstart_mse") + (("level_accuracy", "exact_fraction") if request.levels else ())
    sums = {k: torch.zeros(T, dtype=torch.float64) for k in keys}
    start = time.perf_counter()
    batches = range(0, n, request.batch)
    for lo in tqdm(batches, disable=not request.progress, desc="bpd batches", unit="batch"):
        x0 = data.batch(range(lo, min(lo + request.batch, n)), device=device)
        out = diffusion.calc_bpd_loop(model, x0, clip_denoised=request.clip_denoised, progress=request.progress,
                                      levels=request.levels)
        totals.append(out["total_bpd"].double().cpu())
        priors.append(out["prior_bpd"].double().cpu())
        out["vb_sq"] = out["vb"].double() ** 2
        if request.levels:
            out["exact_fraction"] = (out["level_accuracy"] == 1.0).double()
        for k in sums:
            sums[k] += out[k].double().sum(dim=0).cpu()
    seconds = time.perf_counter() - start
    total = torch.cat(totals)
    stderr = float(total.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
    result = {
        "bpd": float(total.mean()), "bpd_stderr": stderr, "prior_bpd": float(torch.cat(priors).mean()),
        "images": n, "data": f"{data.name}", "checkpoint": str(request.checkpoint), "T": T,
        "timesteps": diffusion.timesteps.tolist(), "variance": diffusion.var_type, "per_image_bpd": total.tolist(),
        "per_timestep": {k: (v / n).tolist() for k, v in sums.items()},
        "seconds": seconds, "request": asdict(request),
    }
    if request.out is not None:
        atomic_write_bytes(request.out, (json.dumps(result, indent=1) + "\n").encode())
    print(f"{result['bpd']:.4f} +- {stderr:.4f} bits/dim over {n} test images of {data.name} "
          f"(prior term {result['prior_bpd']:.2e}; {seconds:.1f} s)"
          + (f"; wrote {request.out}" if request.out else ""))
    return result
