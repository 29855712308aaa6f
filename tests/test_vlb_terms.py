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
    assert [r["t"] for r in recs] == list(range(T))
    assert set(recs[0]) == {"t", "rate", "distortion", "level_accuracy", "exact_fraction"}
    assert rd["levels"] == 256 and all(0.0 <= r["exact_fraction"] <= r["level_accuracy"] <= 1.0 for r in recs)
    # an untrained model on random 8-bit images: no t recovers them exactly, and the baseline is the
    # RMSE of the images (npz data: train split = every image) against their own mean image
    assert rd["exact_recovery"]["all_images"] is None
    images = np.load(files[1][len("npz:"):])["arr_0"].astype(np.float64)
    assert rd["mean_image_distortion"] == pytest.approx(np.sqrt(((images - images.mean(0)) ** 2).mean()), rel=1e-6)
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


def _moments(matrix):
    """(E[L_t], E[L_t^2]) over the rows (images x draws) of a term matrix [N, T]."""
    m = np.asarray(matrix, dtype=np.float64)
    return m.mean(axis=0).tolist(), (m**2).mean(axis=0).tolist()


def test_vlb_estimator_noise_closed_forms():
    from fastddpm.vlb_terms import vlb_estimator_noise

    # no noise within a t: terms a_t for every image; importance sampling by sqrt(E[L_t^2]) = a_t
    # makes L_t / p(t) constant, zero variance; uniform t has T sum a^2 - (sum a)^2
    a = np.geomspace(1.0, 1e-6, 1000)
    n = vlb_estimator_noise(*_moments([a, a]), uniform_prob=0.0)
    assert n["importance"] == pytest.approx(0.0, abs=1e-6) and n["importance_t_only"] == pytest.approx(0.0, abs=1e-6)
    assert n["uniform"] == pytest.approx(np.sqrt(1000 * (a**2).sum() - a.sum() ** 2) / a.sum(), rel=1e-9)
    # within-t noise: two images with terms a_t (1 - d) and a_t (1 + d), so E[L_t^2] = a_t^2 (1 + d^2);
    # then Var = (sum_t a_t sqrt(1 + d^2))^2 - (sum a)^2 = (sum a)^2 d^2: relative SD exactly d
    for d in (0.1, 0.5, 2.0):
        n = vlb_estimator_noise(*_moments([a * (1 - d), a * (1 + d)]), uniform_prob=0.0)
        assert n["importance"] == pytest.approx(d, rel=1e-9)
        assert n["importance_t_only"] == pytest.approx(0.0, abs=1e-6)  # the noise the old figure left out
        assert n["uniform"] == pytest.approx(np.sqrt(1000 * (1 + d * d) * (a**2).sum() - a.sum() ** 2) / a.sum(),
                                             rel=1e-9)
        assert n["variance_ratio"] == pytest.approx(n["uniform"] ** 2 / n["importance"] ** 2, rel=1e-9)
    # one term holds everything: uniform draws see it 1 time in T, rel. std sqrt(T - 1)
    spike = [1.0] + [0.0] * 9
    assert vlb_estimator_noise(spike, [1.0] + [0.0] * 9)["uniform"] == pytest.approx(3.0, rel=1e-12)
    with pytest.raises(ValueError, match="second moment"):
        vlb_estimator_noise([1.0, 1.0], [0.5, 1.0])  # E[L^2] < E[L]^2 is impossible
    with pytest.raises(ValueError, match="vb_sq"):
        vlb_estimator_noise([1.0, 1.0], [1.0])


def test_vlb_estimator_noise_agrees_with_sampling_the_estimator():
    """Monte Carlo on a synthetic term matrix: draw an image, t ~ p (eq. 18 mixed as the trainer does),
    take L_t / p(t); the spread of 400k such estimates must match the formula within 2%."""
    from fastddpm.vlb_terms import vlb_estimator_noise

    rng = np.random.default_rng(0)
    N, T = 50, 200
    scale = np.geomspace(10.0, 1e-4, T)
    matrix = scale * rng.lognormal(0.0, 0.8, size=(N, T))  # skewed noise within each t
    vb, vb_sq = _moments(matrix)
    n = vlb_estimator_noise(vb, vb_sq, uniform_prob=0.01)
    root = np.sqrt(vb_sq)
    for name, p in (("uniform", np.full(T, 1.0 / T)), ("importance", 0.99 * root / root.sum() + 0.01 / T)):
        i = rng.integers(0, N, size=400_000)
        t = rng.choice(T, size=400_000, p=p)
        y = matrix[i, t] / p[t]
        assert y.mean() == pytest.approx(sum(vb), rel=0.05 if name == "uniform" else 0.01)
        assert y.std() / sum(vb) == pytest.approx(n[name], rel=0.02 if name == "importance" else 0.1), name
    # with no spread between t left, what remains is the within-t spread, sqrt(e^{0.64} - 1) = 0.95
    assert n["importance"] < n["uniform"] / 3 and n["importance_t_only"] < 0.2 * n["importance"]


def test_decoder_floor_matches_the_discretised_gaussian_by_hand():
    from scipy.stats import norm

    from fastddpm.vlb_terms import decoder_floor_bpd

    diffusion = GaussianDiffusion(make_betas("linear", 1000))
    var = float(diffusion.schedule.fixedlarge_variance[0])
    assert var == pytest.approx(5.45e-5, rel=1e-3)  # betatilde_1 of the linear schedule
    h = (1.0 / 255.0) / math.sqrt(var)  # a bin's half-width in standard deviations
    edge, inner = -math.log2(norm.cdf(h)), -math.log2(norm.cdf(h) - norm.cdf(-h))
    x0 = torch.full((2, 1, 2, 2), -1.0)  # image 0: all four pixels at the edge bin
    x0[1] = 0.2  # image 1: all inside
    r = decoder_floor_bpd(diffusion, x0)
    # 1e-3: the likelihood uses DDPM's tanh approximation of the normal CDF (off by ~3e-4 here)
    assert r["per_image"] == pytest.approx([edge, inner], rel=1e-3)
    assert r["bpd"] == pytest.approx((edge + inner) / 2, rel=1e-3) and 0.4 < edge < 0.6 < 1.2 < inner < 1.4


def test_exact_recovery_and_the_mean_image_baseline():
    from fastddpm.vlb_terms import exact_recovery, mean_image_distortion

    vb, prior = [2.0, 0.5, 0.25, 0.25], 0.0  # bpd 3.0; rate(t) = sum of the terms above t
    recs = rate_distortion_records(vb, prior, [0.0, 1e-4, 1e-2, 0.5], level_accuracy=[1.0, 1.0, 0.95, 0.5],
                                   exact_fraction=[1.0, 0.97, 0.0, 0.0])
    assert [r["rate"] for r in recs] == [1.0, 0.5, 0.25, 0.0]
    e = exact_recovery(recs, bpd=3.0)  # every image exact from t = 0 only: 2/3 of the code after it
    assert e["t"] == 0 and e["bits_after_share"] == pytest.approx(2.0 / 3.0)
    e = exact_recovery(recs, bpd=3.0, share=0.95)
    assert e["t"] == 1 and e["exact_fraction"] == 0.97 and e["bits_after_share"] == pytest.approx(2.5 / 3.0)
    assert exact_recovery(recs, bpd=3.0, share=1.01) is None
    ref = np.array([[0.0, 100.0], [200.0, 100.0]])  # mean image [100, 100]
    assert mean_image_distortion(ref, np.array([[100.0, 130.0]])) == pytest.approx(math.sqrt(900 / 2))


def test_level_accuracy_of_the_bpd_loop():
    from fastddpm.diffusion import to_level
    from fastddpm.data import load_digits

    digits = torch.from_numpy(load_digits("test").images[:8]).permute(0, 3, 1, 2).double() / 127.5 - 1
    levels = to_level(digits, 17)
    assert levels.min() == 0 and levels.max() == 16
    raw = torch.from_numpy(np.rint(load_digits("test").images[:8].astype(np.float64) * 16 / 255)).permute(0, 3, 1, 2).long()
    assert torch.equal(levels, raw)  # the digits' own 0..16 values come back

    class Oracle(torch.nn.Module):  # predicts the true noise: x0 prediction exact up to rounding
        def forward(self, x, t):
            return self.eps
    diffusion = GaussianDiffusion(make_betas("linear", T))
    x0 = digits.float()
    torch.manual_seed(0)
    noise = [torch.randn_like(x0) for _ in range(T)]
    oracle = Oracle()
    draws = iter(noise[::-1])  # calc_bpd_loop draws from t = K-1 down

    def randn_like(x):
        oracle.eps = next(draws)
        return oracle.eps.clone()
    import unittest.mock

    with unittest.mock.patch("torch.randn_like", randn_like):
        out = diffusion.calc_bpd_loop(oracle, x0, levels=17)
    assert out["level_accuracy"].shape == (8, T) and torch.all(out["level_accuracy"] == 1.0)
    with unittest.mock.patch("torch.randn_like", lambda x: torch.zeros_like(x)):  # the noise is 0 ...
        oracle.eps = torch.full_like(x0, 3.0)  # ... the model says 3: at t = T - 1 the x0 prediction is
        out = diffusion.calc_bpd_loop(oracle, x0, levels=17)  # clipped to -1, right only where x0 is
    assert out["level_accuracy"][:, -1].tolist() == pytest.approx((levels == 0).double().mean(dim=(1, 2, 3)).tolist())
