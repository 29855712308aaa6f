"""Analytic-DPM: the optimal reverse variance of a trained eps-model, with no training
(Bao, Li, Zhu & Zhang 2022, "Analytic-DPM", arXiv 2201.06503).

For a forward process whose step from original timestep t_k to t_{k-1} has posterior
q(x_{k-1} | x_k, x_0) = N(mu~, lambda_k^2 I), the reverse Gaussian with the best likelihood has
the mean of the posterior at x_0 = E[x_0 | x_k] (what an eps-model gives) and the variance
(Theorem 1, written with the x_0-coefficient of the mean)

    sigma*_k^2 = lambda_k^2 + c_k^2 Var[x_0 | x_k],      Var[x_0 | x_k] = (1 - ab_k) / ab_k * (1 - Gamma_k)
    Gamma_k    = E_q ||eps_theta(x_k, t_k)||^2 / d        (a Monte Carlo average over the data, `estimate_gamma`)

with ab = alphabar and c_k the coefficient of x_0 in the reverse mean once eps is written in
terms of x_0 and x_k:
    ancestral (Analytic-DDPM):  lambda^2 = betatilde_k,  c = beta_k sqrt(ab_{k-1}) / (1 - ab_k)   (DDPM eq. 7)
    DDIM, noise scale eta:      lambda^2 = eta^2 betatilde_k,
                                c = sqrt(ab_{k-1}) - sqrt(1 - ab_{k-1} - lambda^2) sqrt(ab_k / (1 - ab_k))
Var[x_0 | x_k] is clipped to [0, ((b - a) / 2)^2] for data in [a, b]^d = [-1, 1]^d (Theorem 2:
sigma*^2 then lies between the paper's lower bound lambda^2 and its upper bound). This is also what
the reference code (baofff/Analytic-DPM, reverse_ddpm_ms_eps / reverse_ddim_ms_eps) computes.
At k = 0 no noise is added when sampling; the decoder's variance there is the fixed
betatilde (clipped) of the process, as in the paper's likelihood code.

Gamma is stored per ORIGINAL timestep t in 0..T-1 (float64 [T]), so one calibration serves
every respacing; a respaced process reads it at its kept timesteps.
"""
from __future__ import annotations

import torch

from .errors import FastDDPMError
from .schedule import Schedule

DATA_HALF_RANGE = 1.0  # images live in [-1, 1]: Var[x_0 | x_k] <= 1


def check_gamma(gamma, T: int) -> torch.Tensor:
    """A calibration table as float64 [T]; FastDDPMError unless it has T finite, non-negative entries."""
    try:
        g = torch.as_tensor(gamma, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise FastDDPMError(f"the Analytic-DPM table Gamma is not an array of numbers ({e})") from None
    if g.ndim != 1 or g.numel() != T:
        raise FastDDPMError(f"the Analytic-DPM table Gamma must hold one value per timestep (T={T}), "
                            f"got shape {list(g.shape)}; calibrate again with `fastddpm calibrate`")
    bad = ~torch.isfinite(g) | (g < 0)
    if bad.any():
        i = int(torch.nonzero(bad)[0])
        raise FastDDPMError(f"the Analytic-DPM table Gamma must be finite and >= 0; Gamma[{i}] = {g[i].item()}")
    return g


def optimal_variance(schedule: Schedule, gamma: torch.Tensor, sampler: str = "ancestral",
                     eta: float = 0.0) -> torch.Tensor:
    """sigma*_k^2 of every step of the process `schedule` (module docstring), float64 [K].

    gamma [K] is Gamma at the process's own steps (the table indexed by its timesteps).
    sampler "ancestral" (any other sampler name but "ddim" is refused) or "ddim" with eta in [0, 1].
    """
    if sampler not in ("ancestral", "ddim"):
        raise FastDDPMError(f"the analytic variance is defined for the ancestral and ddim samplers, not {sampler!r}")
    ab, ab_prev = schedule.alphas_cumprod, schedule.alphas_cumprod_prev
    betatilde = schedule.posterior_variance
    gamma = torch.as_tensor(gamma, dtype=torch.float64)
    if sampler == "ancestral":
        lam2 = betatilde
        c = schedule.posterior_mean_coef1
    else:
        lam2 = float(eta) ** 2 * betatilde
        c = ab_prev.sqrt() - (1.0 - ab_prev - lam2).clamp(min=0.0).sqrt() * (ab / (1.0 - ab)).sqrt()
    var_x0 = ((1.0 - ab) / ab * (1.0 - gamma)).clamp(0.0, DATA_HALF_RANGE**2)
    sigma2 = lam2 + c**2 * var_x0
    sigma2[0] = schedule.posterior_log_variance_clipped[0].exp()  # the fixed decoder (module docstring)
    return sigma2


def gamma_closed_form_gaussian(alphas_cumprod: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Gamma_t of the optimal eps-model for data N(mu, diag(std^2)), float64 [T] (tests use it).

    x_t ~ N(., ab s^2 + 1 - ab) per dimension and E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab),
    so E ||E[eps | x_t]||^2 / d = mean over dimensions of (1 - ab) / (ab s^2 + 1 - ab).
    """
    ab = alphas_cumprod.reshape(-1, 1)
    s2 = torch.as_tensor(std, dtype=torch.float64).reshape(1, -1) ** 2
    return ((1.0 - ab) / (ab * s2 + 1.0 - ab)).mean(dim=1)


@torch.no_grad()
def estimate_gamma(model, diffusion, batches, *, seed: int = 0, progress: bool = False) -> dict:
    """Monte Carlo estimate of Gamma_t = E ||eps_theta(x_t, t)||^2 / d for every t of the full process.

    model      callable (x_t [B, C, ...], t [B] int64 original timesteps) -> output (eps, x0 or
               x_prev per diffusion.mean_type; 2C channels for a learned-variance model)
    diffusion  the FULL process the model was trained with
    batches    a list of x_0 batches [B, C, ...] (the data, in [-1, 1]) on the model's device
    seed       x_t = q_sample(x_0, t, eps) with eps = fastddpm.noise(seed, t, ...) at each image's
               index in the data: one x_t draw per image and timestep, repeatable.
    Returns dict(gamma [T], stderr [T] (float64: the standard error of each mean over the images),
    images, model_calls).
    """
    from tqdm.auto import tqdm

    from .noise import noise

    if diffusion.num_steps != diffusion.num_timesteps:
        raise FastDDPMError("calibrate the full diffusion process, not a respaced one")
    T = diffusion.num_timesteps
    total = torch.zeros(T, dtype=torch.float64)
    total_sq = torch.zeros(T, dtype=torch.float64)
    images, calls, offset = 0, 0, 0
    bar = tqdm(total=T * len(batches), disable=not progress, desc="calibrate", unit="call")
    for x0 in batches:
        B = x0.shape[0]
        d = x0[0].numel()
        for t in range(T):
            tt = torch.full((B,), t, dtype=torch.int64, device=x0.device)
            eps = noise(seed, t, x0.shape, offset, dtype=x0.dtype, device=x0.device)
            xt = diffusion.q_sample(x0, tt, eps)
            out = model(xt, tt)
            mean_part, _ = diffusion.split_output(out, x0.shape[1])
            if diffusion.mean_type == "eps":
                eps_hat = mean_part
            else:  # the eps the model implies, from its unclipped x_0 prediction
                pred = diffusion.p_mean_variance(None, xt, tt, clip_denoised=False, model_output=out)
                eps_hat = pred["eps"]
            per_image = eps_hat.double().pow(2).flatten(1).sum(1).cpu() / d
            total[t] += per_image.sum()
            total_sq[t] += per_image.pow(2).sum()
            calls += 1
            bar.update(1)
        images += B
        offset += B
    bar.close()
    if images < 2:
        raise FastDDPMError("calibration needs at least 2 images (for a standard error)")
    mean = total / images
    var = (total_sq / images - mean**2).clamp(min=0.0) * images / (images - 1)
    return {"gamma": mean, "stderr": (var / images).sqrt(), "images": images, "model_calls": calls}


def gamma_summary(gamma: torch.Tensor) -> str:
    """A one-line description of a table (its range), for logs."""
    return f"Gamma from {float(gamma.min()):.4f} to {float(gamma.max()):.4f} over T={len(gamma)} (mean {float(gamma.mean()):.4f})"


__all__ = ["DATA_HALF_RANGE", "check_gamma", "estimate_gamma", "gamma_closed_form_gaussian", "gamma_summary",
           "optimal_variance"]
