"""The command line of the few-step samplers: `sample --sampler/--spacing/--variance`,
`fastddpm calibrate`, `eval bpd --steps/--variance`: what they compute (the library's result),
what they record, and one-line exit-2 errors for what does not apply."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastddpm import GaussianDiffusion, load_checkpoint, make_betas, sample, save_checkpoint
from fastddpm.analytic import estimate_gamma
from fastddpm.cli import main
from fastddpm.images import from_uint8, to_uint8
from fastddpm.schedule import sampling_timesteps
from helpers import randomized_unet

pytestmark = pytest.mark.usefixtures("one_thread")
T = 100


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny 8x8 grey checkpoint with learned variances (T = 100), 12 images in an npz, and its calibrated copy."""
    folder = tmp_path_factory.mktemp("samplers")
    model = randomized_unet("tiny", seed=2, image_size=8, in_channels=1, learn_sigma=True)
    save_checkpoint(folder / "c.safetensors", model, GaussianDiffusion(make_betas("cosine", T), var_type="learned_range"))
    images = np.random.default_rng(1).integers(0, 256, size=(12, 8, 8, 1), dtype=np.uint8)
    np.savez(folder / "d.npz", arr_0=images)
    assert main(["calibrate", "--checkpoint", str(folder / "c.safetensors"), "--data", f"npz:{folder / 'd.npz'}",
                 "--batch", "5", "--seed", "3", "--out", str(folder / "cal.safetensors"), "--no-progress"]) == 0
    return folder


def _run(folder, out, *args):
    assert main(["sample", "--checkpoint", str(folder / "c.safetensors"), "--batch", "3", "--seed", "4",
                 "--no-progress", "--out", str(out), *map(str, args)]) == 0
    return np.load(out / "samples.npz")["arr_0"], json.loads((out / "stats.json").read_text())


@pytest.mark.parametrize("sampler, spacing, variance", [
    ("dpm++2m", "trailing", None), ("dpm++2m-sde", "linspace", None), ("ddim", "leading", None),
    ("ancestral", "iddpm", "fixedsmall"), ("ancestral", "trailing", "learned")])
def test_sample_is_the_library_result_and_says_what_ran(files, tmp_path, sampler, spacing, variance):
    extra = ["--variance", variance] if variance else []
    images, stats = _run(files, tmp_path / "o", "--steps", "5", "--sampler", sampler, "--spacing", spacing, *extra)
    model, diffusion, _ = load_checkpoint(files / "c.safetensors")
    if variance:
        diffusion = diffusion.with_variance(variance)
    kept = sampling_timesteps(T, 5, sampler, spacing)
    ref = sample(model, diffusion.respace(kept[::-1]), (3, 1, 8, 8), seed=4, sampler=sampler)
    assert np.array_equal(images, to_uint8(ref))
    assert stats["sampler"] == sampler and stats["model_calls"] == 5 and stats["timesteps"] == kept[::-1]
    assert stats["request"]["spacing"] == spacing


def test_calibrate_writes_the_monte_carlo_table(files):
    model, diffusion, meta = load_checkpoint(files / "cal.safetensors")
    record = meta["analytic_dpm"]
    assert record["images"] == 12 and record["model_calls"] == T * 3 and record["seed"] == 3
    x0 = from_uint8(np.load(files / "d.npz")["arr_0"])
    direct = estimate_gamma(model, diffusion, [x0[:5], x0[5:10], x0[10:]], seed=3)
    torch.testing.assert_close(diffusion.gamma, direct["gamma"], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.tensor(record["gamma_stderr"], dtype=torch.float64), direct["stderr"],
                               rtol=1e-5, atol=1e-9)
    # the weights are the input's
    src, _, _ = load_checkpoint(files / "c.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), model.state_dict().values()))


def test_analytic_variance_from_a_calibrated_checkpoint(files, tmp_path):
    out = tmp_path / "a"
    assert main(["sample", "--checkpoint", str(files / "cal.safetensors"), "--batch", "2", "--steps", "4",
                 "--variance", "analytic", "--no-progress", "--out", str(out)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["variance"] == "analytic"
    model, diffusion, _ = load_checkpoint(files / "cal.safetensors")
    ref = sample(model, diffusion.with_variance("analytic").respace("4"), (2, 1, 8, 8), seed=0)
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], to_uint8(ref))


def test_eval_bpd_of_the_k_step_process(files, tmp_path):
    from fastddpm.bpd import BpdRequest, evaluate_bpd

    res = {}
    for variance in ("fixedsmall", "analytic", None):
        res[variance] = evaluate_bpd(BpdRequest(checkpoint=str(files / "cal.safetensors"), data=f"npz:{files / 'd.npz'}",
                                                batch=12, seed=5, out=None, progress=False, device="cpu", steps=10,
                                                variance=variance))
    assert res["analytic"]["T"] == 10 and res["analytic"]["variance"] == "analytic"
    assert res[None]["variance"] == "learned_range" and len(res[None]["per_timestep"]["vb"]) == 10
    model, diffusion, _ = load_checkpoint(files / "cal.safetensors")
    d = diffusion.with_variance("analytic").respace("10")
    torch.manual_seed(5)
    ref = d.calc_bpd_loop(model, from_uint8(np.load(files / "d.npz")["arr_0"]).contiguous())
    assert res["analytic"]["bpd"] == pytest.approx(float(ref["total_bpd"].mean()), rel=1e-6)
    assert res["analytic"]["timesteps"] == d.timesteps.tolist()


@pytest.mark.parametrize("args, message", [
    (["--spacing", "karras"], "invalid choice: 'karras'"),
    (["--variance", "large"], "invalid choice: 'large'"),
    (["--sampler", "dpm++2m", "--eta", "0.5"], "the dpm++2m sampler has none"),
    (["--eta", "0.5"], "the ancestral sampler has none"),
    (["--sampler", "dpm++2m", "--variance", "analytic"], "no reverse variance"),
    (["--sampler", "ddim", "--variance", "fixedsmall"], "it takes only analytic"),
    (["--variance", "analytic"], "fastddpm calibrate"),  # a checkpoint without the table
    (["--sampler", "dpm++2m", "--spacing", "linspace", "--steps", "100"], "takes 1 to 99 steps"),
])
def test_what_does_not_apply_exits_2_with_one_line(files, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    code = main(["sample", "--checkpoint", str(files / "c.safetensors"), "--steps", "5", "--no-progress",
                 "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists() or not any(out.iterdir())


def test_learned_variance_of_a_fixed_model_is_refused(tmp_path, capsys):
    path = tmp_path / "fixed.safetensors"
    save_checkpoint(path, randomized_unet("tiny", image_size=8, in_channels=1), GaussianDiffusion(make_betas("linear", T)))
    assert main(["sample", "--checkpoint", str(path), "--variance", "learned", "--out", str(tmp_path / "o")]) == 2
    assert "trained with learned variances" in capsys.readouterr().err


def test_calibrate_refuses_its_own_input_and_bad_tables(files, tmp_path, capsys):
    import shutil

    src = tmp_path / "c.safetensors"
    shutil.copy(files / "c.safetensors", src)
    assert main(["calibrate", "--checkpoint", str(src), "--data", f"npz:{files / 'd.npz'}", "--out", str(src)]) == 2
    assert "is the input checkpoint" in capsys.readouterr().err
    # a calibrated checkpoint whose table was edited is refused on load, with one line
    model, diffusion, meta = load_checkpoint(files / "cal.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_checkpoint(bad, model, GaussianDiffusion(diffusion.schedule.betas, var_type="learned_range"),
                    analytic_dpm={"gamma": [0.5] * (T - 1)})
    assert main(["sample", "--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "one value per timestep (T=100)" in capsys.readouterr().err
    save_checkpoint(bad, model, GaussianDiffusion(diffusion.schedule.betas, var_type="learned_range"),
                    analytic_dpm={"gamma": [0.5] * (T - 1) + [-1.0]})
    assert main(["sample", "--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "finite and >= 0" in capsys.readouterr().err


def test_eval_bpd_per_timestep_with_steps_is_refused(files, tmp_path, capsys):
    assert main(["eval", "bpd", "--checkpoint", str(files / "c.safetensors"), "--data", f"npz:{files / 'd.npz'}",
                 "--per-timestep", "--steps", "10", "--out", str(tmp_path / "b.json")]) == 2
    assert "leave out --steps" in capsys.readouterr().err


def test_x_T_from_a_file(files, tmp_path, capsys):
    """--x-T FILE.npz: the run starts from the given noise (diffusers' latents), as sample(x_T=...) does."""
    x_T = np.random.default_rng(3).standard_normal((3, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "xT.npz", arr_0=x_T)
    images, _ = _run(files, tmp_path / "o", "--steps", "4", "--sampler", "dpm++2m", "--x-T", tmp_path / "xT.npz")
    model, diffusion, _ = load_checkpoint(files / "c.safetensors")
    ref = sample(model, diffusion.respace("4"), (3, 1, 8, 8), seed=4, sampler="dpm++2m", x_T=torch.from_numpy(x_T))
    assert np.array_equal(images, to_uint8(ref))
    np.savez(tmp_path / "bad.npz", arr_0=x_T[:2])
    assert main(["sample", "--checkpoint", str(files / "c.safetensors"), "--batch", "3", "--x-T",
                 str(tmp_path / "bad.npz"), "--out", str(tmp_path / "b")]) == 2
    assert "holds float32 [2, 1, 8, 8]; this run starts from float [3, 1, 8, 8]" in capsys.readouterr().err
