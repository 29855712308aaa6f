"""`fastddpm sample`: the files it writes, reproducibility, and one-line exit-2 errors for bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fastddpm import GaussianDiffusion, make_betas, save_checkpoint
from fastddpm.cli import main
from helpers import randomized_unet


def run_cli(*args):
    """The CLI in a subprocess, as a user runs it: (exit status, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "fastddpm", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stdout, proc.stderr


def test_sample_writes_npz_grid_and_stats(tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = run_cli("sample", "--model", "tiny", "--steps", "3", "--batch", "5", "--seed", "1",
                                   "--out", out)
    assert code == 0, stderr
    images = np.load(out / "samples.npz")["arr_0"]
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    grid = Image.open(out / "grid.png")
    assert grid.size[0] >= 3 * 32 and grid.mode == "RGB"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["steps"] == 3 and stats["request"]["batch"] == 5 and stats["images_per_s"] > 0
    assert "images/s" in stdout and "ms/step" in stdout
    assert "random tiny weights" in stderr  # says it is a throughput run
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "samples.npz", "stats.json"]


def test_same_seed_same_images(tmp_path):
    for name in ("a", "b"):
        assert main(["sample", "--model", "tiny", "--steps", "2", "--batch", "2", "--seed", "7",
                     "--no-progress", "--out", str(tmp_path / name)]) == 0
    a, b = (np.load(tmp_path / n / "samples.npz")["arr_0"] for n in ("a", "b"))
    assert np.array_equal(a, b)


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, randomized_unet("tiny", image_size=8, in_channels=1),
                    GaussianDiffusion(make_betas("linear", 100)))
    return path


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_sample_from_a_checkpoint(tmp_path, checkpoint, sampler):
    out = tmp_path / "ck"
    assert main(["sample", "--checkpoint", str(checkpoint), "--steps", "4", "--batch", "3", "--sampler", sampler,
                 "--no-progress", "--out", str(out)]) == 0
    images = np.load(out / "samples.npz")["arr_0"]
    assert images.shape == (3, 8, 8, 1) and images.std() > 0
    assert Image.open(out / "grid.png").mode == "L"


def _bad(tmp_path, checkpoint):
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(checkpoint.read_bytes()[:1000])
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return {
        "steps 0": ["--model", "tiny", "--steps", "0"],
        "steps > T": ["--model", "tiny", "--steps", "1001"],
        "steps > T of a checkpoint": ["--checkpoint", checkpoint, "--steps", "101"],
        "batch 0": ["--model", "tiny", "--batch", "0"],
        "batch not a number": ["--model", "tiny", "--batch", "many"],
        "unknown preset": ["--model", "imagenet"],
        "unknown sampler": ["--model", "tiny", "--sampler", "euler"],
        "eta out of range": ["--model", "tiny", "--sampler", "ddim", "--eta", "3"],
        "unknown flag": ["--model", "tiny", "--colour"],
        "missing checkpoint": ["--checkpoint", tmp_path / "nope.safetensors"],
        "truncated checkpoint": ["--checkpoint", trunc],
        "not a checkpoint": ["--checkpoint", blocker],
        "onnx without file": ["--model", "tiny", "--backend", "onnx"],
        "unwritable out": ["--model", "tiny", "--out", blocker / "sub"],
    }


def test_bad_input_exits_2_with_one_line(tmp_path, checkpoint, capsys):
    for label, args in _bad(tmp_path, checkpoint).items():
        out = tmp_path / ("out-" + label.replace(" ", "-"))
        if "--out" not in args:
            args = [*args, "--out", out]
        code = main(["sample", "--no-progress", *map(str, args)])
        stderr = capsys.readouterr().err
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert code == 2, (label, code, stderr)
        assert len(lines) == 1 and lines[0].startswith("fastddpm: error:"), (label, stderr)
        assert not (out / "samples.npz").exists(), label


@pytest.mark.parametrize("label", ["truncated checkpoint", "unknown flag"])
def test_bad_input_in_a_real_process_has_no_traceback(tmp_path, checkpoint, label):
    args = _bad(tmp_path, checkpoint)[label]
    code, stdout, stderr = run_cli("sample", *args, "--out", tmp_path / "o")
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr


def test_errors_are_checked_before_long_work(tmp_path, checkpoint):
    """A bad --steps against a checkpoint fails at once and writes nothing into --out."""
    out = tmp_path / "o"
    assert main(["sample", "--checkpoint", str(checkpoint), "--steps", "500", "--out", str(out)]) == 2
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("seed", ["-1", str(2**32), "99999999999999999999"])
def test_seeds_outside_the_noise_key_range_are_refused(tmp_path, seed, capsys):
    """The noise key is 32 bits; a seed outside 0..2^32-1 used to wrap silently (2^32 drew seed 0's noise)."""
    out = tmp_path / "o"
    assert main(["sample", "--model", "tiny", "--steps", "2", "--batch", "1", "--seed", seed, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--seed" in err and "4294967295" in err, err
    assert not out.exists()


def test_largest_seed_is_accepted_and_differs_from_seed_0(tmp_path):
    for seed in (0, 2**32 - 1):
        assert main(["sample", "--model", "tiny", "--steps", "2", "--batch", "2", "--seed", str(seed), "--no-progress",
                     "--out", str(tmp_path / str(seed))]) == 0
    a, b = (np.load(tmp_path / str(s) / "samples.npz")["arr_0"] for s in (0, 2**32 - 1))
    assert not np.array_equal(a, b)


def test_noise_refuses_instead_of_wrapping():
    import torch

    from fastddpm.errors import FastDDPMError
    from fastddpm.noise import noise

    for seed in (-1, 2**32, 2**40 + 3):
        with pytest.raises(FastDDPMError, match="0 to 4294967295"):
            noise(seed, 0, (1, 4))
    torch.testing.assert_close(noise(np.int64(7), 3, (2, 4)), noise(7, 3, (2, 4)), rtol=0, atol=0)


def test_a_bad_flag_is_prefixed_once(capsys):
    assert main(["sample", "--batch", "many"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastddpm: error: sample: argument --batch") and err.count("fastddpm") == 1, err


def test_out_of_memory_is_one_line_naming_the_flag(tmp_path, monkeypatch, capsys):
    import torch

    from fastddpm import generate

    assert main(["sample", "--model", "tiny", "--steps", "2", "--batch", str(10**12), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory" in err and "lower --batch" in err, err  # refused before allocating
    assert not (tmp_path / "a").exists()

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)\nmore")
    monkeypatch.setattr(generate, "sample", no_memory)
    assert main(["sample", "--model", "tiny", "--steps", "2", "--batch", "2", "--out", str(tmp_path / "b")]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fastddpm: error")]
    assert len(lines) == 1 and "out of memory" in lines[0] and "Tried to allocate" in lines[0], lines
    assert not (tmp_path / "b").exists()


def test_library_warnings_do_not_precede_the_error_line(tmp_path, monkeypatch, capsys):
    import warnings

    from fastddpm import generate
    from fastddpm.errors import CheckpointError

    def warn_then_fail(*args, **kwargs):
        warnings.warn("TypedStorage is deprecated", UserWarning)
        raise CheckpointError("the checkpoint is broken")
    monkeypatch.setattr(generate, "build_model", warn_then_fail)
    assert main(["sample", "--model", "tiny", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == "fastddpm: error: the checkpoint is broken\n"


def test_warnings_of_a_successful_command_are_still_shown(tmp_path, monkeypatch):
    import warnings

    from fastddpm import generate

    real = generate.forward_gflops

    def warn(config):
        warnings.warn("a library's warning", UserWarning)
        return real(config)
    monkeypatch.setattr(generate, "forward_gflops", warn)
    with pytest.warns(UserWarning, match="a library's warning"):
        assert main(["sample", "--model", "tiny", "--steps", "2", "--batch", "1", "--no-progress",
                     "--out", str(tmp_path / "o")]) == 0
