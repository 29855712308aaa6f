"""`train --resume` continues the saved configuration (issue 21, item 5).

The reported failure: after `--lr 5e-4 --warmup 100`, a resume without those flags ran at the
defaults (lr 1.8e-5 at that step), and a changed --lr, --batch, --seed or --ema was taken silently.
Now a flag left out takes the saved value, a contradicting one is refused with one line naming
both values (before any step, the checkpoint untouched), and a legitimate change (--steps, the
intervals) is taken and stated, on stdout and in log.jsonl.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fastddpm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "images.npz"
    np.savez(path, arr_0=np.random.default_rng(11).integers(0, 256, size=(24, 8, 8, 3), dtype=np.uint8))
    return path


SETTINGS = ["--lr", "5e-4", "--warmup", "100", "--seed", "3", "--ema", "0.99", "--batch", "4", "--diffusion-steps",
            "25", "--grad-clip", "0.5", "--log-every", "1"]


def _argv(npz, out, steps, *extra):
    return ["train", "--data", f"npz:{npz}", "--model", "tiny", "--out", str(out), "--steps", str(steps),
            "--device", "cpu", "--no-progress", *SETTINGS, *extra]


def _meta(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["config"])["meta"]


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_a_bare_resume_continues_the_saved_settings_exactly(npz, tmp_path, capsys):
    split, straight = tmp_path / "split", tmp_path / "straight"
    assert main(_argv(npz, split, 2)) == 0
    assert main(["train", "--out", str(split), "--resume", "--steps", "3", "--no-progress"]) == 0  # nothing else given
    assert main(_argv(npz, straight, 3)) == 0
    out = capsys.readouterr().out
    assert "fastddpm: note: --steps is now 3 (the run was started with 2)" in out
    record = [r for r in _log(split) if r.get("event") == "resume"]
    assert record == [{"step": 2, "event": "resume", "changed": ["--steps is now 3 (the run was started with 2)"]}]
    step3 = [r for r in _log(split) if r.get("step") == 3 and "loss" in r][0]
    assert step3["lr"] == pytest.approx(5e-4 * 3 / 100)  # the saved lr and warm-up, not the defaults' 1.2e-7
    a, b = load_file(str(split / "last.safetensors")), load_file(str(straight / "last.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _meta(split / "last.safetensors")["train_config"]["lr"] == 5e-4


@pytest.mark.parametrize("flag, value, saved", [("--lr", "0.001", "0.0005"), ("--batch", "2", "4"),
                                                ("--seed", "4", "3"), ("--ema", "0.9", "0.99"),
                                                ("--warmup", "10", "100"), ("--precision", "bf16", "fp32"),
                                                ("--flip", "off", "auto")])
def test_a_contradicting_flag_is_refused_before_any_step(npz, tmp_path, capsys, flag, value, saved, run_at_2):
    out = run_at_2(tmp_path)
    before = (out / "last.safetensors").read_bytes(), sorted(p.name for p in out.iterdir())
    assert main(["train", "--out", str(out), "--resume", "--steps", "5", "--no-progress", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastddpm: error: "), err
    assert f"was trained with {flag} {saved}, not {value}" in err, err
    assert before == ((out / "last.safetensors").read_bytes(), sorted(p.name for p in out.iterdir()))


@pytest.fixture(scope="module")
def trained(npz, tmp_path_factory):
    """A run folder trained to step 2 (copied per test)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(_argv(npz, out, 2)) == 0
    return out


@pytest.fixture
def run_at_2(trained):
    import shutil

    def copy(tmp_path):
        dst = tmp_path / "run"
        shutil.copytree(trained, dst)
        return dst
    return copy


def test_the_same_values_given_again_are_fine(npz, tmp_path, run_at_2, capsys):
    out = run_at_2(tmp_path)
    assert main(_argv(npz, out, 3, "--resume")) == 0
    assert "note: --steps is now 3" in capsys.readouterr().out
    assert _meta(out / "last.safetensors")["step"] == 3


def test_a_fresh_run_needs_data_and_model(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err == "fastddpm: error: train: the following arguments are required: --data, --model\n", err
    assert not (tmp_path / "r").exists()
