"""DPM-Solver++ (Lu, Zhou, Bao, Chen, Li & Zhu 2022, arXiv 2211.01095): few-step solvers of the
diffusion ODE (and of its SDE) in data (x_0) prediction form.

Notation for the step k of a (respaced) process, from original timestep s = t_k to t = t_{k-1}
(to x_0 itself at k = 0, where alphabar_{-1} = 1):
    alpha = sqrt(alphabar),  sigma = sqrt(1 - alphabar),  lambda = log(alpha / sigma)  (half the log-SNR)
    h     = lambda_t - lambda_s                 (> 0; infinite at k = 0, where sigma_t = 0)
    D0    = x0_theta(x_s, s), the model's (clipped, with clip_denoised) prediction at this step
    m1    = the prediction of the previous step (at s1 = t_{k+1}), r0 = (lambda_s - lambda_s1) / h
    D1    = (D0 - m1) / r0

"dpm++2m" (DPM-Solver++(2M), Algorithm 2 of the paper; diffusers' DPMSolverMultistepScheduler with
algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
final_sigmas_type="zero"):
    first order   x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^-h) D0                 (= DDIM, eta 0)
    second order  x_t = (sigma_t / sigma_s) x_s + alpha_t (1 - e^-h) (D0 + D1 / 2)
"dpm++2m-sde" (SDE-DPM-Solver++(2M), algorithm_type="sde-dpmsolver++"):
    first order   x_t = (sigma_t / sigma_s) e^-h x_s + alpha_t (1 - e^-2h) D0 + sigma_t sqrt(1 - e^-2h) z
    second order  x_t = (sigma_t / sigma_s) e^-h x_s + alpha_t (1 - e^-2h) (D0 + D1 / 2) + sigma_t sqrt(1 - e^-2h) z
The first step (no previous prediction) and the last (to sigma = 0) are first order; every
other step second order. At k = 0 both give x_0 = D0.

`dpm_step` is the reference (the paper's formulas, float64 scalars per step); `dpm_coefficients`
rewrites the same step as one linear form per step,
    x_t = A_k x_s + B_k D0 + P_k m1 + N_k z,
float64 tables [K] that the fused backends read (kernels/step.py, graph.py, ort_sample.py);
tests compare the two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .schedule import Schedule

SOLVERS = ("dpm++2m", "dpm++2m-sde")


def half_log_snr(alphabar: float) -> float:
    """lambda = log(alpha / sigma) = (log alphabar - log(1 - alphabar)) / 2; +inf at alphabar = 1."""
    if alphabar >= 1.0:
        return math.inf
    return 0.5 * (math.log(alphabar) - math.log1p(-alphabar))


def step_order(k: int, num_steps: int) -> int:
    """1 for the first step walked (k = K-1) and the last (k = 0), else 2 (module docstring)."""
    return 1 if k in (0, num_steps - 1) else 2


@dataclass(frozen=True)
class StepScalars:
    """The float64 scalars of step k: x_t = x * x_s + x0 * D0 + prev_x0 * m1 + noise * z."""

    x: float
    x0: float
    prev_x0: float
    noise: float


def step_scalars(schedule: Schedule, k: int, sde: bool) -> StepScalars:
    """The coefficients of step k of the process `schedule` (module docstring), in float64."""
    K = schedule.num_steps
    ab_s, ab_t = float(schedule.alphas_cumprod[k]), float(schedule.alphas_cumprod_prev[k])
    alpha_s, sigma_s = math.sqrt(ab_s), math.sqrt(1.0 - ab_s)
    alpha_t, sigma_t = math.sqrt(ab_t), math.sqrt(max(1.0 - ab_t, 0.0))
    exp_neg_h = alpha_s * sigma_t / (sigma_s * alpha_t)  # e^-h = (alpha_s / sigma_s) / (alpha_t / sigma_t); 0 at k = 0
    if step_order(k, K) == 1:
        half_d1 = 0.0
    else:
        lam_s1 = half_log_snr(float(schedule.alphas_cumprod[k + 1]))
        lam_s, lam_t = half_log_snr(ab_s), half_log_snr(ab_t)
        r0 = (lam_s - lam_s1) / (lam_t - lam_s)
        half_d1 = 0.5 / r0  # D0 + D1 / 2 = (1 + 0.5 / r0) D0 - (0.5 / r0) m1
    if sde:
        weight = alpha_t * (1.0 - exp_neg_h**2)
        return StepScalars(x=sigma_t / sigma_s * exp_neg_h, x0=weight * (1.0 + half_d1), prev_x0=-weight * half_d1,
                           noise=sigma_t * math.sqrt(max(1.0 - exp_neg_h**2, 0.0)))
    weight = alpha_t * (1.0 - exp_neg_h)
    return StepScalars(x=sigma_t / sigma_s, x0=weight * (1.0 + half_d1), prev_x0=-weight * half_d1, noise=0.0)


def dpm_coefficients(schedule: Schedule, sampler: str) -> dict[str, torch.Tensor]:
    """The linear form of every step of `sampler` ("dpm++2m" or "dpm++2m-sde") over `schedule`:
    dict(x, x0, prev_x0, noise) of float64 [K] tables (module docstring)."""
    if sampler not in SOLVERS:
        raise ValueError(f"not a DPM-Solver++ sampler: {sampler!r}")
    rows = [step_scalars(schedule, k, sampler == "dpm++2m-sde") for k in range(schedule.num_steps)]
    return {name: torch.tensor([getattr(r, name) for r in rows], dtype=torch.float64)
            for name in ("x", "x0", "prev_x0", "noise")}


def dpm_step(schedule: Schedule, k: int, x: torch.Tensor, d0: torch.Tensor, m1: torch.Tensor | None,
             sde: bool, z: torch.Tensor | None) -> torch.Tensor:
    """The reference step k of DPM-Solver++(2M) (sde: its SDE variant), in the paper's form.

    x = x_s [B, ...], d0 the current x_0 prediction, m1 the previous step's (None at the first
    step), z the step's Gaussian (used only when sde and k > 0). Returns x_t in x's dtype.
    """
    K = schedule.num_steps
    ab_s, ab_t = float(schedule.alphas_cumprod[k]), float(schedule.alphas_cumprod_prev[k])
    lam_s, lam_t = half_log_snr(ab_s), half_log_snr(ab_t)
    alpha_t, sigma_s, sigma_t = math.sqrt(ab_t), math.sqrt(1.0 - ab_s), math.sqrt(max(1.0 - ab_t, 0.0))
    h = lam_t - lam_s
    D = d0
    if step_order(k, K) == 2:
        if m1 is None:
            raise ValueError("a second-order DPM-Solver++ step needs the previous step's x0 prediction")
        r0 = (lam_s - half_log_snr(float(schedule.alphas_cumprod[k + 1]))) / h
        D = d0 + 0.5 * (d0 - m1) / r0  # D0 + D1 / 2, the midpoint rule
    if not sde:
        return (sigma_t / sigma_s) * x + alpha_t * (-math.expm1(-h)) * D
    out = (sigma_t / sigma_s * math.exp(-h)) * x + alpha_t * (-math.expm1(-2.0 * h)) * D
    if sigma_t > 0.0:
        out = out + sigma_t * math.sqrt(-math.expm1(-2.0 * h)) * z
    return out
