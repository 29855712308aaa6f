"""bench/replicate.py and bench/replication_verdicts.py: seeds, paired statistics, verdicts from numbers."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from fastddpm.checkpoint import save_checkpoint
from fastddpm.diffusion import GaussianDiffusion
from fastddpm.schedule import make_betas
from fastddpm.unet import UNet

BENCH = Path(__file__).resolve().parents[1] / "bench"

pytestmark = pytest.mark.usefixtures("one_thread")


def _module(name):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_verdict_rule():
    rv = _module("replication_verdicts")
    from fastddpm.stats import paired_difference

    better = paired_difference([4.0, 4.1, 4.05], [4.3, 4.42, 4.33])  # a lower on every seed, z >> 2
    assert rv.verdict(better, [-0.3, -0.32, -0.28]) == "holds"
    assert rv.verdict(better, [-0.3, -0.32, -0.28], expect_negative=False) == "reversed"
    mixed = paired_difference([4.0, 4.5, 4.0], [4.2, 4.3, 4.2])  # one seed the other way
    assert rv.verdict(mixed, [-0.2, 0.2, -0.2]) == "not resolved"
    small = paired_difference([4.0, 4.1, 4.2], [4.01, 4.05, 4.3])
    assert rv.verdict(small, [-0.01, 0.05, -0.1]) == "not resolved"
    assert rv.verdict(paired_difference([1.0], [2.0]), [-1.0]).startswith("not resolved (one training seed)")
    # a consistent sign is not enough without the size: |mean| must exceed 2 SE
    noisy = paired_difference([4.0, 4.0, 4.0], [4.01, 4.5, 4.02])
    assert noisy["z"] > -2.0 and rv.verdict(noisy, [-0.01, -0.5, -0.02]) == "not resolved"


def _runs(root: Path, step: int):
    """simple and hybrid-linear, seeds 0 and 1: random tiny 8x8 U-Nets at `step`, with training logs."""
    for k, (setting, loss) in enumerate((("simple", "simple"), ("hybrid-linear", "hybrid"))):
        for seed in (0, 1):
            folder = root / f"{setting}-seed{seed}"
            folder.mkdir(parents=True)
            torch.manual_seed(10 * k + seed)
            model = UNet.from_preset("tiny", learn_sigma=loss != "simple", image_size=8, in_channels=1)
            for m in model.modules():  # zero-initialised output convs would make every model the same
                if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
                    m.reset_parameters()
            var = "fixedlarge" if loss == "simple" else "learned_range"
            diffusion = GaussianDiffusion(make_betas("linear", 25), var_type=var, loss_type=loss)
            save_checkpoint(folder / "last.safetensors", model, diffusion, step=step,
                            train_config={"loss": loss, "schedule": "linear", "timestep_sampler": "uniform"})
            log = [{"step": s, "loss": 1.0 / s, "loss_weighted": 1.0 / s, "mse": 0.5 / s, "vb": 0.1 / s}
                   for s in range(25, 200, 25)]
            (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    late = root / "kl-uniform-seed0"  # a run at another step is left out, not mixed in
    late.mkdir()
    (late / "last.safetensors").write_bytes((root / "simple-seed0" / "last.safetensors").read_bytes())


def test_replicate_end_to_end_on_tiny_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rep = _module("replicate")
    rv = _module("replication_verdicts")
    runs, out, doc = tmp_path / "runs", tmp_path / "out", tmp_path / "REPLICATION.md"
    _runs(runs, step=7)
    (runs / "kl-uniform-seed0" / "last.safetensors").unlink()
    m = UNet.from_preset("tiny", learn_sigma=True, image_size=8, in_channels=1)
    save_checkpoint(runs / "kl-uniform-seed0" / "last.safetensors", m,
                    GaussianDiffusion(make_betas("linear", 25), var_type="learned_range", loss_type="kl"), step=3)
    rep.main(["--runs", str(runs), "--out", str(out), "--doc", str(doc), "--train-steps", "7", "--seeds", "0,1",
              "--bpd-images", "4", "--fid-samples", "20", "--steps", "5,3", "--quality-steps", "5"])
    assert "kl-uniform-seed0: at step 3, not --train-steps 7: left out" in capsys.readouterr().out
    bpd = json.loads((out / "bpd.json").read_text())
    assert set(bpd["models"]) == {"digits", "simple-seed0", "simple-seed1", "hybrid-linear-seed0", "hybrid-linear-seed1"}
    c = bpd["comparisons"]["hybrid-linear - simple"]
    assert [p["n"] for p in c["per_seed"]] == [4, 4] and c["over_seeds"]["n"] == 2
    for p in c["per_seed"]:  # the per-image pairing: the mean difference is the difference of the means
        a, b = bpd["models"][f"hybrid-linear-seed{p['seed']}"], bpd["models"][f"simple-seed{p['seed']}"]
        assert p["mean"] == pytest.approx(a["bpd"] - b["bpd"], rel=1e-9)
    fig8 = json.loads((out / "fid_vs_steps.json").read_text())
    for series in fig8["series"].values():
        assert all(len(draws) == 5 for point in series["points"].values() for draws in point["per_seed"].values())
    quality = json.loads((out / "quality.json").read_text())
    assert all(len(m["per_noise_seed"]) == 5 for m in quality["models"].values())
    text = doc.read_text()
    want = rv.verdict(c["over_seeds"], [p["mean"] for p in c["per_seed"]])
    assert f"| L_hybrid gives better likelihood than L_simple | IDDPM Tab. 1, sec. 3.1 | **{want}** |" in text
    assert "(SE, n = 2)" in text and "do not edit" in text
    for png in ("fid_vs_steps.png", "rate_distortion.png", "vlb_terms.png", "training_curves.png"):
        assert (out / png).read_bytes().startswith(b"\x89PNG"), png
    terms = json.loads((out / "terms.json").read_text())
    assert terms["decoder_floor"]["variance"] == pytest.approx(5.45e-5, rel=1e-3)
    assert 60 < terms["mean_image_distortion"] < 90


def test_replicate_needs_five_noise_seeds(tmp_path):
    rep = _module("replicate")
    with pytest.raises(SystemExit) as e:
        rep.main(["--runs", str(tmp_path), "--out", str(tmp_path / "o"), "--noise-seeds", "0,1,2"])
    assert e.value.code == 2
