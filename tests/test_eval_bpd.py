"""`fastddpm eval bpd` (fastddpm.bpd): test-set bits/dim through calc_bpd_loop, JSON breakdown, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastddpm.bpd import BpdRequest, evaluate_bpd
from fastddpm.checkpoint import save_checkpoint
from fastddpm.cli import main
from fastddpm.diffusion import GaussianDiffusion
from fastddpm.images import from_uint8
from fastddpm.schedule import make_betas
from fastddpm.unet import UNet

T = 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny learned-variance checkpoint (output convs re-randomised) and 10 images 8x8x3 in an npz."""
    folder = tmp_path_factory.mktemp("bpd")
    torch.manual_seed(3)
    model = UNet.from_preset("tiny", learn_sigma=True, image_size=8)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
            m.reset_parameters()
    diffusion = GaussianDiffusion(make_betas("cosine", T), var_type="learned_range", loss_type="hybrid")
    save_checkpoint(folder / "model.safetensors", model, diffusion, step=0)
    images = np.random.default_rng(5).integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8)
    np.savez(folder / "images.npz", arr_0=images)
    return folder, model.eval(), diffusion, images


def test_bpd_matches_calc_bpd_loop(files, tmp_path):
    folder, model, diffusion, images = files
    out = tmp_path / "bpd.json"
    result = evaluate_bpd(BpdRequest(checkpoint=str(folder / "model.safetensors"), data=f"npz:{folder / 'images.npz'}",
                                     batch=16, seed=11, out=str(out), progress=False, device="cpu"))
    torch.manual_seed(11)  # one batch: the same x_t draws as evaluate_bpd (randn_like follows the memory
    ref = diffusion.calc_bpd_loop(model, from_uint8(images).contiguous())  # layout: NCHW-contiguous as there)
    assert result["images"] == 10 and result["T"] == T
    assert result["bpd"] == pytest.approx(float(ref["total_bpd"].mean()), rel=1e-6)
    assert result["prior_bpd"] == pytest.approx(float(ref["prior_bpd"].mean()), rel=1e-6)
    assert result["bpd_stderr"] == pytest.approx(float(ref["total_bpd"].std() / np.sqrt(10)), rel=1e-5)
    for key in ("vb", "mse", "xstart_mse"):
        assert np.allclose(result["per_timestep"][key], ref[key].mean(dim=0).numpy(), rtol=1e-6)
    # the bound is the sum of its terms, and the JSON file holds the same numbers
    assert result["bpd"] == pytest.approx(sum(result["per_timestep"]["vb"]) + result["prior_bpd"], rel=1e-6)
    assert json.loads(out.read_text())["bpd"] == result["bpd"]
    assert result["bpd"] > 0  # discrete data: every term is a KL or a -log of a probability mass


def test_bpd_batches_and_limit(files, tmp_path):
    folder, *_ = files
    kw = dict(checkpoint=str(folder / "model.safetensors"), data=f"npz:{folder / 'images.npz'}", progress=False,
              out=None, device="cpu")
    whole = evaluate_bpd(BpdRequest(batch=16, **kw))
    split = evaluate_bpd(BpdRequest(batch=3, **kw))  # 4 batches, other x_t draws: the same estimate
    assert split["images"] == 10
    assert split["bpd"] == pytest.approx(whole["bpd"], abs=4 * whole["bpd_stderr"] + 0.05 * whole["bpd"])
    assert evaluate_bpd(BpdRequest(batch=16, limit=4, **kw))["images"] == 4


def _one_line_error(capsys, *pieces):
    err = capsys.readouterr().err
    assert err.startswith("fastddpm: error: ") and err.count("\n") == 1, err
    for piece in pieces:
        assert piece in err, (piece, err)


def test_cli(files, tmp_path, capsys):
    folder, *_ = files
    ckpt, data = str(folder / "model.safetensors"), f"npz:{folder / 'images.npz'}"
    out = tmp_path / "r.json"
    assert main(["eval", "bpd", "--checkpoint", ckpt, "--data", data, "--out", str(out), "--no-progress",
                 "--device", "cpu", "--limit", "2"]) == 0
    assert "bits/dim over 2 test images" in capsys.readouterr().out
    assert len(json.loads(out.read_text())["per_timestep"]["vb"]) == T

    np.savez(tmp_path / "grey.npz", arr_0=np.zeros((3, 8, 8, 1), dtype=np.uint8) + 7)
    assert main(["eval", "bpd", "--checkpoint", ckpt, "--data", f"npz:{tmp_path / 'grey.npz'}", "--out",
                 str(tmp_path / "x.json")]) == 2
    _one_line_error(capsys, "1 channel(s)", "takes 3")
    np.savez(tmp_path / "big.npz", arr_0=np.zeros((3, 16, 16, 3), dtype=np.uint8) + 7)
    assert main(["eval", "bpd", "--checkpoint", ckpt, "--data", f"npz:{tmp_path / 'big.npz'}"]) == 2
    _one_line_error(capsys, "16x16", "8x8")
    assert main(["eval", "bpd", "--checkpoint", str(tmp_path / "none.safetensors"), "--data", data]) == 2
    _one_line_error(capsys, "does not exist")
    assert not (tmp_path / "x.json").exists()


def test_out_is_checked_before_the_evaluation(files, tmp_path, capsys, monkeypatch):
    """A bad --out used to fail only after the whole evaluation; now before the checkpoint is even read."""
    from fastddpm import bpd

    folder, *_ = files
    ckpt, data = str(folder / "model.safetensors"), f"npz:{folder / 'images.npz'}"

    def never(*args, **kwargs):
        raise AssertionError("the evaluation must not start")
    monkeypatch.setattr(bpd, "load_checkpoint", never)
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    for out, piece in [(str(tmp_path / "a-folder"), "is a folder"), ("", "--out is empty"),
                       ("/proc/bpd.json", "system folder"), (str(tmp_path / "a-file" / "bpd.json"), "not a folder")]:
        assert main(["eval", "bpd", "--checkpoint", ckpt, "--data", data, "--no-progress", "--out", out]) == 2
        _one_line_error(capsys, piece)
    assert main(["eval", "bpd", "--checkpoint", ckpt, "--data", data, "--seed", str(2**32), "--out",
                 str(tmp_path / "b.json")]) == 2
    _one_line_error(capsys, "--seed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "a-folder"]


def test_versus_pairs_the_same_images_and_draws(files, tmp_path, capsys):
    folder, model, diffusion, images = files
    other = folder / "other.safetensors"
    torch.manual_seed(9)
    m2 = UNet.from_preset("tiny", learn_sigma=True, image_size=8)
    for m in m2.modules():
        if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
            m.reset_parameters()
    save_checkpoint(other, m2, diffusion, step=0)
    out = tmp_path / "pair.json"
    data = f"npz:{folder / 'images.npz'}"
    assert main(["eval", "bpd", "--checkpoint", str(folder / "model.safetensors"), "--data", data, "--batch", "4",
                 "--versus", str(other), "--out", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    alone = [evaluate_bpd(BpdRequest(checkpoint=str(c), data=data, batch=4, out=None, progress=False))
             for c in (folder / "model.safetensors", other)]
    assert r["per_image_bpd"] == pytest.approx(alone[0]["per_image_bpd"], rel=1e-12)  # same seed: same draws
    assert r["versus"]["per_image_bpd"] == pytest.approx(alone[1]["per_image_bpd"], rel=1e-12)
    d = np.subtract(alone[0]["per_image_bpd"], alone[1]["per_image_bpd"])
    assert r["paired_difference"]["mean"] == pytest.approx(d.mean(), rel=1e-9)
    assert r["paired_difference"]["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(10), rel=1e-9)
    assert r["shared_xt_draws"] and "paired over the same 10 images" in capsys.readouterr().out
    # the same checkpoint against itself: every draw shared, the difference exactly 0
    assert main(["eval", "bpd", "--checkpoint", str(other), "--data", data, "--versus", str(other),
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["paired_difference"]["mean"] == 0.0
    assert main(["eval", "bpd", "--checkpoint", str(other), "--data", data, "--versus", str(other),
                 "--per-timestep", "--out", str(out)]) == 2
    assert main(["eval", "bpd", "--checkpoint", str(other), "--data", data, "--versus", str(other),
                 "--out", str(other)]) == 2
