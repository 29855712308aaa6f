"""Parity with the peer: our samplers against diffusers' schedulers on the same model and x_T.

The configuration that matches (diffusers 0.42; clipping off on both sides: diffusers does not
clip x0 by default, `thresholding=False`, while fastddpm clips with clip_denoised=True):
    fastddpm sample --sampler dpm++2m --spacing S        DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
                                                          solver_order=2, solver_type="midpoint", lower_order_final=True,
                                                          final_sigmas_type="zero", timestep_spacing=S)
    fastddpm sample --sampler dpm++2m-sde --spacing S    the same with algorithm_type="sde-dpmsolver++", fed our
                                                          noise through step(variance_noise=...)
    fastddpm sample --sampler ddim --eta 0 --spacing S   DDIMScheduler(set_alpha_to_one=True, clip_sample=False,
                                                          timestep_spacing=S), S = leading or trailing with N | T
All with the same betas (`trained_betas`) and prediction_type="epsilon".

Each step is compared on the SAME input (our state), so the error of one step is measured, not
the accumulated drift: relative error <= 1e-5 in float32. (diffusers upcasts the state to float32
and keeps its sigmas in float32, so there is no float64 comparison to make.)

DDIMScheduler's quirk, not copied: it steps from t to t - T // N, not to the next listed timestep,
so with `linspace` spacing (or N not dividing T) its own steps leave its list (linspace10 walks
999 -> 899 though 888 is next). fastddpm's ddim walks the listed timesteps; the two agree exactly
where diffusers is consistent (leading and trailing with N | T), which is what is tested here.
"""
import pytest
import torch

from fastddpm import GaussianDiffusion, make_betas
from fastddpm.noise import XT_STEP, noise
from fastddpm.sampling import reference_step
from fastddpm.schedule import sampling_timesteps
from helpers import randomized_unet, rel_err

diffusers = pytest.importorskip("diffusers")

T = 1000
SHAPE = (2, 3, 8, 8)


def _setup(sampler: str, spacing: str, n: int):
    full = GaussianDiffusion(make_betas("linear", T))
    kept = sampling_timesteps(T, n, sampler, spacing)
    return full, full.respace(kept[::-1]), randomized_unet("tiny", seed=11, image_size=8)


def _scheduler(sampler: str, spacing: str, full: GaussianDiffusion):
    common = dict(num_train_timesteps=T, trained_betas=full.schedule.betas.numpy(), prediction_type="epsilon",
                  timestep_spacing=spacing)
    if sampler == "ddim":
        return diffusers.DDIMScheduler(**common, set_alpha_to_one=True, clip_sample=False, steps_offset=0)
    return diffusers.DPMSolverMultistepScheduler(
        **common, algorithm_type="dpmsolver++" if sampler == "dpm++2m" else "sde-dpmsolver++", solver_order=2,
        solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero", thresholding=False)


CASES = [("dpm++2m", "linspace", 7), ("dpm++2m", "leading", 7), ("dpm++2m", "trailing", 3),
         ("dpm++2m", "trailing", 10), ("dpm++2m", "linspace", 10),
         ("dpm++2m-sde", "linspace", 5), ("dpm++2m-sde", "trailing", 10),
         ("ddim", "leading", 10), ("ddim", "trailing", 5)]


@pytest.mark.parametrize("sampler, spacing, n", CASES)
@torch.no_grad()
def test_each_step_matches_diffusers(sampler, spacing, n):
    full, d, model = _setup(sampler, spacing, n)
    sched = _scheduler(sampler, spacing, full)
    sched.set_timesteps(n)
    assert sched.timesteps.tolist() == d.timesteps.tolist()[::-1]  # the same timesteps, walked alike
    seed = 3
    x = noise(seed, XT_STEP, SHAPE)
    prev = None
    worst = 0.0
    for index, k in enumerate(range(d.num_steps - 1, -1, -1)):
        t = int(d.timesteps[k])
        out = model(x, torch.full((SHAPE[0],), t))
        ours, pred = reference_step(d, x, k, out, seed=seed, sampler=sampler, clip_denoised=False,
                                    prev_x0=prev if sampler.startswith("dpm") else None)
        extra = {}
        if sampler == "dpm++2m-sde":
            extra["variance_noise"] = noise(seed, t, SHAPE) if k > 0 else torch.zeros(SHAPE)
        elif sampler == "ddim":
            extra["eta"] = 0.0
        theirs = sched.step(out, sched.timesteps[index], x, **extra).prev_sample
        worst = max(worst, rel_err(theirs, ours))
        x, prev = ours, pred
    assert worst < 1e-5, worst


@torch.no_grad()
def test_whole_run_from_the_same_latents():
    """diffusers' loop, driven by our U-Net from our x_T (its `latents`), ends where `sample(x_T=...)` ends."""
    from fastddpm import sample

    full, d, model = _setup("dpm++2m", "trailing", 7)
    sched = _scheduler("dpm++2m", "trailing", full)
    sched.set_timesteps(7)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x = latents.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(SHAPE[0])), t, x).prev_sample
    ours = sample(model, d, SHAPE, sampler="dpm++2m", clip_denoised=False, x_T=latents)
    assert rel_err(ours, x) < 1e-4  # 7 steps of float32 drift on both sides
