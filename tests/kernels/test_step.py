"""The fused sampling-step kernel against `sampling.reference_step`, its torch twin and noise.py.

On a CPU-only host the kernel runs under Triton's interpreter (tests/conftest.py). The step is
the same float32 arithmetic as the reference, so without noise the outputs agree to the last
bit; Triton's randn and fastddpm.noise differ by an ulp or two of z, hence the 1e-6 bounds.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from fastddpm import sample  # noqa: E402
from fastddpm.analytic import gamma_closed_form_gaussian  # noqa: E402
from fastddpm.backends import get_backend  # noqa: E402
from fastddpm.diffusion import GaussianDiffusion  # noqa: E402
from fastddpm.errors import BackendUnavailableError, FastDDPMError  # noqa: E402
from fastddpm.kernels import step as st  # noqa: E402
from fastddpm.noise import XT_STEP, noise  # noqa: E402
from fastddpm.sampling import reference_step  # noqa: E402
from fastddpm.schedule import make_betas  # noqa: E402
from fastddpm.unet import GroupNormAct, UNet  # noqa: E402
from helpers import GaussianEpsModule  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# A seed above 2^31 (the key's unsigned word must not sign-extend) and a nonzero sample offset.
SEED, OFFSET = 2**31 + 12345, 7


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def process(var_type="fixedlarge", mean_type="eps", spec="10", learn_sigma=None):
    """A respaced linear process (T = 100), so original timesteps differ from step indices.
    var_type "analytic" carries the Gamma table of data N(0.2, 0.5^2) (a calibrated model)."""
    betas = make_betas("linear", 100)
    gamma = gaussian_gamma(betas) if var_type == "analytic" else None
    return GaussianDiffusion(betas, mean_type=mean_type, var_type=var_type, learn_sigma=learn_sigma,
                             gamma=gamma).respace(spec)


def gaussian_gamma(betas, std=0.5):
    """Analytic-DPM's Gamma_t of the exact eps-model for data of standard deviation std, float64 [T]."""
    return gamma_closed_form_gaussian(torch.cumprod(1.0 - betas, 0), torch.tensor([std]))


def random_state(diffusion, shape=(3, 3, 5, 7), channels_last=False, seed=0):
    """x_t ~ 1.5 N(0, 1) and a model output: eps ~ N(0, 1), then v for a learned-variance model
    (learned: a log-variance near log beta; otherwise v ~ U(-1, 1), what learned_range reads and a
    fixed or analytic variance ignores)."""
    g = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn(shape, generator=g)
    out = torch.randn(shape, generator=g)
    if diffusion.var_type == "learned":
        out = torch.cat([out, torch.log(1e-3 + 0.02 * torch.rand(shape, generator=g))], 1)
    elif diffusion.learn_sigma:
        out = torch.cat([out, 2.0 * torch.rand(shape, generator=g) - 1.0], 1)
    x, out = x.to(DEVICE), out.to(DEVICE)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        out = out.contiguous(memory_format=torch.channels_last)
    return x, out


def random_prev(shape, seed, channels_last=False):
    """A previous x0 prediction for the multistep solvers: U(-1, 1), as a clipped x0 is."""
    g = torch.Generator().manual_seed(1000 + seed)
    prev = (2.0 * torch.rand(shape, generator=g) - 1.0).to(DEVICE)
    return prev.contiguous(memory_format=torch.channels_last) if channels_last else prev


VARIANTS = [pytest.param("ancestral", var, 0.0, id=f"ancestral-{var}")
            for var in ("fixedlarge", "fixedsmall", "learned", "learned_range", "analytic")]
VARIANTS += [pytest.param("ddim", "fixedlarge", 0.0, id="ddim-eta0"),
             pytest.param("ddim", "learned_range", 0.7, id="ddim-eta0.7-learned_range"),
             pytest.param("ddim", "analytic", 0.0, id="ddim-eta0-analytic"),
             pytest.param("ddim", "analytic", 0.5, id="ddim-eta0.5-analytic"),
             pytest.param("dpm++2m", "fixedlarge", 0.0, id="dpm++2m"),
             pytest.param("dpm++2m", "learned_range", 0.0, id="dpm++2m-learned_range"),  # v ignored
             pytest.param("dpm++2m-sde", "fixedsmall", 0.0, id="dpm++2m-sde")]


@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("sampler, var_type, eta", VARIANTS)
def test_matches_reference_step(sampler, var_type, eta, clip):
    """Every variant at the last, a middle and the final (noise-free) step: x_{t-1} and pred_x0.
    The solvers get a previous prediction (read at the middle step only: its coefficient is 0 at
    the first step walked and at k = 0)."""
    d = process(var_type)
    for k in (d.num_steps - 1, 4, 0):
        x, out = random_state(d, seed=k)
        kw = dict(seed=SEED, sample_offset=OFFSET, sampler=sampler, eta=eta, clip_denoised=clip)
        prev = random_prev(x.shape, k) if sampler.startswith("dpm") else None
        x_prev, x0 = st.triton_step(d, x, k, out, **kw, prev_x0=prev)
        x_ref, x0_ref = reference_step(d, x, k, out, **kw, prev_x0=prev)
        assert x_prev.dtype == x.dtype and x0.shape == x.shape
        assert rel_err(x_prev, x_ref) < 1e-6, k
        assert rel_err(x0, x0_ref) < 1e-6, k
        twin, twin_x0 = st.step_twin(st.step_tables(d, x.device, sampler, eta), x, out, k, seed=SEED,
                                     sample_offset=OFFSET, clip_denoised=clip, prev_x0=prev)
        assert rel_err(twin, x_ref) < 1e-6 and rel_err(twin_x0, x0_ref) < 1e-6, k
        noise_free = k == 0 or (sampler == "ddim" and eta == 0.0 and var_type != "analytic") or sampler == "dpm++2m"
        if DEVICE == "cpu" and noise_free and not (sampler.startswith("dpm") and 0 < k):
            # No noise: the interpreter does the very same float32 operations as torch. (Compiled,
            # the GPU contracts a * b + c into one FMA, which may change the last bit. The solvers'
            # reference is the paper's form, not the kernel's linear one, except at k = 0.)
            assert torch.equal(x_prev, x_ref), k


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_noise_is_fastddpm_noise(channels_last):
    """The kernel's z is noise(seed, t, shape, sample_offset) with t the ORIGINAL timestep.

    x_t = 0, eps = 0 and a learned log-variance of 0 make the mean 0 and sigma exactly 1, so
    x_{t-1} = z with nothing else in it (the zeros isolate the noise; they are not the data).
    Channels-last memory must still number elements in NCHW order.
    """
    d = process("learned")
    k = 6
    assert int(d.timesteps[k]) != k
    shape = (3, 4, 5, 7)
    x = torch.zeros(shape, device=DEVICE)
    out = torch.zeros((3, 8, 5, 7), device=DEVICE)
    if channels_last:
        x, out = x.contiguous(memory_format=torch.channels_last), out.contiguous(memory_format=torch.channels_last)
    z, _ = st.triton_step(d, x, k, out, seed=SEED, sample_offset=OFFSET, clip_denoised=False)
    want = noise(SEED, int(d.timesteps[k]), shape, OFFSET, device=DEVICE)
    assert (z - want).abs().max().item() < 1e-6
    # and not the stream of the step index, another seed or another offset
    for other in (noise(SEED, k, shape, OFFSET), noise(SEED + 1, int(d.timesteps[k]), shape, OFFSET),
                  noise(SEED, int(d.timesteps[k]), shape, OFFSET + 1)):
        assert (z.cpu() - other).abs().max().item() > 0.5


def test_channels_last_and_strided_output():
    """Channels-last x_t with an NCHW model output (and a 2C output sliced for its halves)."""
    d = process("learned_range")
    x, out = random_state(d, channels_last=True, seed=3)
    out = out.contiguous()
    kw = dict(seed=SEED, sample_offset=OFFSET, clip_denoised=True)
    x_prev, x0 = st.triton_step(d, x, 5, out, **kw)
    assert x_prev.is_contiguous(memory_format=torch.channels_last)
    x_ref, x0_ref = reference_step(d, x.contiguous(), 5, out, **kw)
    assert rel_err(x_prev, x_ref) < 1e-6 and rel_err(x0, x0_ref) < 1e-6


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++2m-sde"])
def test_solver_state_in_place(sampler, channels_last):
    """The graph backend's launch: x_t and x_{t-1} one buffer, prev_x0 and the new x0 one buffer,
    walked over every step from a zero state (each element is read before it is written). Against
    the reference fed the previous step's prediction, in both layouts."""
    d = process("fixedlarge", spec="6")
    tables = st.step_tables(d, DEVICE, sampler)
    x, _ = random_state(d, channels_last=channels_last, seed=8)
    state, prev = x.clone(), torch.zeros_like(x)
    k_buf, key = torch.zeros((), dtype=torch.int64, device=DEVICE), st.noise_key(SEED, OFFSET, DEVICE)
    x_ref, prev_ref = x.contiguous(), None
    for k in range(d.num_steps - 1, -1, -1):
        _, out = random_state(d, channels_last=channels_last, seed=20 + k)
        kw = dict(seed=SEED, sample_offset=OFFSET, sampler=sampler, clip_denoised=True)
        x_ref, prev_ref = reference_step(d, x_ref, k, out.contiguous(), **kw, prev_x0=prev_ref)
        k_buf.fill_(k)
        assert st.fused_step(tables, state, out, k_buf, key, out=state, pred_x0=prev, prev_x0=prev) is state
        assert rel_err(state, x_ref) < 1e-6 and rel_err(prev, prev_ref) < 1e-6, k
    assert state.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_solver_prev_x0_checks_and_layouts():
    """triton_step refuses a second-order step without prev_x0 (as the reference does), takes one
    at the first step without reading it, and copies a prev_x0 of another layout or dtype."""
    d = process("fixedlarge")
    x, out = random_state(d, channels_last=True, seed=9)
    kw = dict(seed=SEED, sample_offset=OFFSET, sampler="dpm++2m-sde")
    with pytest.raises(FastDDPMError, match="needs the previous step's x0 prediction"):
        st.triton_step(d, x, 4, out, **kw)
    with pytest.raises(FastDDPMError, match="prev_x0 has shape"):
        st.triton_step(d, x, 4, out, **kw, prev_x0=x[:1])
    first, _ = st.triton_step(d, x, d.num_steps - 1, out, **kw)  # first order: no prev_x0 needed
    assert rel_err(first, reference_step(d, x, d.num_steps - 1, out, **kw)[0]) < 1e-6
    prev = random_prev(x.shape, 4).double()  # NCHW float64 beside a channels-last float32 x_t
    x_prev, x0 = st.triton_step(d, x, 4, out, **kw, prev_x0=prev)
    x_ref, x0_ref = reference_step(d, x, 4, out, **kw, prev_x0=prev.float())
    assert x_prev.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(x_prev, x_ref) < 1e-6 and rel_err(x0, x0_ref) < 1e-6


def test_tables_of_every_sampler():
    """The float32 table holds the float64 coefficients: the solvers' rows are
    solvers.dpm_coefficients', the analytic variances Analytic-DPM's, DRAW off at k = 0 and wherever
    sigma = 0, and cp = 0 at the first step walked and at k = 0 (needs_prev)."""
    from fastddpm.solvers import dpm_coefficients

    d = process("analytic")
    K = d.num_steps
    for sampler in ("dpm++2m", "dpm++2m-sde"):
        t = st.step_tables(d, "cpu", sampler)
        rows = dpm_coefficients(d.schedule, sampler)
        for col, name in ((st.COEF_X, "x"), (st.COEF_X0, "x0"), (st.COEF_PREV, "prev_x0"), (st.COEF_SIGMA, "noise")):
            assert torch.allclose(t.coefs[:, col].double(), rows[name], rtol=1e-7, atol=0), name
        assert t.needs_prev == (False,) + (True,) * (K - 2) + (False,)
        assert (t.coefs[:, st.COEF_DRAW] > 0).tolist() == [False] + [sampler == "dpm++2m-sde"] * (K - 1)
        assert (t.prev_term, t.x_term, t.eps_term, t.var_mode) == (True, True, False, "table")
    anc = st.step_tables(d, "cpu", "ancestral")
    assert torch.allclose(anc.coefs[:, st.COEF_SIGMA].double() ** 2, d.analytic_variance("ancestral"), rtol=1e-6)
    ddim = st.step_tables(d, "cpu", "ddim", 0.3)
    assert torch.allclose(ddim.coefs[:, st.COEF_SIGMA].double() ** 2, d.analytic_variance("ddim", 0.3), rtol=1e-6)
    assert ddim.coefs[0, st.COEF_DRAW] == 0 and bool((ddim.coefs[1:, st.COEF_DRAW] == 1).all())
    assert st.step_tables(d, "cpu", "ddim", 0.3) is ddim  # cached per (device, sampler, eta)
    assert st.step_tables(process(), "cpu", "ddim").coefs[:, st.COEF_DRAW].abs().sum() == 0  # eta 0: no noise


def test_device_step_index_and_key():
    """The launcher reads k and the noise key from device tensors: updating them in place (what a
    CUDA graph replay does) gives every step's result from the same launch arguments."""
    d = process("fixedsmall")
    tables = st.step_tables(d, DEVICE)
    x, out = random_state(d, seed=1)
    k_buf = torch.zeros((), dtype=torch.int64, device=DEVICE)
    key = st.noise_key(0, 0, DEVICE)
    buf = torch.empty_like(x)
    for k in (9, 3, 0):
        k_buf.fill_(k)
        key.copy_(st.noise_key(SEED, OFFSET, DEVICE))
        st.fused_step(tables, x, out, k_buf, key, out=buf)
        x_ref, _ = reference_step(d, x, k, out, seed=SEED, sample_offset=OFFSET)
        assert rel_err(buf, x_ref) < 1e-6, k


def test_bf16_state_matches_twin():
    """A bfloat16 x_t is read and written in bfloat16, computed in float32 like the twin."""
    d = process("fixedlarge")
    x, out = random_state(d, seed=2)
    x, out = x.bfloat16(), out.bfloat16()
    x_prev, _ = st.triton_step(d, x, 5, out, seed=SEED)
    twin, _ = st.step_twin(st.step_tables(d, x.device), x, out, 5, seed=SEED)
    assert x_prev.dtype == torch.bfloat16
    assert rel_err(x_prev, twin) < 1e-2  # the bf16 rounding of the output, 2^-8


def test_unfused_mean_types_refuse():
    x, out = random_state(process())
    for mean_type in ("x0", "xprev"):
        with pytest.raises(BackendUnavailableError, match="mean_type 'eps' only"):
            st.triton_step(process(mean_type=mean_type), x, 3, out, seed=0)


def test_bad_input_errors():
    d = process("learned_range")
    x, out = random_state(d)
    with pytest.raises(FastDDPMError, match="expected 6 channels"):
        st.triton_step(d, x, 3, out[:, :3], seed=0)
    with pytest.raises(FastDDPMError, match="float32, bfloat16 or float16"):
        st.triton_step(d, x.double(), 3, out.double(), seed=0)
    with pytest.raises(FastDDPMError, match="do not fit 32 bits"):
        st.triton_step(d, x, 3, out, seed=0, sample_offset=2**32 - 1)


# ------------------------------------------------------------------------------ whole samplers
def random_unet(learn_sigma=False, seed=0) -> UNet:
    """The tiny U-Net with every parameter random (DDPM zero-inits the final convs, which would
    make the output 0) and random GroupNorm affines."""
    torch.manual_seed(seed)
    model = UNet.from_preset("tiny", learn_sigma=learn_sigma)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.reset_parameters()
        elif isinstance(m, GroupNormAct):
            torch.nn.init.normal_(m.weight, 1.0, 0.2)
            torch.nn.init.normal_(m.bias, 0.0, 0.2)
    return model.eval().to(DEVICE)


def trajectory(model, diffusion, shape, backend, **kw):
    states = []
    final = sample(model, diffusion, shape, seed=SEED, backend=backend, sample_offset=OFFSET,
                   callback=lambda info: states.append(info["x"].clone()), **kw)
    return final, states


def test_unet_trajectory_matches_reference():
    """5 respaced ancestral steps of the random tiny U-Net: the triton backend (fused GroupNorm in
    every block, fused step) follows the reference state by state.

    The fused GroupNorm rounds differently from torch's (about 1e-7 relative per layer), which
    the U-Net and the steps carry forward; measured drift after 5 steps: about 4e-7.
    """
    model = random_unet()
    d = GaussianDiffusion(make_betas("linear", 1000)).respace("5")
    # One sample (the interpreter runs each GroupNorm program in Python); batches are covered above.
    ref, ref_states = trajectory(model, d, (1, 3, 16, 16), "reference")
    out, states = trajectory(model, d, (1, 3, 16, 16), "triton")
    assert ref.std() > 0.3  # a non-trivial sample
    for a, b in zip(states, ref_states):
        assert rel_err(a, b) < 1e-5
    assert rel_err(out, ref) < 1e-5


class GaussianDataModel:
    """The exact eps-predictor for data x0 ~ N(mu, s^2 I): eps = sqrt(1 - ab) (x - sqrt(ab) mu) / (ab s^2 + 1 - ab),
    with a learned_range v output that varies with x, so learned variances are exercised too."""

    def __init__(self, diffusion, mu=0.3, s=0.5):
        self.ab = diffusion.schedule.alphas_cumprod.float()
        self.t_index = {int(t): i for i, t in enumerate(diffusion.timesteps)}
        self.mu, self.s, self.learned = mu, s, diffusion.learned_variance

    def __call__(self, x, t):
        ab = self.ab[self.t_index[int(t[0])]].to(x.device)
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.s**2 + 1 - ab)
        return torch.cat([eps, torch.tanh(x)], 1) if self.learned else eps


@pytest.mark.parametrize("sampler, var_type, eta", [("ancestral", "learned_range", 0.0), ("ddim", "fixedlarge", 0.5),
                                                    ("ancestral", "fixedsmall", 0.0)])
def test_analytic_trajectory_matches_reference(sampler, var_type, eta):
    """The full sampler loop (20 respaced steps) with the backend's step and an exact model."""
    d = GaussianDiffusion(make_betas("cosine", 200), var_type=var_type).respace("20")
    model = GaussianDataModel(d)
    kw = dict(sampler=sampler, eta=eta, clip_denoised=False)
    ref, ref_states = trajectory(model, d, (3, 2, 4, 5), "reference", **kw)
    out, states = trajectory(model, d, (3, 2, 4, 5), "triton", **kw)
    assert len(states) == 20
    assert rel_err(out, ref) < 1e-5
    assert max(rel_err(a, b) for a, b in zip(states, ref_states)) < 1e-5


# Data N(MU, STD^2) per channel: the exact eps-model (helpers.GaussianEpsModule) and its Gamma table.
MU, STD = (0.2, -0.3, 0.5), (0.5, 0.3, 0.4)
TRAJECTORIES = [  # (sampler, eta, var_type, learn_sigma, clip): every sampler x the variances it takes
    ("ancestral", 0.0, "fixedlarge", False, True), ("ancestral", 0.0, "fixedsmall", False, False),
    ("ancestral", 0.0, "learned_range", True, True), ("ancestral", 0.0, "analytic", False, True),
    ("ancestral", 0.0, "fixedsmall", True, True),  # a learned-variance model sampled with a fixed variance
    ("ancestral", 0.0, "analytic", True, False),  # ... and with the analytic one
    ("ddim", 0.0, "fixedlarge", False, True), ("ddim", 0.0, "analytic", False, True),
    ("ddim", 0.5, "fixedlarge", True, True), ("ddim", 0.5, "analytic", False, False),
    ("dpm++2m", 0.0, "fixedlarge", False, True), ("dpm++2m", 0.0, "fixedlarge", True, False),
    ("dpm++2m-sde", 0.0, "fixedlarge", False, True), ("dpm++2m-sde", 0.0, "learned_range", True, False),
]


def gaussian_setup(var_type="fixedlarge", learn_sigma=False, spec="5", dtype=torch.float32):
    """(model, process): the exact eps-model of N(MU, STD^2) data and a linear T = 100 process
    respaced to `spec`, calibrated with that data's Gamma (so var_type "analytic" works)."""
    full = GaussianDiffusion(make_betas("linear", 100))
    gamma = gamma_closed_form_gaussian(full.schedule.alphas_cumprod, torch.tensor(STD))
    d = GaussianDiffusion(full.schedule.betas, var_type=var_type, learn_sigma=learn_sigma, gamma=gamma).respace(spec)
    return GaussianEpsModule(full, MU, STD, learn_sigma=learn_sigma, dtype=dtype).to(DEVICE), d


def states_of(model, d, shape, backend, **kw):
    steps = []
    final = sample(model, d, shape, seed=SEED, sample_offset=OFFSET, backend=backend,
                   callback=lambda info: steps.append((info["x"].clone(), info["pred_x0"].clone())), **kw)
    return final, steps


@pytest.mark.parametrize("sampler, eta, var_type, learn_sigma, clip", TRAJECTORIES,
                         ids=[f"{s}-eta{e}-{v}{'-2C' if ls else ''}-{'clip' if c else 'noclip'}"
                              for s, e, v, ls, c in TRAJECTORIES])
def test_every_sampler_and_variance_trajectory(sampler, eta, var_type, learn_sigma, clip):
    """5 respaced steps of every sampler with every variance it takes, fp32: the triton backend's
    states and x0 predictions within 1e-5 relative of the reference at every step (both compute in
    float32; they differ by rounding, ~1e-7 a step, and by the ulp of z noise.py documents)."""
    model, d = gaussian_setup(var_type, learn_sigma)
    kw = dict(sampler=sampler, eta=eta, clip_denoised=clip)
    ref, ref_steps = states_of(model, d, (2, 3, 8, 8), "reference", **kw)
    out, steps = states_of(model, d, (2, 3, 8, 8), "triton", **kw)
    assert len(steps) == len(ref_steps) == 5 and ref.std() > 0.1
    for (x, x0), (x_ref, x0_ref) in zip(steps, ref_steps):
        assert rel_err(x, x_ref) < 1e-5 and rel_err(x0, x0_ref) < 1e-5
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("sampler, eta, var_type", [("ancestral", 0.0, "analytic"), ("ddim", 0.5, "fixedlarge"),
                                                    ("dpm++2m", 0.0, "fixedlarge"), ("dpm++2m-sde", 0.0, "fixedlarge")])
def test_bf16_model_fp16_state_trajectory(sampler, eta, var_type):
    """A bfloat16 model with a float16 sampler state, walked by the triton step (fp16 read and
    written, fp32 inside), 5 steps.

    Every step against the twin on the same inputs: within 1e-3 relative (the fp16 rounding of the
    outputs, 2^-11). The whole run against the reference run in the same dtypes (which computes
    the step in fp16): within 5e-2 relative, at every step and at the end. That bound is the bf16
    model's, not the step's: the two runs' states differ by fp16 rounding (~1e-3), and rounding the
    model's input to bf16 (2^-8) turns those into whole bf16 ulps of eps on some elements; measured
    1.1e-2 (ancestral, ddim) and 2.2e-2 / 2.8e-2 (dpm++2m, -sde, whose last step returns the x0
    prediction itself), about what fp16 vs fp32 states give in the reference alone (0.6e-2 .. 3.3e-2).
    """
    model, d = gaussian_setup(var_type, dtype=torch.bfloat16)
    shape, K = (2, 3, 8, 8), d.num_steps
    tables = st.step_tables(d, DEVICE, sampler, eta)
    kw = dict(seed=SEED, sample_offset=OFFSET, clip_denoised=True)
    x = noise(SEED, XT_STEP, shape, OFFSET, dtype=torch.float16, device=DEVICE)
    ref, ref_steps = states_of(model, d, shape, "reference", sampler=sampler, eta=eta, dtype=torch.float16)
    prev = None
    for k, (x_ref, _) in zip(range(K - 1, -1, -1), ref_steps):
        out = model(x, d.timesteps[k].expand(shape[0]).to(DEVICE)).to(torch.float16)  # as sample() casts it
        x_prev, x0 = st.triton_step(d, x, k, out, sampler=sampler, eta=eta, prev_x0=prev, **kw)
        twin, twin_x0 = st.step_twin(tables, x, out, k, prev_x0=prev, **kw)
        assert x_prev.dtype == x0.dtype == torch.float16
        assert rel_err(x_prev, twin) < 1e-3 and rel_err(x0, twin_x0) < 1e-3, k
        assert rel_err(x_prev, x_ref) < 5e-2, k
        x, prev = x_prev, x0
    assert rel_err(x.clamp(-1, 1), ref) < 5e-2


@pytest.mark.parametrize("sampler, var_type", [("dpm++2m", "fixedlarge"), ("dpm++2m-sde", "fixedlarge"),
                                               ("ancestral", "analytic"), ("ddim", "analytic")])
def test_new_samplers_do_not_depend_on_batch_or_shard(sampler, var_type):
    """Row b is sample sample_offset + b whatever the batch: a batch of 4 equals its shards of 1 and 3
    (offsets 0 and 1), bit for bit (the kernel's arithmetic per element does not see the batch)."""
    model, d = gaussian_setup(var_type, spec="4")
    full = sample(model, d, (4, 3, 8, 8), seed=SEED, sampler=sampler, backend="triton")
    head = sample(model, d, (1, 3, 8, 8), seed=SEED, sampler=sampler, backend="triton")
    tail = sample(model, d, (3, 3, 8, 8), seed=SEED, sampler=sampler, backend="triton", sample_offset=1)
    assert torch.equal(torch.cat([head, tail]), full)


def test_backend_registration():
    """The registry's triton entry: available here, and it names the fused kernels it swaps in."""
    be = get_backend("triton")
    be.check(torch.device(DEVICE))
    assert be.group_norm_silu is not None and be.step is not None
    x, out = random_state(process())
    a, _ = be.step(process(), x, 4, out, seed=SEED, sample_offset=OFFSET)
    b, _ = reference_step(process(), x, 4, out, seed=SEED, sample_offset=OFFSET)
    assert rel_err(a, b) < 1e-6


@pytest.mark.gpu
@needs_gpu
def test_cuda_graph_replay_gpu():
    """Capture one launch in a CUDA graph and replay it for every k by updating the device index."""
    d = process("learned_range")
    tables = st.step_tables(d, DEVICE)
    x, out = random_state(d, shape=(8, 3, 32, 32), seed=4)
    k_buf = torch.full((), d.num_steps - 1, dtype=torch.int64, device=DEVICE)
    key = st.noise_key(SEED, OFFSET, DEVICE)
    buf = torch.empty_like(x)
    st.fused_step(tables, x, out, k_buf, key, out=buf)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        st.fused_step(tables, x, out, k_buf, key, out=buf)
    for k in range(d.num_steps - 1, -1, -1):
        k_buf.fill_(k)
        graph.replay()
        x_ref, _ = reference_step(d, x, k, out, seed=SEED, sample_offset=OFFSET)
        assert rel_err(buf, x_ref) < 1e-6, k


@pytest.mark.gpu
@needs_gpu
def test_cifar10_shape_gpu():
    """A cifar10-preset batch (256 x 3 x 32 x 32) with learned_range, compiled."""
    d = process("learned_range")
    x, out = random_state(d, shape=(256, 3, 32, 32), seed=5)
    kw = dict(seed=SEED, sample_offset=OFFSET, clip_denoised=True)
    x_prev, x0 = st.triton_step(d, x, 5, out, **kw)
    x_ref, x0_ref = reference_step(d, x, 5, out, **kw)
    assert rel_err(x_prev, x_ref) < 1e-6 and rel_err(x0, x0_ref) < 1e-6
    assert math.isfinite(x_prev.sum().item())


# ------------------------------------------------------------------ compiled for a GPU, without one
def compile_for_sm90() -> None:
    """Compile the step kernel's variants to sm_90 (H100) cubins with Triton's bundled ptxas.

    The interpreter runs Python and accepts constructs the real compiler rejects (non-constexpr
    globals, for one); this compiles what CUDA would run.
    """
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    st._triton()  # binds `tl` in the kernel module
    fn = JITFunction(st._step_kernel)
    # (X_TERM, EPS_TERM, PREV, VAR, CLIP, WRITE_X0, CHANNELS_LAST): ancestral, ddim, the solvers
    for x_term, eps_term, prev, var, clip, write_x0, channels_last in (
            (True, False, False, "learned_range", True, True, False),
            (True, False, False, "learned", False, False, True),
            (False, True, False, "table", True, True, False),
            (True, False, True, "table", True, True, True)):
        constexprs = dict(X_TERM=x_term, EPS_TERM=eps_term, PREV=prev, VAR=var, CLIP=clip, WRITE_X0=write_x0,
                          CHANNELS_LAST=channels_last, NCOEF=st.NUM_COEFS, BLOCK=st.BLOCK)
        sig = {name: "i32" for name in fn.arg_names}  # sizes and strides
        sig.update({name: "*fp32" for name in "X OUT XP X0 PREV_X0 COEF".split()})
        sig.update(TSTEP="*i64", KIDX="*i64", KEY="*i64", **{k: "constexpr" for k in constexprs})
        compiled = triton.compile(triton.compiler.ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": st.NUM_WARPS})
        assert compiled.asm["cubin"], constexprs


def test_compiles_for_sm90():
    """The step kernel compiles for a real GPU (see compile_for_sm90), in a process without the interpreter."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, set to silence its warning
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where helpers.py lives
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests_dir, env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


if __name__ == "__main__":
    compile_for_sm90()
