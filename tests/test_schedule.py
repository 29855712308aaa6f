"""Schedules and their float64 tables against closed forms (DDPM eq. 4-7, IDDPM eq. 17)."""
import math

import pytest
import torch

from fastddpm.errors import FastDDPMError
from fastddpm.schedule import Schedule, check_betas, make_betas, respaced_betas, space_timesteps


def test_linear_is_the_paper_schedule_at_T_1000():
    b = make_betas("linear", 1000)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4, abs=1e-18) and b[-1].item() == pytest.approx(0.02, abs=1e-17)
    assert torch.all(b[1:] > b[:-1])


def test_linear_scales_with_T():
    # Scaled by 1000 / T so a shorter process has comparable total noise.
    b = make_betas("linear", 100)
    assert b[0].item() == pytest.approx(1e-3) and b[-1].item() == pytest.approx(0.2)


def test_cosine_alphabar_matches_closed_form():
    T, s = 1000, 0.008
    sched = Schedule.from_betas(make_betas("cosine", T))
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    ab = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    # Where beta is not capped, the cumulative product reproduces f(t)/f(0) exactly.
    uncapped = (sched.betas < 0.999).nonzero().max().item()
    torch.testing.assert_close(sched.alphas_cumprod[:uncapped + 1], ab[:uncapped + 1], rtol=1e-10, atol=1e-14)
    assert sched.betas.max().item() == pytest.approx(0.999)


def test_alphabar_is_the_cumulative_product():
    betas = make_betas("linear", 1000)
    sched = Schedule.from_betas(betas)
    ab = math.exp(sum(math.log(1 - float(b)) for b in betas[:500]))
    assert sched.alphas_cumprod[499].item() == pytest.approx(ab, rel=1e-12)
    assert sched.alphas_cumprod_prev[0].item() == 1.0


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_tables_match_gaussian_conditioning(name):
    """q(x_{t-1} | x_t, x_0) from the generic conditioning formula of a jointly Gaussian pair."""
    sched = Schedule.from_betas(make_betas(name, 200))
    for t in [1, 2, 57, 199]:
        ab, ab_prev, beta = (float(v[t]) for v in (sched.alphas_cumprod, sched.alphas_cumprod_prev, sched.betas))
        v_prev, v_t = 1 - ab_prev, 1 - ab  # Var(x_{t-1} | x0), Var(x_t | x0)
        cov = math.sqrt(1 - beta) * v_prev  # Cov(x_{t-1}, x_t | x0)
        # mean = sqrt(ab_prev) x0 + cov / v_t (x_t - sqrt(ab) x0)  =>  coefficients of x0 and x_t
        c_xt = cov / v_t
        c_x0 = math.sqrt(ab_prev) - c_xt * math.sqrt(ab)
        assert sched.posterior_mean_coef1[t].item() == pytest.approx(c_x0, rel=1e-10)
        assert sched.posterior_mean_coef2[t].item() == pytest.approx(c_xt, rel=1e-10)
        assert sched.posterior_variance[t].item() == pytest.approx(v_prev - cov**2 / v_t, rel=1e-8)


def test_posterior_log_variance_is_clipped_at_t0():
    sched = Schedule.from_betas(make_betas("linear", 1000))
    assert sched.posterior_variance[0].item() == 0.0
    assert sched.posterior_log_variance_clipped[0].item() == math.log(sched.posterior_variance[1].item())
    torch.testing.assert_close(sched.posterior_log_variance_clipped[1:], sched.posterior_variance[1:].log())
    assert sched.fixedlarge_variance[0].item() == sched.posterior_variance[1].item()
    torch.testing.assert_close(sched.fixedlarge_variance[1:], sched.betas[1:])


def test_reciprocal_tables():
    sched = Schedule.from_betas(make_betas("cosine", 100))
    ab = sched.alphas_cumprod
    torch.testing.assert_close(sched.sqrt_recip_alphas_cumprod, 1 / ab.sqrt())
    torch.testing.assert_close(sched.sqrt_recipm1_alphas_cumprod, (1 / ab - 1).sqrt())


def test_user_betas():
    sched = Schedule.from_betas([0.1, 0.2, 0.3])
    assert sched.alphas_cumprod[-1].item() == pytest.approx(0.9 * 0.8 * 0.7)
    for bad in ([], [0.1, 0.0], [0.5, 1.5], [float("nan")]):
        with pytest.raises(FastDDPMError):
            check_betas(bad)


def test_linear_needs_T_above_20():
    # T = 20 would end at beta = 1: alphabar_T = 0 and the eps sampler divides by sqrt(0) (NaN samples)
    assert make_betas("linear", 21)[-1].item() == pytest.approx(20 / 21)
    assert torch.isfinite(Schedule.from_betas(make_betas("linear", 21)).sqrt_recip_alphas_cumprod).all()
    for T in (10, 20):
        with pytest.raises(FastDDPMError, match="T > 20"):
            make_betas("linear", T)


@pytest.mark.parametrize("T", [0, -5, 100_001, 10**12, 2.5, True, "1000"])
def test_bad_step_counts_are_refused_before_allocating(T):
    with pytest.raises(FastDDPMError, match="number of diffusion steps"):
        make_betas("cosine", T)


@pytest.mark.parametrize("betas, message", [
    ([0.1, 1.0], r"beta\[1\] = 1.0"),  # alphabar_1 = 0: x_0 = x_t / sqrt(0)
    ([1.0, 1.0, 1.0], r"beta\[0\] = 1.0"),
    ([0.1, -0.2], r"beta\[1\] = -0.2"),
    ([0.1, float("inf")], r"beta\[1\] = inf"),
    (0.5, "1-D"),  # a 0-d "schedule"
    ([[0.1, 0.2]], "1-D"),
    ("abc", "not an array of numbers"),
    ([0.5] * 1200, "alphabar to 0 at t="),  # 0.5^1075 underflows float64
])
def test_bad_betas_are_named(betas, message):
    with pytest.raises(FastDDPMError, match=message):
        Schedule.from_betas(betas)


def test_unknown_schedule_names_the_valid_ones():
    with pytest.raises(FastDDPMError, match="'linear', 'cosine'"):
        make_betas("quadratic", 10)


def test_space_timesteps_even():
    kept = space_timesteps(1000, "50")
    assert len(kept) == 50 and kept[0] == 0 and kept[-1] == 999
    assert space_timesteps(1000, "1000") == list(range(1000))


def test_space_timesteps_sections():
    # T=100 in 3 sections of 34, 33, 33 steps (the first T mod 3 one longer), keeping 2, 3 and 4
    # evenly spaced steps: strides 33, 16 and 32/3, rounded as improved-diffusion rounds.
    assert space_timesteps(100, "2,3,4") == [0, 33, 34, 50, 66, 67, 78, 88, 99]


def test_space_timesteps_ddim_stride():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim1000") == list(range(1000))


@pytest.mark.parametrize("spec, message", [
    ("ddim300", "exactly 300 of 1000"),  # strides 3 and 4 give 334 and 250 steps
    ("0", "positive"),
    ("abc", "bad respacing"),
    ("1001", "cannot keep 1001"),
    ("600,600", "cannot keep 600 steps of a section of 500"),
    ("ddim3000", r"in 1\.\.T=1000"),  # no suggestion of '3000', which is refused too
    ("trailing0", "takes 1 to 1000 steps"),
    ("linspace1001", "takes 1 to 1000 steps"),
    ("leadingx", "expected 'leadingN'"),
])
def test_bad_respacing_is_explained(spec, message):
    with pytest.raises(FastDDPMError, match=message):
        space_timesteps(1000, spec)


@pytest.mark.parametrize("spec", ["50", "10,20,30", "ddim25", "7", "trailing10", "linspace7", "leading3"])
def test_respacing_keeps_alphabar_of_kept_steps(spec):
    full = Schedule.from_betas(make_betas("linear", 1000))
    kept = space_timesteps(1000, spec)
    short = Schedule.from_betas(respaced_betas(full.alphas_cumprod, kept))
    torch.testing.assert_close(short.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------ diffusers' spacings
def _diffusers_timesteps(scheduler_name: str, T: int, spacing: str, n: int) -> list[int]:
    """What a diffusers scheduler's set_timesteps visits (ascending), configured as fastddpm's process."""
    diffusers = pytest.importorskip("diffusers")
    cls = getattr(diffusers, scheduler_name)
    sched = cls(num_train_timesteps=T, beta_schedule="linear", timestep_spacing=spacing)
    sched.set_timesteps(n)
    return sorted(int(t) for t in sched.timesteps)


# T = 1000 at step counts that divide it and that do not (7, 61: numpy's float arange gives the
# trailing rule an extra -1 at n = 61, which fastddpm drops), and an odd T.
SPACING_CASES = [(1000, n) for n in (1, 7, 10, 50, 61, 999)] + [(250, n) for n in (3, 17, 249)]


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("T, n", SPACING_CASES)
def test_spacings_are_diffusers_ddim_and_ddpm_rules(spacing, T, n):
    from fastddpm.schedule import diffusers_timesteps

    ours = diffusers_timesteps(T, spacing, n)
    assert ours == space_timesteps(T, f"{spacing}{n}")
    for name in ("DDIMScheduler", "DDPMScheduler"):
        theirs = _diffusers_timesteps(name, T, spacing, n)
        if spacing == "trailing" and len(theirs) == n + 1:  # the -1 quirk
            assert theirs[0] == -1
            theirs = theirs[1:]
        assert ours == theirs, name


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("T, n", SPACING_CASES)
def test_solver_spacings_are_dpm_solver_multistep_rules(spacing, T, n):
    from fastddpm.schedule import diffusers_timesteps

    if n >= T and spacing != "trailing":
        with pytest.raises(FastDDPMError, match=f"takes 1 to {T - 1} steps"):
            diffusers_timesteps(T, spacing, n, solver=True)
        return
    ours = diffusers_timesteps(T, spacing, n, solver=True)
    theirs = _diffusers_timesteps("DPMSolverMultistepScheduler", T, spacing, n)
    if spacing == "trailing" and len(theirs) == n + 1:
        theirs = theirs[1:]
    assert ours == theirs


def test_sampling_timesteps_picks_the_peer_schedulers_rule():
    from fastddpm.schedule import diffusers_timesteps, sampling_timesteps

    assert sampling_timesteps(1000, 10, "ancestral", "linspace") == diffusers_timesteps(1000, "linspace", 10)
    assert sampling_timesteps(1000, 10, "ddim", "leading") == diffusers_timesteps(1000, "leading", 10)
    assert sampling_timesteps(1000, 10, "dpm++2m", "linspace") == diffusers_timesteps(1000, "linspace", 10,
                                                                                      solver=True)
    assert 0 not in sampling_timesteps(1000, 10, "dpm++2m-sde", "leading")  # the solver's last step jumps to x_0
    # iddpm: "N" evenly spaced, and DDIM's stride when one lands on N steps
    assert sampling_timesteps(1000, 50, "ddim") == space_timesteps(1000, "ddim50")
    assert sampling_timesteps(1000, 300, "ddim") == space_timesteps(1000, "300")
    assert sampling_timesteps(1000, 10, "dpm++2m") == space_timesteps(1000, "10")
    assert sampling_timesteps(1000, None) == list(range(1000))
    with pytest.raises(FastDDPMError, match="spacing"):
        sampling_timesteps(1000, 10, "ancestral", "karras")
    with pytest.raises(FastDDPMError, match="between 1 and the model's T = 1000"):
        sampling_timesteps(1000, 1001)


def test_explicit_timesteps():
    from fastddpm import GaussianDiffusion

    full = GaussianDiffusion(make_betas("linear", 1000))
    d = full.respace([999, 800, 500, 200, 0])
    assert d.timesteps.tolist() == [0, 200, 500, 800, 999] and d.num_timesteps == 1000
    torch.testing.assert_close(d.schedule.alphas_cumprod, full.schedule.alphas_cumprod[[0, 200, 500, 800, 999]],
                               rtol=1e-12, atol=0)
    import numpy as np

    assert full.respace(np.array([10, 5])).timesteps.tolist() == [5, 10]
    assert full.respace(torch.tensor([7])).timesteps.tolist() == [7]
    for bad, message in [([0, 200], "strictly decreasing"), ([500, 500], "strictly decreasing"),
                         ([1000, 5], r"in 0\.\.999"), ([5, -1], r"in 0\.\.999"), ([], "empty"),
                         ([5.5], "integers"), (["a"], "integers")]:
        with pytest.raises(FastDDPMError, match=message):
            full.respace(bad)
