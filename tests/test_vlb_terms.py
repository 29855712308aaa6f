"""`eval bpd --per-timestep`, `eval rate-distortion` (fastddpm.vlb_terms) and their bad input."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fastddpm.checkpoint import save_checkpoint
from fastddpm.cli import main
from fastddpm.diffusion import GaussianDiffusion
from fastddpm.schedule import make_betas
from fastddpm.unet import UNet
from fastddpm.vlb_terms import PRIOR_TERM, rate_distortion, rate_distortion_records, vlb_term_records

T = 25

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny learned-variance checkpoint (output convs re-randomised, T = 20) and 6 grey 8x8 images."""
    folder = tmp_path_factory.mktemp("terms")
    torch.manual_seed(4)
    model = UNet.from_preset("tiny", learn_sigma=True, image_size=8, in_channels=1)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
            m.reset_parameters()
    diffusion = GaussianDiffusion(make_betas("linear", T), var_type="learned_range", loss_type="hybrid")
    save_checkpoint(folder / "model.safetensors", model, diffusion, step=0)
    images = np.random.default_rng(6).integers(0, 256, size=(6, 8, 8, 1), dtype=np.uint8)
    np.savez(folder / "images.npz", arr_0=images)
    return str(folder / "model.safetensors"), f"npz:{folder / 'images.npz'}"


def _args(files, *extra):
    ckpt, data = files
    return ["eval", *extra, "--checkpoint", ckpt, "--data", data, "--no-progress", "--device", "cpu", "--seed", "3"]


def test_per_timestep_terms_sum_to_the_printed_bpd(files, tmp_path, capsys):
    out = tmp_path / "terms.json"
    assert main(_args(files, "bpd") + ["--per-timestep", "--out", str(out)]) == 0
    printed = float(capsys.readouterr().out.split(" +- ")[0])
    result = json.loads(out.read_text())
    terms = result["terms"]
    assert [r["t"] for r in terms] == list(range(T + 1))
    assert [r["term"] for r in terms[:2]] == ["L_0", "L_1"] and terms[-1]["term"] == PRIOR_TERM
    assert terms[-1]["vb"] == pytest.approx(result["prior_bpd"], rel=1e-12)
    total = sum(r["vb"] for r in terms)
    assert total == pytest.approx(result["bpd"], rel=1e-6)
    assert total == pytest.approx(printed, abs=6e-5)  # printed with 4 decimals
    assert all(r["vb"] > 0 for r in terms[:-1])
    # the records are the per-timestep lists, and the flag changes nothing else: same seed, same bound
    assert [r["vb"] for r in terms[:-1]] == result["per_timestep"]["vb"]
    assert [r["xstart_mse"] for r in terms[:-1]] == result["per_timestep"]["xstart_mse"]
    plain = tmp_path / "plain.json"
    assert main(_args(files, "bpd") + ["--out", str(plain)]) == 0
    assert json.loads(plain.read_text())["bpd"] == result["bpd"]
    assert "terms" not in json.loads(plain.read_text())


def test_rate_distortion_cli(files, tmp_path, capsys):
    out, terms_out = tmp_path / "rd.json", tmp_path / "terms.json"
    assert main(_args(files, "rate-distortion") + ["--out", str(out)]) == 0
    assert main(_args(files, "bpd") + ["--per-timestep", "--out", str(terms_out)]) == 0  # same seed, same draws
    rd, terms = json.loads(out.read_text()), json.loads(terms_out.read_text())
    recs = rd["records"]
    assert [r["t"] for r in recs] == list(range(T)) and set(recs[0]) == {"t", "rate", "distortion"}
    rate = [r["rate"] for r in recs]
    assert all(a >= b for a, b in zip(rate, rate[1:]))  # non-increasing in t
    assert rate[-1] == pytest.approx(rd["prior_bpd"], rel=1e-12)  # at t = T-1 only L_T has been sent
    assert rate[0] + terms["terms"][0]["vb"] == pytest.approx(rd["bpd"], rel=1e-6)  # + L_0: lossless
    assert rd["lossless"] == {"rate": rd["bpd"], "distortion": 0.0}
    for r, x in zip(recs, terms["per_timestep"]["xstart_mse"]):
        assert r["distortion"] == pytest.approx(127.5 * math.sqrt(x), rel=1e-12)
    assert "wrote" in capsys.readouterr().out


def test_records_from_known_terms():
    vb, prior, xmse = [0.5, 0.25, 0.125], 0.01, [0.0, 0.04, 1.0]
    assert rate_distortion_records(vb, prior, xmse) == [
        {"t": 0, "rate": 0.01 + 0.125 + 0.25, "distortion": 0.0},
        {"t": 1, "rate": 0.01 + 0.125, "distortion": 127.5 * 0.2},
        {"t": 2, "rate": 0.01, "distortion": 127.5}]
    recs = vlb_term_records(vb, prior)
    assert [(r["t"], r["term"], r["vb"]) for r in recs] == [(0, "L_0", 0.5), (1, "L_1", 0.25), (2, "L_2", 0.125),
                                                            (3, PRIOR_TERM, 0.01)]


def test_distortion_of_the_optimal_denoiser_grows_with_t():
    """Gaussian data x0 ~ N(0, s^2): the optimal x0 estimate from x_t = a x0 + b eps has error
    s^2 b^2 / (a^2 s^2 + b^2), increasing in t. 256 x 64 elements: the measured mean square error
    has relative standard error sqrt(2 / 16384) = 1.1%; tolerances are 5 standard errors."""
    s, steps = 0.25, 10
    diffusion = GaussianDiffusion(make_betas("cosine", steps))
    ab = diffusion.schedule.alphas_cumprod.float()

    def model(xt, t):  # E[eps | x_t] for Gaussian data
        a2 = ab[t].reshape(-1, 1, 1, 1)
        return (1 - a2).sqrt() / (a2 * s**2 + 1 - a2) * xt

    torch.manual_seed(0)
    x0 = s * torch.randn(256, 1, 8, 8)
    out = rate_distortion(model, diffusion, x0, clip_denoised=False)
    dist = np.array([r["distortion"] for r in out["records"]])
    a2 = ab.double().numpy()
    expected = 127.5 * np.sqrt(s**2 * (1 - a2) / (a2 * s**2 + 1 - a2))
    rel_se = math.sqrt(2 / x0.numel()) / 2  # of an RMSE: half that of the mean square
    assert np.all(np.abs(dist / expected - 1) < 5 * rel_se), dist / expected
    assert np.all(np.diff(expected) > 0)
    assert np.all(dist[1:] >= dist[:-1] * (1 - 5 * rel_se))
    rate = [r["rate"] for r in out["records"]]
    assert all(a >= b for a, b in zip(rate, rate[1:]))


def _one_line_error(capsys, *pieces):
    err = capsys.readouterr().err
    assert err.startswith("fastddpm: error: ") and err.count("\n") == 1, err
    for piece in pieces:
        assert piece in err, (piece, err)


@pytest.mark.parametrize("metric", ["rate-distortion", "bpd --per-timestep"])
def test_bad_input_exits_2_and_writes_nothing(files, tmp_path, capsys, metric):
    args = _args(files, *metric.split())
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    folder = tmp_path / "folder"
    folder.mkdir()
    for extra, pieces in (
            (["--limit", "0"], ["--limit", "positive integer"]),
            (["--batch", "x"], ["--batch"]),
            (["--out", str(folder)], ["--out", "is a folder"]),
            (["--out", str(out), "--plot", str(folder)], ["--plot", "is a folder"]),
            (["--out", str(out), "--plot", str(out)], ["same file"]),
            (["--out", ""], ["--out", "empty"]),
            (["--out", str(tmp_path / "none.json"), "--checkpoint", str(tmp_path / "no.safetensors")],
             ["does not exist"])):
        assert main(args + extra) == 2, extra
        _one_line_error(capsys, *pieces)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_unwritable_output_is_refused_before_the_work(files, tmp_path, capsys):
    import os

    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        assert main(_args(files, "rate-distortion") + ["--out", str(locked / "r.json")]) == 2
        _one_line_error(capsys, "--out", "cannot be written")
    finally:
        os.chmod(locked, 0o700)


def test_vlb_estimator_noise():
    from fastddpm.vlb_terms import vlb_estimator_noise

    flat = vlb_estimator_noise([0.5] * 8)
    assert flat["uniform"] == pytest.approx(0.0, abs=1e-12) and flat["L_vlb"] == pytest.approx(4.0)
    # one term holds everything: uniform draws see it 1 time in T, rel. std sqrt(T - 1)
    spike = [1.0] + [0.0] * 9
    assert vlb_estimator_noise(spike)["uniform"] == pytest.approx(3.0, rel=1e-12)
    assert vlb_estimator_noise(spike, uniform_prob=0.0)["importance"] == pytest.approx(0.0, abs=1e-12)
    # terms falling over orders of magnitude (IDDPM Fig. 2): importance sampling removes most of the noise
    falling = np.geomspace(1.0, 1e-6, 1000)
    n = vlb_estimator_noise(falling.tolist())
    L = falling.sum()
    assert n["uniform"] == pytest.approx(np.sqrt(1000 * (falling**2).sum() / L**2 - 1), rel=1e-9)  # ~2.4
    p = 0.999 * falling / L + 0.001 / 1000
    assert n["importance"] == pytest.approx(np.sqrt((falling**2 / p).sum() - L**2) / L, rel=1e-6)
    assert n["importance"] < 0.05 * n["uniform"]
