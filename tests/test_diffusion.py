"""GaussianDiffusion against closed forms, in float64 (DDPM eq. 4-14, IDDPM eq. 15-16)."""
import math

import pytest
import torch

from fastddpm.diffusion import (GaussianDiffusion, discretized_gaussian_log_likelihood, mean_flat, normal_kl)
from fastddpm.errors import FastDDPMError
from fastddpm.schedule import make_betas

T = 100
f64 = torch.float64


def _diffusion(**kw):
    return GaussianDiffusion(make_betas("linear", T), **kw)


def _batch(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = (torch.rand(B, 3, 4, 5, generator=g, dtype=f64) * 2 - 1)
    eps = torch.randn(B, 3, 4, 5, generator=g, dtype=f64)
    t = torch.randint(1, T, (B,), generator=g)
    return x0, eps, t


def test_q_sample_is_eq_4():
    d = _diffusion()
    x0, eps, t = _batch()
    ab = d.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(d.q_sample(x0, t, eps), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)


def test_q_posterior_mean_is_the_two_coefficient_formula():
    d = _diffusion()
    x0, eps, t = _batch()
    xt = d.q_sample(x0, t, eps)
    s = d.schedule
    ab, abp, beta = (v[t].view(-1, 1, 1, 1) for v in (s.alphas_cumprod, s.alphas_cumprod_prev, s.betas))
    mean, var, log_var = d.q_posterior(x0, xt, t)
    expected = (abp.sqrt() * beta / (1 - ab)) * x0 + ((1 - abp) * (1 - beta).sqrt() / (1 - ab)) * xt
    torch.testing.assert_close(mean, expected)
    torch.testing.assert_close(var, (beta * (1 - abp) / (1 - ab)).expand_as(xt))
    torch.testing.assert_close(log_var, var.log())


@pytest.mark.parametrize("mean_type", ["eps", "x0", "xprev"])
def test_every_parameterisation_recovers_the_posterior(mean_type):
    """A model that predicts its target exactly gives mu_theta = mu~ and pred_x0 = x0: eps -> x0 -> mean."""
    d = _diffusion(mean_type=mean_type, var_type="fixedsmall")
    x0, eps, t = _batch()
    xt = d.q_sample(x0, t, eps)
    target = {"eps": eps, "x0": x0, "xprev": d.q_posterior(x0, xt, t)[0]}[mean_type]
    out = d.p_mean_variance(None, xt, t, clip_denoised=False, model_output=target)
    torch.testing.assert_close(out["mean"], d.q_posterior(x0, xt, t)[0])
    torch.testing.assert_close(out["pred_x0"], x0)
    torch.testing.assert_close(out["eps"], eps)


def test_eps_mean_is_algorithm_2():
    """mu = (x_t - beta_t / sqrt(1 - alphabar_t) eps) / sqrt(alpha_t) (DDPM eq. 11)."""
    d = _diffusion()
    x0, eps, t = _batch()
    xt = d.q_sample(x0, t, eps)
    s = d.schedule
    ab, beta = s.alphas_cumprod[t].view(-1, 1, 1, 1), s.betas[t].view(-1, 1, 1, 1)
    out = d.p_mean_variance(None, xt, t, clip_denoised=False, model_output=eps)
    torch.testing.assert_close(out["mean"], (xt - beta / (1 - ab).sqrt() * eps) / (1 - beta).sqrt())


def test_clipping_bounds_pred_x0():
    d = _diffusion()
    x0, eps, t = _batch()
    out = d.p_mean_variance(None, d.q_sample(x0, t, eps), t, clip_denoised=True, model_output=5 * eps)
    assert out["pred_x0"].abs().max() <= 1.0


def test_model_is_called_with_original_timesteps():
    d = GaussianDiffusion(make_betas("linear", 1000)).respace("10")
    seen = []

    def model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    x = torch.randn(2, 1, 2, 2, dtype=f64)
    d.p_mean_variance(model, x, torch.tensor([0, 9]))
    assert seen[0].tolist() == [0, 999]
    assert d.num_timesteps == 1000 and d.num_steps == 10


def test_fixed_variances():
    s = _diffusion().schedule
    t = torch.arange(T)
    like = torch.zeros(T, 1, dtype=f64)
    var, log_var = _diffusion(var_type="fixedlarge").variance(None, t, like)
    torch.testing.assert_close(var[1:, 0], s.betas[1:])
    var, log_var = _diffusion(var_type="fixedsmall").variance(None, t, like)
    torch.testing.assert_close(var[:, 0], s.posterior_variance)
    torch.testing.assert_close(log_var[:, 0], s.posterior_log_variance_clipped)


def test_learned_range_interpolates_between_the_fixed_variances():
    """IDDPM eq. 15: Sigma = exp(v log beta + (1 - v) log betatilde); the model outputs 2v - 1."""
    d = _diffusion(var_type="learned_range")
    s = d.schedule
    t = torch.arange(T)
    like = torch.zeros(T, 1, dtype=f64)
    _, lo = d.variance(torch.full((T, 1), -1.0, dtype=f64), t, like)  # v = 0
    _, hi = d.variance(torch.full((T, 1), 1.0, dtype=f64), t, like)  # v = 1
    _, mid = d.variance(torch.zeros(T, 1, dtype=f64), t, like)  # v = 1/2
    torch.testing.assert_close(lo[:, 0], s.posterior_log_variance_clipped)
    torch.testing.assert_close(hi[:, 0], s.betas.log())
    torch.testing.assert_close(mid[:, 0], 0.5 * (s.betas.log() + s.posterior_log_variance_clipped))


def test_learned_variance_needs_twice_the_channels():
    d = _diffusion(var_type="learned_range")
    x = torch.zeros(2, 3, 2, 2, dtype=f64)
    with pytest.raises(FastDDPMError, match="6 output channels"):
        d.p_mean_variance(None, x, torch.tensor([1, 2]), model_output=torch.zeros(2, 3, 2, 2, dtype=f64))


def test_normal_kl():
    m, lv = torch.randn(10, dtype=f64), torch.randn(10, dtype=f64)
    torch.testing.assert_close(normal_kl(m, lv, m, lv), torch.zeros(10, dtype=f64))
    m2, lv2 = torch.randn(10, dtype=f64), torch.randn(10, dtype=f64)
    p = torch.distributions.Normal(m, (0.5 * lv).exp())
    q = torch.distributions.Normal(m2, (0.5 * lv2).exp())
    torch.testing.assert_close(normal_kl(m, lv, m2, lv2), torch.distributions.kl_divergence(p, q))


@pytest.mark.parametrize("mean, log_scale", [(0.0, -3.0), (0.37, -1.0), (-0.9, -5.0), (0.999, -6.0), (0.2, 1.0)])
def test_discretized_decoder_sums_to_one_over_256_bins(mean, log_scale):
    x = torch.arange(256, dtype=f64) / 127.5 - 1.0
    logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_simple_loss_is_the_eps_mse():
    d = _diffusion()
    x0, eps, t = _batch()
    pred = torch.randn_like(eps)
    losses = d.training_losses(lambda x, tt: pred, x0, t, noise=eps)
    torch.testing.assert_close(losses["loss"], mean_flat((pred - eps) ** 2))
    torch.testing.assert_close(losses["vb"], torch.zeros(len(t), dtype=f64))


def test_kl_is_zero_for_the_true_posterior():
    """With the exact eps and Sigma = betatilde, every L_t (t > 0) is KL of identical Gaussians."""
    d = _diffusion(var_type="fixedsmall", loss_type="kl")
    x0, eps, t = _batch()
    losses = d.training_losses(lambda x, tt: eps, x0, t, noise=eps)
    torch.testing.assert_close(losses["vb"], torch.zeros(len(t), dtype=f64), atol=1e-12, rtol=0)
    torch.testing.assert_close(losses["mse"], torch.zeros(len(t), dtype=f64))


def test_vb_at_t0_is_the_decoder_nll():
    d = _diffusion(var_type="fixedsmall", loss_type="kl")
    x0 = (torch.randint(0, 256, (3, 1, 4, 4)).to(f64) / 127.5) - 1.0
    eps = torch.randn_like(x0)
    t = torch.zeros(3, dtype=torch.int64)
    vb = d.training_losses(lambda x, tt: eps, x0, t, noise=eps)["vb"]
    out = d.p_mean_variance(None, d.q_sample(x0, t, eps), t, clip_denoised=False, model_output=eps)
    nll = -mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])) / math.log(2)
    torch.testing.assert_close(vb, nll)
    assert (vb > 0).all()


def test_hybrid_loss_weights_and_detaches_the_mean():
    """loss = mse + vb * T / 1000, and the vb term sends no gradient into the mean (IDDPM sec. 3.1)."""
    d = _diffusion(var_type="learned_range", loss_type="hybrid")
    x0, eps, t = _batch()
    a = torch.tensor(0.7, dtype=f64, requires_grad=True)  # the "mean" parameter
    b = torch.tensor(0.1, dtype=f64, requires_grad=True)  # the "variance" parameter

    def model(x, tt):
        return torch.cat([a * x, b * torch.ones_like(x)], dim=1)

    losses = d.training_losses(model, x0, t, noise=eps)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"] * T / 1000)
    grad_a_total, grad_b_total = torch.autograd.grad(losses["loss"].sum(), [a, b])
    grad_a_mse, = torch.autograd.grad(d.training_losses(model, x0, t, noise=eps)["mse"].sum(), [a])
    torch.testing.assert_close(grad_a_total, grad_a_mse)
    assert grad_b_total.abs() > 0  # the variance does learn from vb


def test_kl_loss_trains_the_mean():
    d = _diffusion(var_type="fixedsmall", loss_type="kl")
    x0, eps, t = _batch()
    a = torch.tensor(0.7, dtype=f64, requires_grad=True)
    losses = d.training_losses(lambda x, tt: a * x, x0, t, noise=eps)
    torch.testing.assert_close(losses["loss"], losses["vb"] * T)
    assert torch.autograd.grad(losses["loss"].sum(), [a])[0].abs() > 0


def test_prior_bpd_is_tiny_for_the_linear_schedule():
    d = GaussianDiffusion(make_betas("linear", 1000))
    x0 = torch.rand(4, 3, 8, 8, dtype=f64) * 2 - 1
    assert (d.prior_bpd(x0) < 1e-4).all()


def test_calc_bpd_loop_shapes_and_total():
    d = _diffusion(var_type="fixedlarge")
    x0 = (torch.randint(0, 256, (2, 1, 3, 3)).to(f64) / 127.5) - 1.0
    torch.manual_seed(0)
    out = d.calc_bpd_loop(lambda x, tt: torch.zeros_like(x), x0)
    assert out["vb"].shape == out["mse"].shape == out["xstart_mse"].shape == (2, T)
    torch.testing.assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    assert (out["vb"] > 0).all()


def test_calc_bpd_loop_terms_match_their_definitions():
    """Each column k is vb_terms_bpd at step k with the same noise; mse and xstart_mse as documented."""
    d = _diffusion(var_type="fixedlarge")
    x0 = torch.rand(2, 1, 3, 3, dtype=f64) * 2 - 1
    model = lambda x, tt: 0.1 * x  # noqa: E731
    torch.manual_seed(1)
    out = d.calc_bpd_loop(model, x0, clip_denoised=False)
    torch.manual_seed(1)
    for k in range(T - 1, -1, -1):  # the loop draws one noise tensor per step, from T-1 down
        t = torch.full((2,), k)
        eps = torch.randn_like(x0)
        ref = d.vb_terms_bpd(model, x0, d.q_sample(x0, t, eps), t, clip_denoised=False)
        torch.testing.assert_close(out["vb"][:, k], ref["output"])
        torch.testing.assert_close(out["mse"][:, k], mean_flat((ref["eps"] - eps) ** 2))
        torch.testing.assert_close(out["xstart_mse"][:, k], mean_flat((ref["pred_x0"] - x0) ** 2))


def test_bad_settings_name_the_valid_ones():
    with pytest.raises(FastDDPMError, match="'fixedlarge'"):
        _diffusion(var_type="large")
    with pytest.raises(FastDDPMError, match="mean_type"):
        _diffusion(mean_type="v")
    with pytest.raises(FastDDPMError, match="already respaced"):
        _diffusion().respace("10").respace("5")


def test_respaced_process_keeps_settings_and_alphabar():
    d = GaussianDiffusion(make_betas("cosine", 1000), var_type="learned_range", loss_type="hybrid")
    r = d.respace("ddim20")
    assert (r.var_type, r.loss_type, r.num_timesteps, r.num_steps) == ("learned_range", "hybrid", 1000, 20)
    torch.testing.assert_close(r.schedule.alphas_cumprod, d.schedule.alphas_cumprod[r.timesteps])
