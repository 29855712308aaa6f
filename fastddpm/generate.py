"""The sampling job behind `fastddpm sample`: build the model, sample, time it, write the outputs.

Outputs in the --out folder, published together (fastddpm.files.publish_together): all three
are written under temporary names first and renamed only when all are complete, stats.json
last, so a folder never mixes one run's samples with another's stats, and a failed run (a full
disk, an interrupt) leaves the previous set untouched:
    samples.npz   uint8 [B, H, W, C] under key arr_0 (what FID tools read)
    grid.png      all samples tiled, for people
    stats.json    the request, the timing (seconds, images/s, ms/step, achieved TFLOP/s) and the machine
The run holds the folder's lock (fastddpm.run_folder) from before the model is built to the end;
a folder this run created is removed again if the run fails.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass

import torch

from .ceilings import measure_peak_tflops, synchronize
from .checkpoint import checkpoint_file, load_checkpoint
from .diffusion import GaussianDiffusion
from .distributed import Distributed, resolve_device  # noqa: F401  (re-exported for bench)
from .backends import get_backend
from .errors import FastDDPMError, check_choice
from .files import open_output, publish_together, refuse_overwriting_inputs
from .images import grid, to_uint8
from .memory import check_sampling_fits
from .noise import check_seed
from .run_folder import LOCK_NAME, RunFolder, lock_on_main
from .sampling import SAMPLERS, sample, warm_up
from .schedule import SPACINGS, make_betas, sampling_timesteps
from .unet import PRESETS, UNet, forward_gflops  # noqa: F401  (forward_gflops re-exported)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OUTPUTS = ("samples.npz", "grid.png", "stats.json")  # what a run writes into --out


@dataclass
class SampleRequest:
    """Everything `fastddpm sample` takes (see `fastddpm sample --help`)."""

    model: str | None = None  # preset with random weights (default "cifar10" when no checkpoint)
    checkpoint: str | None = None  # a checkpoint path, or "digits"
    steps: int | None = None  # None: all T steps
    batch: int = 64
    seed: int = 0
    sampler: str = "ancestral"
    eta: float = 0.0
    spacing: str = "iddpm"  # which timesteps: iddpm, or diffusers' linspace / leading / trailing
    variance: str | None = None  # None: the model's own; fixedlarge, fixedsmall, learned or analytic
    dtype: str = "fp32"
    backend: str = "auto"  # "auto": the fastest that runs here and passes verification (fastddpm.auto)
    verify: str | None = None  # "on" / "off"; None: on for auto, off for a backend named explicitly
    onnx: str | None = None
    x_T: str | None = None  # an .npz whose arr_0 is the starting noise [batch, C, H, W] (else the seeded x_T)
    device: str = "auto"
    out: str = "samples"
    progress: bool = True


def default_diffusion(T: int = 1000) -> GaussianDiffusion:
    """The DDPM CIFAR-10 process: linear betas over T = 1000, eps prediction, sigma^2 = beta."""
    return GaussianDiffusion(make_betas("linear", T), mean_type="eps", var_type="fixedlarge")


def respaced_for(diffusion: GaussianDiffusion, steps: int | None, sampler: str,
                 spacing: str = "iddpm") -> GaussianDiffusion:
    """The process that takes `steps` steps: full at T (with the default spacing), else respaced
    to the timesteps `schedule.sampling_timesteps(T, steps, sampler, spacing)` names.

    spacing "iddpm": ancestral and the solvers keep `steps` evenly spaced steps ("N"); DDIM uses
    the integer stride from t = 0 ("ddimN") when one gives exactly N steps. "linspace",
    "leading", "trailing": diffusers' rule of the sampler's peer scheduler.
    """
    T = diffusion.num_timesteps
    kept = sampling_timesteps(T, steps, sampler, spacing)
    if kept == list(range(T)):
        return diffusion
    return diffusion.respace(kept[::-1])


# Which --variance each sampler can use: the ODE solvers have no reverse variance, DDIM's is set by
# eta (or replaced by Analytic-DDIM's), the ancestral sampler takes any.
VARIANCES_OF = {"ancestral": ("fixedlarge", "fixedsmall", "learned", "analytic"), "ddim": ("analytic",),
                "dpm++2m": (), "dpm++2m-sde": ()}


def build_model(request: SampleRequest, device: torch.device):
    """(model, diffusion, description, clip_denoised) for a request: a checkpoint (which may say whether
    its data is clipped to [-1, 1] in meta["clip_denoised"]; images are), or a preset with seeded
    random weights."""
    # --- backend "onnx" (issue 7): the model config, schedule and settings come from the .onnx file
    if request.backend == "onnx":
        from .export.ort_backend import load_onnx

        if request.checkpoint is not None or request.model is not None:
            raise FastDDPMError("--backend onnx takes the model from --onnx FILE.onnx; "
                                "leave out --checkpoint and --model")
        model, diffusion = load_onnx(request.onnx, request.device)  # "auto": ORT's CUDA provider if it has one
        return model, diffusion, f"onnx {request.onnx}", model.ort.clip_denoised
    # --- end backend "onnx"
    if request.checkpoint is not None:
        model, diffusion, meta = load_checkpoint(request.checkpoint, device=device)
        return model, diffusion, f"checkpoint {request.checkpoint}", bool(meta.get("clip_denoised", True))
    preset = "cifar10" if request.model is None else request.model
    torch.manual_seed(request.seed)
    model = UNet.from_preset(preset).to(device).eval()
    return model, default_diffusion(), f"random {preset} weights", True


def validate(request: SampleRequest) -> None:
    """Check a request's values before any long work; FastDDPMError names the bad one."""
    check_choice("sampler", request.sampler, SAMPLERS)
    check_choice("spacing", request.spacing, SPACINGS)
    check_choice("dtype", request.dtype, tuple(DTYPES))
    if request.variance is not None:
        check_choice("variance", request.variance, VARIANCES_OF["ancestral"])
        if request.variance not in VARIANCES_OF[request.sampler]:
            usable = VARIANCES_OF[request.sampler]
            raise FastDDPMError(f"--variance {request.variance} does not apply to the {request.sampler} sampler "
                                + (f"(it takes only {', '.join(usable)})" if usable else "(it has no reverse variance)"))
    if request.backend != "auto":
        get_backend(request.backend)
    if request.verify is not None:
        check_choice("--verify", request.verify, ("on", "off"))
    if request.batch < 1:
        raise FastDDPMError(f"--batch must be a positive integer, got {request.batch}")
    check_seed(request.seed, "--seed")
    if not 0.0 <= request.eta <= 1.0:
        raise FastDDPMError(f"--eta must be in [0, 1], got {request.eta}")
    if request.eta != 0.0 and request.sampler != "ddim":
        raise FastDDPMError(f"--eta is DDIM's noise scale; the {request.sampler} sampler has none")
    if request.onnx is not None and request.backend != "onnx":
        raise FastDDPMError(f"--onnx FILE.onnx is sampled by --backend onnx, not {request.backend}")
    if request.backend == "onnx" and request.onnx is None:
        raise FastDDPMError("--backend onnx needs --onnx FILE.onnx (make one with `fastddpm export`)")
    if request.checkpoint is None and ("cifar10" if request.model is None else request.model) not in PRESETS:
        raise FastDDPMError(f"unknown model preset {request.model!r}; choose one of {', '.join(map(repr, PRESETS))}")


def run_sample(request: SampleRequest) -> dict:
    """Run one sampling job and write its outputs; returns the stats written to stats.json."""
    if request.onnx is not None and request.backend == "auto":  # an .onnx file is run by ONNX Runtime
        request = dataclasses.replace(request, backend="onnx")
    validate(request)
    folder = RunFolder(request.out, "--out")  # checks the path now; locks in _run
    refuse_overwriting_inputs([(folder.path / name, "--out") for name in OUTPUTS + (LOCK_NAME,)],
                              [(checkpoint_file(request.checkpoint), "--checkpoint"), (request.onnx, "--onnx"),
                               (request.x_T, "--x-T")])
    dist = Distributed(request.device)  # one process, or this rank of a torchrun job
    try:
        if request.backend != "auto":
            get_backend(request.backend).check(dist.device)
        with lock_on_main(folder, dist):  # only rank 0 writes, so only rank 0 locks
            return _run(request, dist, folder.path)
    finally:
        dist.close()


def _run(request: SampleRequest, dist: Distributed, out) -> dict:
    device = dist.device
    model, diffusion, source, clip_denoised = build_model(request, device)
    model = model.to(DTYPES[request.dtype])
    if device.type == "cuda" and request.dtype != "fp32":
        # Half precision on a GPU: channels-last activations feed the tensor cores' NHWC kernels.
        model = model.to(memory_format=torch.channels_last)
    if request.variance is not None:
        diffusion = diffusion.with_variance(request.variance)
    process = respaced_for(diffusion, request.steps, request.sampler, request.spacing)
    c = model.config
    first, count = dist.shard(request.batch)  # this rank's samples: first .. first + count - 1
    shape = (count, c.in_channels, c.image_size, c.image_size)
    check_sampling_fits(shape, device)  # before allocating: many partial allocations end in the OOM killer
    if request.checkpoint is None and request.backend != "onnx":  # (onnx: the weights come from the file)
        print(f"fastddpm: no checkpoint given: {source} (seed {request.seed}); a throughput run, "
              "the images are not meaningful", file=sys.stderr)

    x_T = None if request.x_T is None else load_x_T(request.x_T, (request.batch, *shape[1:]))[first:first + count]
    choice = _choose_backend(request, model, process, shape, first, clip_denoised, device, dist)
    warmup_seconds = 0.0
    if count and (choice.backend != "reference" or device.type == "cuda"):
        # Compilation, graph capture, autotuning: timed apart from the steady state below.
        warmup_seconds = dist.max(warm_up(model, process, shape, sampler=request.sampler, eta=request.eta,
                                          clip_denoised=clip_denoised, **choice.sample_kwargs()))
    synchronize(device)
    start = time.perf_counter()
    if count:
        x = sample(model, process, shape, seed=request.seed, sampler=request.sampler, eta=request.eta,
                   progress=request.progress and dist.is_main, sample_offset=first,
                   clip_denoised=clip_denoised, x_T=x_T, **choice.sample_kwargs())
    else:
        x = torch.zeros(shape, device=device)
    synchronize(device)
    seconds = dist.max(time.perf_counter() - start)
    x = dist.gather_rows(x.float(), request.batch)
    if not dist.is_main:
        return {}

    images = to_uint8(x)
    steps = process.num_steps
    gflop = forward_gflops(c)
    peak = measure_peak_tflops(device) if device.type == "cuda" else None  # a fraction of a second there
    stats = {
        "request": asdict(request),
        "source": source,
        "backend": choice.label,
        "verified": choice.verified,
        "fallbacks": choice.fallbacks,
        "steps": steps,
        "model_calls": steps,
        "sampler": request.sampler,
        "variance": process.var_type if request.sampler == "ancestral" or request.variance else None,
        "timesteps": process.timesteps.tolist()[::-1],
        "shape": list(images.shape),
        "seconds": seconds,
        "warmup_seconds": warmup_seconds,
        "images_per_s": request.batch / seconds,
        "ms_per_step": 1000.0 * seconds / steps,
        "gflop_per_image_forward": gflop,
        "achieved_tflops": gflop * request.batch * steps / seconds / 1000.0,
        "peak": peak,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "processes": dist.world_size,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    publish_together(out, {"samples.npz": functools.partial(_write_npz, images=images),
                           "grid.png": _png_bytes(images),
                           "stats.json": (json.dumps(stats, indent=2) + "\n").encode()}, last="stats.json")
    print(f"{request.batch} samples, {steps} steps, {choice.label} backend, {request.dtype} on {device.type}"
          f"{f' x {dist.world_size} processes' if dist.world_size > 1 else ''}: "
          f"{seconds:.2f} s, {stats['images_per_s']:.2f} images/s, {stats['ms_per_step']:.1f} ms/step, "
          f"{stats['achieved_tflops']:.3f} TFLOP/s achieved"
          + (f" = {100 * stats['achieved_tflops'] / peak['tflops']:.1f}% of the measured {peak['dtype']} "
             f"peak {peak['tflops']:.0f} TFLOP/s" if peak else "")
          + (f" (warm-up {warmup_seconds:.2f} s apart)" if warmup_seconds else ""))
    print(f"wrote {out / 'samples.npz'}, {out / 'grid.png'} and {out / 'stats.json'}")
    return stats


def load_x_T(path, shape) -> torch.Tensor:
    """--x-T: the starting noise of the whole batch from an .npz (key arr_0, float32 or float64 of
    `shape` = [batch, C, H, W], finite; read without unpickling), as export/ort_sample.py takes it."""
    import numpy as np

    from .errors import DataError

    try:
        with np.load(path, allow_pickle=False) as f:
            x = f["arr_0"]
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise DataError(f"--x-T {str(path)!r} is not a readable .npz with arr_0 ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:120]})") from None
    if x.dtype not in (np.float32, np.float64) or tuple(x.shape) != tuple(shape):
        raise DataError(f"--x-T {str(path)!r} holds {x.dtype} {list(x.shape)}; this run starts from float "
                        f"{list(shape)} (--batch x the model's channels and image size)")
    if not np.isfinite(x).all():
        raise DataError(f"--x-T {str(path)!r} holds NaN or infinite values")
    return torch.from_numpy(x)


def _choose_backend(request: SampleRequest, model, process, shape, first: int, clip_denoised: bool, device,
                    dist: Distributed):
    """The backend this run uses (fastddpm.auto.Choice): for --backend auto the fastest that runs here
    and agrees with the reference on the first steps; a named backend as it is, or checked against
    the reference first with --verify on. A rejected candidate is one warning line on stderr."""
    from .auto import CANDIDATES, Choice, choose
    from .options import SampleOptions

    verify = request.verify == "on" or (request.verify is None and request.backend == "auto")
    if request.backend != "auto" and not verify:
        return Choice(backend=request.backend)
    candidates = CANDIDATES.get(device.type, ()) if request.backend == "auto" else [(request.backend, None)]
    options = SampleOptions(seed=request.seed, sample_offset=first, sampler=request.sampler, eta=request.eta,
                            clip_denoised=clip_denoised)

    def warn(line: str) -> None:
        if dist.is_main:
            sys.stderr.write(f"fastddpm: warning: {line}\n")
            sys.stderr.flush()

    return choose(model, process, shape if shape[0] else (1, *shape[1:]), options, device=device,
                  verify_choice=verify, candidates=candidates, warn=warn)


def _write_npz(tmp, images) -> None:
    """uint8 NHWC images under key arr_0 (the layout FID tools read) into file `tmp`."""
    import numpy as np

    with open_output(tmp) as f:
        np.savez(f, arr_0=images)


def _png_bytes(images) -> bytes:
    """The PNG grid of uint8 NHWC images (1 or 3 channels), encoded in memory."""
    from PIL import Image

    g = grid(images)
    buf = io.BytesIO()
    Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g).save(buf, format="PNG")
    return buf.getvalue()
