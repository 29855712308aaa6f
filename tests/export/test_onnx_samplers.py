"""The few-step samplers, spacings and variances of issue 18 in ONNX: dpm++2m, dpm++2m-sde and Analytic-DPM's
variance (ancestral, and DDIM with eta 0.5) through eps graphs and step graphs, in the host loop and in the
I/O-binding device loop (run on the CPU provider), against the reference `sample(...)` on the same tiny model
(image_size 8) and seed; the timestep rules and the float64 tables of export/ort_sample.py against fastddpm's;
the new flags of `python ort_sample.py` against `fastddpm sample --backend onnx`.

Tolerances: fp32 trajectories within 1e-5 relative at every step (measured 3e-7 to 8e-7 over 4 steps: ONNX
Runtime's kernels, and the noise, whose float32 log and cos agree with torch's to about 1e-6 absolute, see
ort_sample's docstring); float64 tables within 1e-12 relative (numpy's and the C library's log may differ in
the last bit).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fastddpm import GaussianDiffusion, make_betas, sample  # noqa: E402
from fastddpm.cli import main  # noqa: E402
from fastddpm.errors import FastDDPMError  # noqa: E402
from fastddpm.export import ort_sample  # noqa: E402
from fastddpm.export.ort_backend import OnnxEpsModel, load_onnx, numpy_process  # noqa: E402
from fastddpm.generate import respaced_for  # noqa: E402
from fastddpm.schedule import sampling_timesteps  # noqa: E402
from fastddpm.solvers import dpm_coefficients  # noqa: E402
from helpers import rel_err  # noqa: E402
from onnx_helpers import ORT_THREADS  # noqa: E402

SHAPE = (2, 3, 8, 8)
# name -> (sampler, eta, variance, spacing): each sampler on a different spacing, 4 steps of T = 100
CONFIGS = {"dpm++2m": ("dpm++2m", 0.0, None, "trailing"), "dpm++2m-sde": ("dpm++2m-sde", 0.0, None, "linspace"),
           "analytic": ("ancestral", 0.0, "analytic", "iddpm"), "analytic-ddim": ("ddim", 0.5, "analytic", "leading")}


def process_for(full, name, steps=4):
    sampler, _, variance, spacing = CONFIGS[name]
    return respaced_for(full.with_variance(variance) if variance else full, steps, sampler, spacing)


@pytest.fixture(scope="module")
def onnx_models(calibrated):
    """kind -> OnnxEpsModel of the calibrated exports on the CPU provider (one thread), opened once."""
    return {kind: OnnxEpsModel(ort_sample.OnnxModel(calibrated[kind], provider="cpu", threads=ORT_THREADS))
            for kind in ("eps", "step")}


@pytest.fixture(scope="module")
def reference(calibrated):
    """name -> (x_T, every state of the reference run): a custom start, as diffusers' latents=."""
    cache = {}

    def get(name):
        if name not in cache:
            sampler, eta, _, _ = CONFIGS[name]
            x_T = 0.9 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
            states = []
            sample(calibrated["model"], process_for(calibrated["diffusion"], name), SHAPE, seed=3, sampler=sampler,
                   eta=eta, x_T=x_T, callback=lambda info: states.append(info["x"].clone()))
            cache[name] = x_T, states
        return cache[name]
    return get


@pytest.mark.parametrize("loop", ["eps", "step", "step-device"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_trajectories_equal_the_reference(calibrated, onnx_models, reference, name, loop):
    """eps, step: `sample(onnx_model, ..., backend="onnx", x_T=...)` with the process built from the file's own
    diffusion (Gamma included); step-device: ort_sample.sample_loop(device_loop=True) on the CPU provider."""
    sampler, eta, _, _ = CONFIGS[name]
    x_T, want = reference(name)
    model = onnx_models["step" if loop == "step-device" else loop]
    full = model.diffusion()
    assert torch.equal(full.gamma, calibrated["diffusion"].gamma)  # the table travels in the file
    process = process_for(full, name)
    states = []
    if loop == "step-device":
        final = torch.from_numpy(ort_sample.sample_loop(
            model.ort, numpy_process(process), SHAPE, seed=3, sampler=sampler, eta=eta, x_T=x_T.numpy(),
            device_loop=True, callback=lambda info: states.append(torch.from_numpy(info["x"].copy()))))
    else:
        final = sample(model, process, SHAPE, seed=3, sampler=sampler, eta=eta, backend="onnx", x_T=x_T,
                       callback=lambda info: states.append(info["x"].clone()))
    assert len(states) == len(want) == 4
    for i, (got, ref) in enumerate(zip(states, want)):
        assert rel_err(got, ref) < 1e-5, f"step {i}"
    assert rel_err(final, want[-1].clamp(-1, 1)) < 1e-5


def test_a_learned_variance_model_ignores_its_variance_channels(exports, tiny_learned):
    """The learned_range step graph sampled with fixedsmall (ancestral) and by dpm++2m equals the reference."""
    model, full = tiny_learned
    onnx_model = OnnxEpsModel(ort_sample.OnnxModel(exports["step_learned"], provider="cpu", threads=ORT_THREADS))
    for sampler, process in (("ancestral", full.with_variance("fixedsmall").respace("3")),
                             ("dpm++2m", full.respace("trailing3"))):
        got = sample(onnx_model, process, (2, 3, 16, 16), seed=6, sampler=sampler, backend="onnx")
        want = sample(model, process, (2, 3, 16, 16), seed=6, sampler=sampler)
        assert rel_err(got, want) < 1e-5, sampler


# ------------------------------------------------------------------------------------------ tables
STEP_COUNTS = (None, 1, 2, 3, 4, 7, 10, 61, 103, 249, 250, 999, 1000, 1001)


def test_timesteps_equal_fastddpm_sampling_timesteps():
    """992 (T, N, sampler, spacing): 824 timestep lists, including diffusers' trailing rule that yields a -1
    (T = 1000, N = 61 or 103), and 168 requests both refuse, with the same message."""
    compared = 0
    for T in (1, 2, 7, 37, 100, 250, 1000):
        for steps in sorted({s for s in STEP_COUNTS if s is None or s <= T + 1} | {T - 1, T, T + 1} - {0},
                            key=lambda s: -1 if s is None else s):
            for sampler in ort_sample.SAMPLERS:
                for spacing in ort_sample.SPACINGS:
                    try:
                        want = sampling_timesteps(T, steps, sampler, spacing)
                    except FastDDPMError as e:
                        with pytest.raises(ort_sample.SampleError) as got:
                            ort_sample.sampling_timesteps(T, steps, sampler, spacing)
                        assert str(got.value) == str(e)
                        continue
                    assert ort_sample.sampling_timesteps(T, steps, sampler, spacing) == want, (T, steps, sampler,
                                                                                                spacing)
                    compared += 1
    assert compared == 824
    assert len(ort_sample.sampling_timesteps(1000, 61, "ancestral", "trailing")) == 61  # the dropped -1


@pytest.mark.parametrize("schedule,T,steps,spacing", [("linear", 100, 10, "iddpm"), ("cosine", 1000, 25, "trailing"),
                                                      ("linear", 1000, None, "iddpm"), ("cosine", 250, 7, "leading")])
def test_tables_equal_fastddpm(schedule, T, steps, spacing):
    """Analytic-DPM's variance (ancestral, DDIM with eta 0, 0.5, 1) and the DPM-Solver++ linear forms, float64."""
    gamma = np.random.default_rng(T).uniform(0.0, 1.2, T)  # above 1 too: Var[x_0 | x_t] is clipped at 0
    full = GaussianDiffusion(make_betas(schedule, T), gamma=gamma)
    for sampler, etas in (("ancestral", [0.0]), ("ddim", [0.0, 0.5, 1.0]), ("dpm++2m", [0.0]), ("dpm++2m-sde", [0.0])):
        process = respaced_for(full, steps, sampler, spacing)
        ours = ort_sample.Process.from_full(full.schedule.betas.numpy(), steps, sampler, "eps", "fixedlarge",
                                            spacing=spacing, gamma=gamma)
        assert ours.timesteps.tolist() == process.timesteps.tolist()
        if sampler.startswith("dpm"):
            theirs = dpm_coefficients(process.schedule, sampler)
            names = {"w_x": "x", "w_x0": "x0", "w_prev": "prev_x0", "noise_scale": "noise"}
            for name, value in ours.dpm_coefficients(sampler == "dpm++2m-sde").items():
                np.testing.assert_allclose(value, theirs[names[name]].numpy(), rtol=1e-12, atol=0, err_msg=name)
            continue
        for eta in etas:
            np.testing.assert_allclose(ours.analytic_variance(sampler, eta), process.analytic_variance(sampler, eta)
                                       .numpy(), rtol=1e-12, atol=0, err_msg=f"{sampler} eta={eta}")


def test_a_step_the_math_cannot_take_is_refused():
    """Betas of 1e-300 leave alphabar at exactly 1 (1 - alphabar = 0); a respacing of a flat stretch gives beta 0."""
    with pytest.raises(ort_sample.SampleError, match=r"beta = 1e-300 at t=0 is too small for float64"):
        ort_sample.Process.from_full([1e-300] * 50, None, "ancestral", "eps", "fixedlarge")
    with pytest.raises(ort_sample.SampleError, match=r"beta = 0.0 at t=0 is too small for float64"):
        ort_sample.Process.from_full([1e-300] * 50, 5, "ancestral", "eps", "fixedlarge")
    flat = [0.1] + [1e-300] * 49  # alphabar 0.9 throughout: the kept steps after the first have beta' = 0
    with pytest.raises(ort_sample.SampleError, match=r"beta = 0.0 at t=12 is too small"):
        ort_sample.Process.from_full(flat, 5, "ancestral", "eps", "fixedlarge")
    steep = np.full(50, 0.999)  # alphabar_t = 1e-3^(t+1): from t = 25 on, 1 / sqrt(alphabar) overflows float32
    with pytest.raises(ort_sample.SampleError, match=r"the step at t=25 cannot be computed in float32"):
        ort_sample.Process.from_full(steep, None, "ancestral", "eps", "fixedlarge").coefficient_table()


# ------------------------------------------------------------------------------------------ command lines
def ort_run(args, out):
    return ort_sample.main(["--provider", "cpu", "--threads", "1", "--no-progress", *map(str, args), "--out", str(out)])


@pytest.mark.parametrize("flags", [["--sampler", "ddim", "--eta", "0.5", "--variance", "analytic", "--spacing",
                                    "trailing"],
                                   ["--sampler", "dpm++2m-sde", "--spacing", "linspace"]])
def test_ort_sample_flags_write_what_fastddpm_sample_writes(calibrated, tmp_path, flags):
    common = ["--steps", "4", "--batch", "3", "--seed", "7", *flags]
    assert main(["sample", "--backend", "onnx", "--onnx", str(calibrated["eps"]), *common, "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "fastddpm")]) == 0
    assert ort_run(["--onnx", calibrated["eps"], *common], tmp_path / "host") == 0
    got, want = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("host", "fastddpm"))
    assert got.shape == (3, 8, 8, 3) and np.array_equal(got, want)
    host, theirs = (json.loads((tmp_path / d / "stats.json").read_text()) for d in ("host", "fastddpm"))
    assert host["timesteps"] == theirs["timesteps"] and host["variance"] == theirs["variance"]


def test_x_T_from_an_npz(calibrated, onnx_models, tmp_path):
    x_T = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float64)
    np.savez(tmp_path / "x_T.npz", arr_0=x_T)
    assert ort_run(["--onnx", calibrated["eps"], "--steps", "3", "--batch", "2", "--sampler", "dpm++2m",
                    "--x-T", tmp_path / "x_T.npz"], tmp_path / "out") == 0
    model = onnx_models["eps"]
    want = sample(model, respaced_for(model.diffusion(), 3, "dpm++2m"), (2, 3, 8, 8), sampler="dpm++2m",
                  backend="onnx", x_T=torch.from_numpy(x_T))
    got = np.load(tmp_path / "out" / "samples.npz")["arr_0"]
    assert np.array_equal(got, ort_sample.to_uint8(want.numpy()))


REFUSALS = [  # (flags, the ONNX file, what the line says)
    (["--sampler", "euler"], "eps", "argument --sampler: invalid choice: 'euler'"),
    (["--spacing", "karras"], "eps", "argument --spacing: invalid choice: 'karras'"),
    (["--variance", "huge"], "eps", "argument --variance: invalid choice: 'huge'"),
    (["--variance", "analytic"], "uncalibrated", "--variance analytic needs Analytic-DPM's table Gamma_t"),
    (["--sampler", "dpm++2m", "--eta", "0.5"], "eps", "--eta is DDIM's noise scale; the dpm++2m sampler has none"),
    (["--variance", "learned"], "eps", "--variance learned needs a model trained with learned variances"),
    (["--sampler", "ddim", "--variance", "fixedsmall"], "eps", "--variance fixedsmall does not apply to the ddim"),
    (["--sampler", "dpm++2m", "--variance", "analytic"], "eps", "(it has no reverse variance)"),
    (["--spacing", "linspace", "--sampler", "dpm++2m", "--steps", "100"], "eps", "linspace spacing takes 1 to 99"),
    (["--eta", "nan", "--sampler", "ddim"], "eps", "eta must be in [0, 1], got nan"),
]


@pytest.mark.parametrize("flags,file,message", REFUSALS)
def test_bad_requests_exit_2_with_one_line(calibrated, exports, tmp_path, capsys, flags, file, message):
    path = exports["fp32"] if file == "uncalibrated" else calibrated[file]
    assert ort_run(["--onnx", path, "--steps", "2", "--batch", "1", *flags], tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("ort_sample.py: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_fastddpm_sample_takes_the_same_flags(calibrated, exports, tmp_path, capsys):
    """`fastddpm sample --backend onnx`: --variance analytic works with a calibrated export and is refused
    (one line) without one."""
    base = ["sample", "--backend", "onnx", "--steps", "2", "--batch", "1", "--device", "cpu", "--no-progress"]
    assert main([*base, "--onnx", str(exports["fp32"]), "--variance", "analytic", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--variance analytic needs Analytic-DPM's table Gamma_t" in err
    assert main([*base, "--onnx", str(calibrated["step"]), "--variance", "analytic", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "stats.json").read_text())["variance"] == "analytic"


# ------------------------------------------------------------------------------------------ format versions
def with_version(src, dst, version):
    proto = onnx.load(str(src))
    prop = next(p for p in proto.metadata_props if p.key == ort_sample.META_KEY)
    prop.value = json.dumps({**json.loads(prop.value), "version": version})
    onnx.save(proto, str(dst))
    return dst


def test_version_1_eps_graphs_still_sample_and_step_graphs_are_refused(calibrated, tmp_path, capsys):
    """A version-1 eps graph has the same interface; a version-1 step graph lacks prev_x0: re-export it."""
    eps = with_version(calibrated["eps"], tmp_path / "eps1.onnx", "1")
    assert ort_run(["--onnx", eps, "--steps", "2", "--batch", "1", "--sampler", "dpm++2m"], tmp_path / "a") == 0
    step = with_version(calibrated["step"], tmp_path / "step1.onnx", "1")
    assert ort_run(["--onnx", step, "--steps", "2", "--batch", "1"], tmp_path / "b") == 2
    err = capsys.readouterr().err
    assert "is a version-1 step graph" in err and "fastddpm export --step-graph" in err and err.count("\n") == 1
    with pytest.raises(FastDDPMError, match="version-1 step graph"):
        load_onnx(step, "cpu")
