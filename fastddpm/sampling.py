"""Samplers: ancestral (DDPM Algorithm 2), respaced ancestral (IDDPM sec. 4), DDIM (Song et al.
2021, eq. 12), progressive x0 prediction (DDPM sec. 4.4) and interpolation (DDPM sec. 4.3).

A respaced process is just a respaced `GaussianDiffusion` (`diffusion.respace("50")`); the loop
below walks its steps k = K-1 .. 0 and calls the model with the original timesteps.

Every Gaussian comes from `fastddpm.noise`: x_T is noise(seed, XT_STEP) and the z of the update
at original timestep t is noise(seed, t), both for samples sample_offset .. sample_offset+B-1.
So the result depends only on the seed and the sample indices, not on batch size or backend.

The loop has two seams that backends fill (fastddpm.backends): the model callable and the
step function (`reference_step` here; the Triton backend fuses it into one kernel). A backend
may also own the whole loop (its `run` hook). The sampler settings travel as one
`SampleOptions` record (fastddpm/options.py).

Imports point one way: sampling -> backends (the registry, a leaf) -> the implementations,
which never import this module.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from .backends import get_backend
from .diffusion import GaussianDiffusion
from .errors import FastDDPMError
from .model_props import as_model_fn, channels_last, check_model_shape, eval_mode, model_device_dtype
from .noise import XT_STEP, noise
from .options import MULTISTEP_SAMPLERS, SAMPLERS, SampleOptions, options_from
from .solvers import dpm_step
from .unet import group_norm_impl

__all__ = ["SAMPLERS", "SampleOptions", "channels_last", "denoise_loop", "eval_mode", "interpolate",
           "model_device_dtype", "reference_step", "sample", "warm_up"]


def reference_step(diffusion: GaussianDiffusion, x: torch.Tensor, k: int, model_output: torch.Tensor, *,
                   seed: int, sample_offset: int = 0, sampler: str = "ancestral", eta: float = 0.0,
                   clip_denoised: bool = True, return_pred_x0: bool = True,
                   prev_x0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse step from x = x_{t_k} [B, C, ...] given the model's output at step index k.

    ancestral (DDPM Algorithm 2, line 4):  x_{t-1} = mu_theta(x_t, t) + sigma_t z,  z = 0 at k = 0;
        for eps prediction without clipping mu_theta = (x_t - beta_t / sqrt(1 - alphabar_t) eps) / sqrt(alpha_t);
        sigma_t^2 per the process's var_type (fixed, learned, or Analytic-DPM's optimal variance).
    ddim (Song et al. 2021, eq. 12):  x_{t-1} = sqrt(alphabar_{t-1}) x0 + sqrt(1 - alphabar_{t-1} - s^2) eps + sigma z,
        s = eta sqrt((1 - alphabar_{t-1}) / (1 - alphabar_t)) sqrt(1 - alphabar_t / alphabar_{t-1}), sigma = s;
        with var_type "analytic" sigma^2 is Analytic-DDIM's optimal variance for this eta (fastddpm/analytic.py).
    dpm++2m, dpm++2m-sde (DPM-Solver++(2M) and its SDE variant, fastddpm/solvers.py): the
        multistep update from the x0 predictions of this step and of the previous one
        (`prev_x0`, None at the first step walked); the variance channels of a learned-variance
        model are ignored, as diffusers does.
    With clip_denoised, x0 is clipped to [-1, 1] and eps recomputed from it.
    Returns (x_{t-1}, predicted x0). (return_pred_x0=False lets a fused step skip writing x0; the
    reference computes it anyway. A multistep sampler's loop keeps pred_x0 as the next prev_x0.)
    """
    B = x.shape[0]
    t_vec = torch.full((B,), k, dtype=torch.int64, device=x.device)
    p = diffusion.p_mean_variance(None, x, t_vec, clip_denoised=clip_denoised, model_output=model_output)
    t = int(diffusion.timesteps[k])
    if sampler in MULTISTEP_SAMPLERS:
        sde = sampler == "dpm++2m-sde"
        z = noise(seed, t, x.shape, sample_offset, dtype=x.dtype, device=x.device) if sde and k > 0 else None
        return dpm_step(diffusion.schedule, k, x, p["pred_x0"], prev_x0, sde, z), p["pred_x0"]
    if sampler == "ancestral":
        if k == 0:
            return p["mean"], p["pred_x0"]
        z = noise(seed, t, x.shape, sample_offset, dtype=x.dtype, device=x.device)
        return p["mean"] + torch.exp(0.5 * p["log_variance"]) * z, p["pred_x0"]
    s = diffusion.schedule
    ab, ab_prev = float(s.alphas_cumprod[k]), float(s.alphas_cumprod_prev[k])
    lam = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab)) * math.sqrt(1.0 - ab / ab_prev)
    sigma = math.sqrt(float(diffusion.analytic_variance("ddim", eta)[k])) if diffusion.var_type == "analytic" else lam
    x_prev = math.sqrt(ab_prev) * p["pred_x0"] + math.sqrt(max(1.0 - ab_prev - lam**2, 0.0)) * p["eps"]
    if k > 0 and sigma > 0:
        z = noise(seed, t, x.shape, sample_offset, dtype=x.dtype, device=x.device)
        x_prev = x_prev + sigma * z
    return x_prev, p["pred_x0"]


def _plan(model, backend: str, device, dtype):
    """(backend, device, model dtype, state dtype) of a run; the backend checked for the device.

    The state lives on the model's device unless `device` says otherwise, in float32 for a
    half-precision model (the model sees its own dtype) and in the model's dtype otherwise.
    """
    be = get_backend(backend)
    m_device, m_dtype = model_device_dtype(model)
    device = torch.device(device) if device is not None else m_device
    be.check(device)
    state_dtype = dtype or (torch.float32 if m_dtype in (torch.float16, torch.bfloat16) else m_dtype)
    return be, device, m_dtype, state_dtype


def _validate(shape, options: SampleOptions) -> tuple[int, ...]:
    """shape as a tuple of ints [B, C, ...]; FastDDPMError for a bad one or sample indices past 2^32."""
    try:
        shape = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise FastDDPMError(f"sample shape must be a sequence of integers [B, C, ...], got {shape!r}") from None
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise FastDDPMError(f"sample shape must be [B, C, ...] with positive sizes, got {list(shape)}")
    if options.sample_offset + shape[0] > 2**32:
        raise FastDDPMError(f"sample indices {options.sample_offset}..{options.sample_offset + shape[0] - 1} "
                            "do not fit the 32-bit sample counter")
    return shape


def denoise_loop(model_fn: Callable, diffusion: GaussianDiffusion, x: torch.Tensor, start: int,
                 options: SampleOptions | None = None, *, step_fn: Callable = reference_step, **settings):
    """Run the reverse process from x = x_{t_start} [B, ...] down to x_0, step indices start .. 0.

    model_fn(x, t) -> output is called with original timesteps; step_fn has reference_step's
    signature (for a multistep sampler the loop passes the previous step's x0 prediction as
    prev_x0; such a sampler starts at the process's first step, start = K - 1). The sampler settings come from `options` (or, without it, from SampleOptions
    keywords in `settings`: seed=..., sampler=..., ...). options.callback, if given, gets a dict
    (index, k, t, x, pred_x0) after every step: x is the new state, pred_x0 the model's current
    estimate of the final image (DDPM's progressive generation, sec. 4.4).
    """
    opts = options_from(options, **settings)
    B = x.shape[0]
    tables = diffusion.tables(x.device, torch.float32)
    step_kwargs = opts.step_kwargs()
    callback = opts.callback
    multistep = opts.sampler in MULTISTEP_SAMPLERS
    if multistep and start != diffusion.num_steps - 1:
        raise FastDDPMError(f"the {opts.sampler} sampler walks the whole process: start at step {diffusion.num_steps - 1}")
    pred_x0 = None
    for index, k in enumerate(tqdm(range(start, -1, -1), disable=not opts.progress, desc="sampling", unit="step",
                                   leave=False)):
        t_model = tables["timesteps"][k].expand(B)
        out = model_fn(x, t_model)
        extra = {"prev_x0": pred_x0} if multistep else {}
        x, pred_x0 = step_fn(diffusion, x, k, out, **step_kwargs, return_pred_x0=multistep or callback is not None,
                             **extra)
        if callback is not None:
            callback({"index": index, "k": k, "t": int(diffusion.timesteps[k]), "x": x, "pred_x0": pred_x0})
    return x


@torch.no_grad()
def sample(model, diffusion: GaussianDiffusion, shape, seed: int = 0, sampler: str = "ancestral", eta: float = 0.0,
           backend: str = "reference", progress: bool = False, callback: Callable | None = None, *,
           clip_denoised: bool = True, sample_offset: int = 0, device=None, dtype=None, steps_per_graph: int = 1,
           graph_capture: str = "compiled", options: SampleOptions | None = None,
           x_T: torch.Tensor | None = None) -> torch.Tensor:
    """Draw samples of `shape` = [B, C, ...] from the reverse process of `diffusion`.

    model      callable (x_t, t) -> output; an nn.Module runs on its parameters' device, and a
               half-precision model keeps the sampler state in float32 (the model sees its dtype).
               A model with a U-Net config needs shape [B, in_channels, image_size, image_size].
    diffusion  the process to walk; respace it for fewer steps, e.g. diffusion.respace("ddim50") or
               diffusion.respace("trailing10"), and pick its variance with diffusion.with_variance(...).
    seed       with sample_offset, fixes every Gaussian (see fastddpm.noise): row b of the result
               is sample number sample_offset + b of this seed, whatever the batch or backend.
    sampler    "ancestral" (DDPM Algorithm 2), "ddim" (eta = 0: deterministic), "dpm++2m" or
               "dpm++2m-sde" (DPM-Solver++(2M), fastddpm/solvers.py).
    backend    "reference", "triton", "graph", "compile" or "onnx" (see fastddpm.backends), or
               "auto": the fastest that runs here AND agrees with the reference on the first steps
               (fastddpm.auto; a rejected candidate is a FastDDPMWarning naming why).
    clip_denoised  clip the predicted x0 to [-1, 1] (images); turn off for unbounded data.
    device, dtype  override where and in what dtype the state lives (default from the model).
    steps_per_graph, graph_capture  the `graph` backend's settings (fastddpm.options.SampleOptions).
    options    all the sampler settings as one SampleOptions record, instead of the keywords
               seed .. graph_capture (a keyword that is not at its default beside it is an error).
    x_T        start from this noise [B, C, ...] (finite, floating point, of `shape`; cast to the
               state's dtype and device) instead of the seeded x_T; the seed still draws every
               later Gaussian. (diffusers' `latents=`: how runs are compared across tools.)
    Returns x_0 [B, C, ...]; in [-1, 1] when clip_denoised.
    """
    opts = options_from(options, seed=seed, sample_offset=sample_offset, sampler=sampler, eta=eta,
                        clip_denoised=clip_denoised, progress=progress, callback=callback,
                        steps_per_graph=steps_per_graph, graph_capture=graph_capture)
    shape = _validate(shape, opts)
    check_model_shape(model, shape)
    if backend == "auto":
        from .auto import choose

        m_device = model_device_dtype(model)[0] if device is None else torch.device(device)
        picked = choose(model, diffusion, shape, opts, device=m_device, dtype=dtype)
        return sample(model, diffusion, shape, options=opts.with_(graph_capture=picked.graph_capture or
                                                                  opts.graph_capture),
                      backend=picked.backend, device=device, dtype=dtype, x_T=x_T)
    be, device, m_dtype, state_dtype = _plan(model, backend, device, dtype)
    start = None if x_T is None else _start_noise(x_T, shape, state_dtype, device)
    with eval_mode(model):
        if be.run is not None:  # a backend that owns the whole loop (CUDA graphs, ONNX Runtime)
            x = be.run(model, diffusion, shape, opts, device=device, dtype=state_dtype, x_T=start)
        else:
            x = start if start is not None else noise(opts.seed, XT_STEP, shape, opts.sample_offset,
                                                     dtype=state_dtype, device=device)
            fn = be.prepare_model(model) if be.prepare_model is not None else model
            with group_norm_impl(model, be.group_norm_silu):
                x = denoise_loop(as_model_fn(fn, m_dtype, state_dtype, layout_of=model), diffusion, x,
                                 diffusion.num_steps - 1, opts, step_fn=be.step or reference_step)
    return x.clamp(-1.0, 1.0) if opts.clip_denoised else x


def _start_noise(x_T, shape, dtype, device) -> torch.Tensor:
    """A user's x_T checked (a floating tensor of `shape`, finite) and copied to the state's dtype and device."""
    if not isinstance(x_T, torch.Tensor):
        raise FastDDPMError(f"x_T must be a torch tensor of shape {list(shape)}, got {type(x_T).__name__}")
    if tuple(x_T.shape) != tuple(shape):
        raise FastDDPMError(f"x_T has shape {list(x_T.shape)}, but the samples have shape {list(shape)}")
    if not x_T.is_floating_point():
        raise FastDDPMError(f"x_T must be floating point, got {x_T.dtype}")
    if not bool(torch.isfinite(x_T).all()):
        raise FastDDPMError("x_T holds NaN or infinite values")
    return x_T.detach().to(device=device, dtype=dtype).clone()


@torch.no_grad()
def warm_up(model, diffusion: GaussianDiffusion, shape, backend: str = "reference", sampler: str = "ancestral",
            eta: float = 0.0, clip_denoised: bool = True, device=None, dtype=None, *, steps_per_graph: int = 1,
            graph_capture: str = "compiled", options: SampleOptions | None = None) -> float:
    """Do a backend's one-time work for this shape now (capture, compilation, autotuning, session
    start) so that a following `sample` call with the same settings measures the steady state.
    Returns the seconds taken.

    The settings are `sample`'s (or one SampleOptions record); backends with a `warmup` hook
    run it, the others run one model call and one step.
    """
    opts = options_from(options, sampler=sampler, eta=eta, clip_denoised=clip_denoised,
                        steps_per_graph=steps_per_graph, graph_capture=graph_capture)
    shape = _validate(shape, opts)
    check_model_shape(model, shape)
    be, device, m_dtype, state_dtype = _plan(model, backend, device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    with eval_mode(model):
        if be.warmup is not None:
            be.warmup(model, diffusion, shape, opts, device=device, dtype=state_dtype)
        elif be.run is None:
            x = noise(0, XT_STEP, shape, dtype=state_dtype, device=device)
            fn = be.prepare_model(model) if be.prepare_model is not None else model
            with group_norm_impl(model, be.group_norm_silu):
                k = diffusion.num_steps - 1
                t = diffusion.tables(device, torch.float32)["timesteps"][k].expand(shape[0])  # as denoise_loop
                out = as_model_fn(fn, m_dtype, state_dtype, layout_of=model)(x, t)
                (be.step or reference_step)(diffusion, x, k, out, **opts.step_kwargs())
    sync()
    return time.perf_counter() - start


@torch.no_grad()
def interpolate(model, diffusion: GaussianDiffusion, x0_a: torch.Tensor, x0_b: torch.Tensor, k: int,
                lambdas, seed: int = 0, clip_denoised: bool = True) -> torch.Tensor:
    """Interpolate two images through the latent at step index k (DDPM sec. 4.3, Fig. 8).

    x0_a, x0_b [C, H, W] are encoded with the same noise, x_t = q_sample(x0, t_k, eps); the
    latents are mixed, (1 - lambda) x_t + lambda x'_t, for each lambda in `lambdas` [L], and
    decoded by the reverse process from step k. Returns [L, C, H, W].
    """
    m_device, m_dtype = model_device_dtype(model)
    state_dtype = torch.float32 if m_dtype in (torch.float16, torch.bfloat16) else m_dtype
    if not 0 <= k < diffusion.num_steps:
        raise FastDDPMError(f"step index {k} is outside 0..{diffusion.num_steps - 1}")
    lam = torch.as_tensor(lambdas, dtype=state_dtype, device=m_device).reshape(-1, *([1] * x0_a.ndim))
    pair = torch.stack([x0_a, x0_b]).to(m_device, state_dtype)
    eps = noise(seed, XT_STEP, (1,) + tuple(x0_a.shape), dtype=state_dtype, device=m_device).expand_as(pair)
    t = torch.full((2,), k, dtype=torch.int64, device=m_device)
    xt_a, xt_b = diffusion.q_sample(pair, t, eps)
    x = (1.0 - lam) * xt_a + lam * xt_b
    with eval_mode(model):
        out = denoise_loop(as_model_fn(model, m_dtype, state_dtype), diffusion, x, k,
                           SampleOptions(seed=seed, clip_denoised=clip_denoised))
    return out.clamp(-1.0, 1.0) if clip_denoised else out
