"""Analytic-DPM (fastddpm/analytic.py): the optimal variance, its bounds, the Monte Carlo
calibration, and sampling with it, checked against Gaussian data whose posterior is known.

For data N(mu, s^2 I) with the same s in every dimension, the reverse conditional
q(x_{k-1} | x_k) of the ancestral (and of DDIM's generalised) process is exactly Gaussian with the
posterior mean at E[x_0 | x_k] and variance lambda^2 + c^2 Var[x_0 | x_k]: Analytic-DPM's sigma*^2
with the closed-form Gamma. So sampling with it reproduces the data's moments EXACTLY at any
number of steps (no discretisation error), where beta_t and betatilde_t do not.
"""
import math

import pytest
import torch

from fastddpm import GaussianDiffusion, make_betas, sample
from fastddpm.analytic import check_gamma, estimate_gamma, gamma_closed_form_gaussian, optimal_variance
from fastddpm.errors import FastDDPMError
from helpers import gaussian_eps_model, gaussian_x0_affine

MU = torch.tensor([0.3, -0.5, 0.0, 0.8], dtype=torch.float64)
S = 0.3
STD = torch.full((4,), S, dtype=torch.float64)


def _calibrated(T=1000, schedule="linear"):
    full = GaussianDiffusion(make_betas(schedule, T))
    return full.with_gamma(gamma_closed_form_gaussian(full.schedule.alphas_cumprod, STD))


@pytest.mark.parametrize("sampler, eta", [("ancestral", 0.0), ("ddim", 0.0), ("ddim", 0.5), ("ddim", 1.0)])
def test_optimal_variance_is_the_papers_theorem_1(sampler, eta):
    """sigma*^2 = lambda^2 + (sqrt(bbar_n / alpha_n) - sqrt(bbar_{n-1} - lambda^2))^2 (1 - Gamma_n)
    (Bao et al. 2022, Theorem 1, with alpha_n the per-step alpha and bbar = 1 - alphabar), where
    the bracket's Var[x_0 | x_n] is inside its clip."""
    d = GaussianDiffusion(make_betas("cosine", 1000)).respace("trailing20")
    s = d.schedule
    g = torch.Generator().manual_seed(1)
    gamma = 0.5 + 0.5 * torch.rand(d.num_steps, generator=g, dtype=torch.float64)  # keeps Var[x0|xn] < 1 mostly
    ab, abp = s.alphas_cumprod, s.alphas_cumprod_prev
    lam2 = s.posterior_variance * (1.0 if sampler == "ancestral" else eta**2)
    paper = lam2 + ((1 - ab) / (ab / abp)).sqrt().sub((1 - abp - lam2).clamp(min=0).sqrt()) ** 2 * (1 - gamma)
    ours = optimal_variance(s, gamma, sampler, eta)
    inside = ((1 - ab) / ab * (1 - gamma)) <= 1.0
    inside[0] = False  # step 0 is the fixed decoder
    assert inside.sum() > 5
    torch.testing.assert_close(ours[inside], paper[inside], rtol=1e-10, atol=0)


def test_optimal_variance_lies_between_the_bounds():
    """Theorem 2: lambda^2 <= sigma*^2 <= lambda^2 + c^2 ((b - a) / 2)^2 for data in [a, b], whatever Gamma."""
    d = GaussianDiffusion(make_betas("linear", 1000)).respace("50")
    s = d.schedule
    for gamma in (torch.zeros(50), torch.full((50,), 3.0), torch.rand(50, generator=torch.Generator().manual_seed(0)) * 2):
        v = optimal_variance(s, gamma.double(), "ancestral")[1:]
        lam2, c = s.posterior_variance[1:], s.posterior_mean_coef1[1:]
        assert (v >= lam2 * (1 - 1e-12)).all() and (v <= (lam2 + c**2) * (1 + 1e-12)).all()


def _prior(d: GaussianDiffusion):
    """The exact marginal q(x_{t_K}) of the data at the process's first step: (mean, variance) per dimension."""
    ab = d.schedule.alphas_cumprod[-1]
    return ab.sqrt() * MU, ab * STD**2 + 1 - ab


def _propagate(d: GaussianDiffusion, sampler: str, eta: float = 0.0):
    """Exact per-dimension (mean, std) of ancestral / DDIM sampling with the Gaussian data's optimal eps,
    started from the exact marginal at the first step (so the only errors are the steps')."""
    s = d.schedule
    m, v = _prior(d)
    var_table = d.analytic_variance(sampler, eta) if d.var_type == "analytic" else None
    for k in range(d.num_steps - 1, -1, -1):
        ab, abp = s.alphas_cumprod[k], s.alphas_cumprod_prev[k]
        xa, xb = gaussian_x0_affine(ab, MU, STD)  # x0 = xa x + xb
        if sampler == "ancestral":
            a, b = s.posterior_mean_coef1[k] * xa + s.posterior_mean_coef2[k], s.posterior_mean_coef1[k] * xb
        else:
            lam2 = eta**2 * s.posterior_variance[k]
            w = (1 - abp - lam2).clamp(min=0).sqrt() / (1 - ab).sqrt()  # eps = (x - sqrt(ab) x0) / sqrt(1 - ab)
            a = abp.sqrt() * xa + w * (1 - ab.sqrt() * xa)
            b = abp.sqrt() * xb - w * ab.sqrt() * xb
        if k == 0:
            var = 0.0
        elif var_table is not None:
            var = var_table[k]
        elif sampler == "ancestral":
            var = s.fixedlarge_variance[k] if d.var_type == "fixedlarge" else s.posterior_variance[k]
        else:
            var = eta**2 * s.posterior_variance[k]
        m, v = a * m + b, a * a * v + var
    return m, v.sqrt()


# (Processes that keep t = 0 and T - 1: "ddim10" starts at t = 900 from N(0, I), a prior mismatch
# of its own; one ending at t_0 = 199, as "trailing5", loses Var[x_0 | x_199] at its
# last, noiseless step, and that is not the variance's doing.)
@pytest.mark.parametrize("spec, sampler, eta", [("10", "ancestral", 0.0), ("4", "ancestral", 0.0),
                                                ("10", "ddim", 0.0), ("10", "ddim", 1.0)])
def test_analytic_sampling_is_exact_on_gaussian_data(spec, sampler, eta):
    full = _calibrated()
    d = full.with_variance("analytic").respace(spec)
    N = 20000
    m0, v0 = _prior(d)
    x_T = m0.view(1, 4, 1, 1) + v0.sqrt().view(1, 4, 1, 1) * torch.randn(
        N, 4, 1, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    x = sample(gaussian_eps_model(full, MU, STD), d, (N, 4, 1, 1), seed=3, sampler=sampler, eta=eta,
               clip_denoised=False, dtype=torch.float64, x_T=x_T).view(N, 4)
    m_exact, s_exact = _propagate(d, sampler, eta)
    # Exact but for the last step, whose jump from x_{t_0} to E[x_0 | x_{t_0}] adds no noise: the
    # output's variance is the data's less Var[x_0 | x_{t_0}] (1.1e-3 of it at t_0 = 0), to 1e-9.
    ab0 = d.schedule.alphas_cumprod[0]
    lost = S**2 * (1 - ab0) / (ab0 * S**2 + 1 - ab0)
    torch.testing.assert_close(s_exact**2, STD**2 - lost, rtol=1e-9, atol=0)
    assert ((m_exact - MU).abs() / STD).max() < 1e-9
    assert ((x.mean(0) - m_exact).abs() <= 5 * s_exact / math.sqrt(N)).all()
    assert ((x.std(0) - s_exact).abs() <= 5 * s_exact / math.sqrt(2 * N)).all()


def test_fixed_variances_are_not_exact_where_analytic_is():
    """The contrast of the test above: at 10 steps betatilde under-disperses and beta over-disperses."""
    full = _calibrated()
    errs = {}
    for var in ("fixedsmall", "fixedlarge", "analytic"):
        _, s_exact = _propagate(full.with_variance(var).respace("10"), "ancestral")
        errs[var] = ((s_exact - STD) / STD).mean().item()
    assert errs["fixedsmall"] < -0.01 and errs["fixedlarge"] > 0.05 and abs(errs["analytic"]) < 2e-3, errs


def test_estimate_gamma_matches_the_closed_form():
    """Monte Carlo over 2,000 draws of the data: every t within 5 standard errors of the closed form."""
    full = GaussianDiffusion(make_betas("linear", 250))
    g = torch.Generator().manual_seed(0)
    x0 = (MU.view(1, 4, 1, 1) + S * torch.randn(2000, 4, 1, 1, generator=g, dtype=torch.float64))
    out = estimate_gamma(gaussian_eps_model(full, MU, STD), full, [x0[:1200], x0[1200:]], seed=5)
    exact = gamma_closed_form_gaussian(full.schedule.alphas_cumprod, STD)
    assert out["images"] == 2000 and out["model_calls"] == 500
    z = (out["gamma"] - exact) / out["stderr"]
    assert z.abs().max() < 5.0, z.abs().max()  # 250 timesteps: the largest |z| of 250 normals is ~3
    assert out["stderr"].max() < 0.05


def test_gamma_table_is_checked():
    assert check_gamma([0.5] * 3, 3).dtype == torch.float64
    for bad, message in [([0.5] * 2, "one value per timestep"), ([0.5, -0.1, 0.2], r"Gamma\[1\] = -0.1"),
                         ([0.5, float("nan"), 0.2], "finite"), ("abc", "not an array")]:
        with pytest.raises(FastDDPMError, match=message):
            check_gamma(bad, 3)


def test_with_variance_rules():
    fixed = GaussianDiffusion(make_betas("linear", 1000))
    with pytest.raises(FastDDPMError, match="fastddpm calibrate"):
        fixed.with_variance("analytic")
    with pytest.raises(FastDDPMError, match="trained with learned variances"):
        fixed.with_variance("learned")
    with pytest.raises(FastDDPMError, match="variance"):
        fixed.with_variance("cosine")
    learned = GaussianDiffusion(make_betas("linear", 1000), var_type="learned_range")
    small = learned.with_variance("fixedsmall")
    assert small.learn_sigma and small.var_type == "fixedsmall" and small.config()["var_type"] == "learned_range"
    assert small.with_variance("learned").var_type == "learned_range"
    # a learned-variance model sampled with a fixed variance: its variance channels are ignored
    model = lambda x, t: torch.cat([0.1 * x, torch.full_like(x, 5.0)], dim=1)  # noqa: E731
    a = sample(model, small.respace("5"), (2, 1, 2, 2), seed=1, clip_denoised=False)
    b = sample(lambda x, t: 0.1 * x, GaussianDiffusion(make_betas("linear", 1000), var_type="fixedsmall").respace("5"),
               (2, 1, 2, 2), seed=1, clip_denoised=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(FastDDPMError, match="training uses the variance"):
        small.training_losses(model, torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64))


def test_calibrated_checkpoint_round_trip(tmp_path):
    from fastddpm import UNet, load_checkpoint, save_checkpoint

    model = UNet.from_preset("tiny", image_size=8)
    d = GaussianDiffusion(make_betas("linear", 100)).with_gamma(torch.linspace(0.1, 1.0, 100, dtype=torch.float64))
    save_checkpoint(tmp_path / "c.safetensors", model, d, analytic_dpm={"images": 3}, step=7)
    _, d2, meta = load_checkpoint(tmp_path / "c.safetensors")
    torch.testing.assert_close(d2.gamma, d.gamma, rtol=0, atol=0)
    assert meta["analytic_dpm"]["images"] == 3 and meta["step"] == 7
    assert d2.with_variance("analytic").respace("10").var_type == "analytic"
