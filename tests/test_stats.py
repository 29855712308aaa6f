"""fastddpm.stats and the commands that report with it: mean +- SD, paired differences +- SE."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fastddpm.cli import main
from fastddpm.stats import fmt, mean_sd, paired_difference, resolved


def test_mean_sd_matches_numpy():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=17)
    s = mean_sd(x.tolist())
    assert s["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert s["sd"] == pytest.approx(x.std(ddof=1), rel=1e-12)
    assert s["se"] == pytest.approx(x.std(ddof=1) / math.sqrt(17), rel=1e-12)
    assert mean_sd([4.0]) == {"mean": 4.0, "sd": None, "se": None, "n": 1}
    with pytest.raises(ValueError):
        mean_sd([])


def test_pairing_removes_what_the_draws_share():
    # two settings scored on the same 10 draws: a large shared draw-to-draw spread, a small true gap
    rng = np.random.default_rng(1)
    shared = rng.normal(0.0, 1.0, size=10)
    a = 5.0 + shared + rng.normal(0, 0.01, size=10)
    b = 4.9 + shared + rng.normal(0, 0.01, size=10)
    d = paired_difference(a.tolist(), b.tolist())
    assert d["mean"] == pytest.approx(0.1, abs=0.02) and d["n"] == 10
    assert d["se"] < 0.01 < mean_sd(a.tolist())["se"]  # unpaired, the gap would be lost in the spread
    assert resolved(d) and d["z"] == pytest.approx(d["mean"] / d["se"])
    assert not resolved(paired_difference([1.0, 2.0, 3.0], [1.1, 1.9, 3.05]))
    with pytest.raises(ValueError, match="matched draws"):
        paired_difference([1.0, 2.0], [1.0])
    assert fmt(d).endswith("(SE, n = 10)") and fmt(mean_sd([1.0, 2.0])).endswith("(SD, n = 2)")


def _digit_sets(tmp_path, name, shifts):
    """One .npz per 'noise seed': real unseen training digits, shifted by k grey levels (worse with k)."""
    from fastddpm.digits_fid import unseen_training_digits

    train = unseen_training_digits()
    paths = []
    for i, k in enumerate(shifts):
        rows = np.random.default_rng(i).choice(len(train), size=120, replace=False)
        images = np.clip(train[rows].astype(np.int32) + k, 0, 255).astype(np.uint8)
        p = tmp_path / f"{name}{i}.npz"
        np.savez(p, arr_0=images)
        paths.append(str(p))
    return paths


def test_digits_fid_of_several_sets_and_the_paired_difference(tmp_path, capsys):
    good = _digit_sets(tmp_path, "good", [0, 0, 0])
    bad = _digit_sets(tmp_path, "bad", [24, 24, 24])  # the same rows per position, shifted: a paired design
    out = tmp_path / "fid.json"
    assert main(["eval", "digits-fid", *bad, "--versus", *good, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    from fastddpm.digits_fid import digits_fid, load_grey_digits

    each = [digits_fid(load_grey_digits([p])) for p in bad]
    assert r["per_set"] == pytest.approx(each, rel=1e-12) and r["n"] == 120
    assert r["summary"]["mean"] == pytest.approx(np.mean(each)) and r["summary"]["sd"] == pytest.approx(
        np.std(each, ddof=1))
    d = r["paired_difference"]
    assert d["n"] == 3 and d["mean"] == pytest.approx(np.mean(np.subtract(each, r["versus_per_set"])))
    assert d["mean"] > 0 and d["z"] > 2  # the shifted digits are worse, and resolved on 3 draws
    printed = capsys.readouterr().out
    assert "over 3 sample sets of 120 images" in printed and "paired difference" in printed
    # --pool keeps the old meaning: one set of 360 images
    assert main(["eval", "digits-fid", *good, "--pool", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == 360


def test_digits_fid_refuses_unmatched_sets(tmp_path, capsys):
    a = _digit_sets(tmp_path, "a", [0, 0])
    assert main(["eval", "digits-fid", *a, "--versus", a[0]]) == 2
    assert "matched by position" in capsys.readouterr().err
    small = tmp_path / "small.npz"
    np.savez(small, arr_0=np.zeros((50, 8, 8, 1), np.uint8))
    assert main(["eval", "digits-fid", a[0], str(small)]) == 2
    err = capsys.readouterr().err
    assert "different numbers of images" in err and err.count("\n") == 1
    assert main(["eval", "digits-fid", a[0], "--versus", str(small)]) == 2
    assert "equal n" in capsys.readouterr().err
    assert main(["eval", "digits-fid", a[0], "--pool", "--versus", a[1]]) == 2
