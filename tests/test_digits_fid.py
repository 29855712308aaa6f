"""fastddpm.digits_fid: the Fréchet distance itself, the digits features, the noise floor."""
from __future__ import annotations

import numpy as np
import pytest

from fastddpm.data import load_digits
from fastddpm.digits_fid import digits_features, digits_fid, frechet_distance, noise_floor
from fastddpm.errors import DataError


def _gaussian(n, d, seed):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d))
    return rng.normal(size=(n, d)) @ mix + rng.normal(size=d)  # correlated, off-centre


def test_identical_sets_are_at_distance_zero():
    a = _gaussian(300, 16, 0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9 * np.trace(np.cov(a, rowvar=False)))
    assert frechet_distance(a, a[::-1].copy()) == pytest.approx(0.0, abs=1e-9 * np.trace(np.cov(a, rowvar=False)))


def test_distance_grows_with_a_shift_exactly_as_its_square():
    """A pure mean shift leaves the covariances equal, so FD = ||shift||^2 exactly."""
    a = _gaussian(300, 16, 1)
    direction = np.random.default_rng(2).normal(size=16)
    fds = [frechet_distance(a, a + c * direction) for c in (0.25, 0.5, 1.0, 2.0)]
    for c, fd in zip((0.25, 0.5, 1.0, 2.0), fds):
        assert fd == pytest.approx(c**2 * (direction**2).sum(), rel=1e-7)
    assert all(x < y for x, y in zip(fds, fds[1:]))


def test_matches_the_closed_form_for_diagonal_covariances():
    """For diagonal S1, S2: FD = ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2, a check of the matrix root."""
    rng = np.random.default_rng(3)
    a = rng.normal(size=(2000, 4)) * [1.0, 2.0, 0.5, 3.0]
    b = rng.normal(size=(2000, 4)) * [2.0, 1.0, 0.5, 1.0] + 0.3
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # the sample covariances are not exactly diagonal: compare with scipy's general formula instead
    from scipy import linalg

    root = linalg.sqrtm(sa @ sb).real
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(root)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-8)


def test_digits_fid_is_zero_for_the_reference_and_grows_with_corruption():
    real = load_digits("test").images
    assert digits_fid(real) == pytest.approx(0.0, abs=1e-8)
    train = load_digits("train").images[:300]
    shifted = [digits_fid(np.clip(train.astype(np.int32) + k, 0, 255).astype(np.uint8)) for k in (0, 40, 80)]
    assert shifted[0] < shifted[1] < shifted[2]
    floor = noise_floor(300)
    assert floor == noise_floor(300)  # deterministic
    assert shifted[0] == pytest.approx(digits_fid(train))
    noise = np.random.default_rng(0).integers(0, 256, size=(300, 8, 8, 1), dtype=np.uint8)
    assert digits_fid(noise) > 10 * max(floor["halves"], floor["train"])
    assert digits_features(real).shape == (len(real), 64)


def test_bad_input():
    with pytest.raises(DataError, match="uint8 images"):
        digits_features(np.zeros((3, 8, 8, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="uint8 images"):
        digits_features(np.zeros((3, 8, 8, 1), dtype=np.float32))
    with pytest.raises(DataError, match="equal D"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


def test_cli(tmp_path, capsys):
    import json

    from fastddpm.cli import main

    real = load_digits("test").images
    np.savez(tmp_path / "real.npz", arr_0=real[:100])
    folder = tmp_path / "run"  # a `fastddpm sample` folder: samples.npz beside grid.png
    folder.mkdir()
    np.savez(folder / "samples.npz", arr_0=real[100:200, ..., 0])  # NHW is accepted too
    (folder / "grid.png").write_bytes(b"not read")
    out = tmp_path / "fid.json"
    assert main(["eval", "digits-fid", str(tmp_path / "real.npz"), str(folder), "--pool", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 200 and result["pooled"]
    assert result["digits_fid"] == pytest.approx(digits_fid(real[:200]), rel=1e-12)
    assert result["noise_floor"] == noise_floor(200)
    assert "digits FID" in capsys.readouterr().out
    # without --pool each is one sample set (one noise seed): scored on its own, then mean +- SD
    assert main(["eval", "digits-fid", str(tmp_path / "real.npz"), str(folder), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 100 and result["per_set"] == pytest.approx([digits_fid(real[:100]),
                                                                     digits_fid(real[100:200])], rel=1e-12)
    assert result["digits_fid"] == pytest.approx(np.mean(result["per_set"]), rel=1e-12)
    assert "over 2 sample sets of 100 images" in capsys.readouterr().out
    np.savez(tmp_path / "rgb.npz", arr_0=np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / "big.npz", arr_0=np.zeros((5, 16, 16, 1), dtype=np.uint8))
    for argv, piece in (([str(tmp_path / "rgb.npz")], "grey images"), ([str(tmp_path / "big.npz")], "8x8"),
                        ([str(tmp_path / "none.npz")], "does not exist"),
                        ([str(tmp_path / "real.npz"), "--json", str(tmp_path)], "is a folder")):
        assert main(["eval", "digits-fid", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastddpm: error: ") and err.count("\n") == 1 and piece in err, err
