"""`fastddpm export`, `fastddpm sample --backend onnx` and `python ort_sample.py` end to end.

Includes the deployment check: ort_sample.py copied alone to a folder and run in a subprocess
where `import torch` fails (a stub package first on PYTHONPATH), with and without Pillow,
writing the same samples.npz as `fastddpm sample --backend onnx`.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Skipped, not a collection error, where onnx or onnxruntime is missing (so `pytest -m gpu tests`
# still runs on a GPU host without them): every test here exports a graph or runs one.
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import fastddpm.export.ort_sample as ort_sample_module  # noqa: E402
from fastddpm import sample, save_checkpoint  # noqa: E402
from fastddpm.cli import main  # noqa: E402
from fastddpm.errors import FastDDPMError  # noqa: E402
from helpers import rel_err  # noqa: E402

ORT_SAMPLE = Path(ort_sample_module.__file__)
SAMPLE_ARGS = ["--steps", "6", "--batch", "5", "--seed", "4"]


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    model, diffusion = tiny
    path = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    save_checkpoint(path, model, diffusion, step=123)
    return path


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """`fastddpm export` of the checkpoint (fp32 eps graph), run in-process."""
    out = tmp_path_factory.mktemp("cli") / "tiny.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def onnx_samples(exported, tmp_path_factory):
    """samples.npz of `fastddpm sample --backend onnx --onnx FILE` (in-process)."""
    out = tmp_path_factory.mktemp("onnx-run")
    assert main(["sample", "--backend", "onnx", "--onnx", str(exported), *SAMPLE_ARGS, "--no-progress",
                 "--out", str(out)]) == 0
    return out


def stub_env(tmp_path: Path, *modules: str) -> dict:
    """An environment whose Python fails to import each of `modules` (stub packages first on PYTHONPATH)."""
    stubs = tmp_path / "stubs"
    for name in modules:
        (stubs / name).mkdir(parents=True, exist_ok=True)
        stub = f"raise ImportError('{name} is not installed on this host (test stub)')\n"
        (stubs / name / "__init__.py").write_text(stub)
    return {**os.environ, "PYTHONPATH": str(stubs), "OMP_NUM_THREADS": "1"}


def run_script(script: Path, args: list, env: dict, cwd: Path):
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_export_cli_writes_a_checked_self_describing_file(exported, checkpoint, tiny):
    model = onnx.load(str(exported))
    onnx.checker.check_model(model, full_check=True)
    meta = json.loads({p.key: p.value for p in model.metadata_props}["fastddpm"])
    assert meta["graph"] == "eps" and meta["dtype"] == "fp32"
    assert meta["meta"] == {"checkpoint": str(checkpoint), "step": 123}
    assert meta["unet"] == tiny[0].config.to_dict()


def test_onnx_backend_matches_the_reference_backend(onnx_samples, checkpoint, tmp_path):
    ref = tmp_path / "ref"
    assert main(["sample", "--checkpoint", str(checkpoint), *SAMPLE_ARGS, "--no-progress", "--out", str(ref)]) == 0
    a = np.load(onnx_samples / "samples.npz")["arr_0"].astype(int)
    b = np.load(ref / "samples.npz")["arr_0"].astype(int)
    assert a.shape == b.shape == (5, 16, 16, 3)
    # float32 rounding (z's last bits, ORT's kernels) may move a value across a rounding boundary
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01
    stats = json.loads((onnx_samples / "stats.json").read_text())
    assert stats["request"]["backend"] == "onnx" and stats["source"].startswith("onnx ")


def test_ort_sample_runs_without_torch_and_writes_the_same_samples(exported, onnx_samples, tmp_path):
    env = stub_env(tmp_path, "torch")
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=env)
    assert probe.returncode != 0 and "test stub" in probe.stderr  # the stub really hides torch
    host = tmp_path / "host"
    host.mkdir()
    script = Path(shutil.copy(ORT_SAMPLE, host / "ort_sample.py"))  # the file alone, away from the package
    out = tmp_path / "out"
    code, stdout, stderr = run_script(script, ["--onnx", exported, *SAMPLE_ARGS, "--threads", "1", "--out", out],
                                      env, cwd=tmp_path)
    assert code == 0, stderr
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], np.load(onnx_samples / "samples.npz")["arr_0"])
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "samples.npz", "stats.json"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["steps"] == 6 and stats["shape"] == [5, 16, 16, 3] and stats["images_per_s"] > 0
    assert "CPUExecutionProvider" in stats["device"] and "images/s" in stdout


def test_ort_sample_without_pillow_skips_only_the_grid(exported, onnx_samples, tmp_path):
    env = stub_env(tmp_path, "torch", "PIL")
    out = tmp_path / "out"
    code, _, stderr = run_script(ORT_SAMPLE, ["--onnx", exported, *SAMPLE_ARGS, "--threads", "1", "--out", out],
                                 env, cwd=tmp_path)
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["samples.npz", "stats.json"]
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], np.load(onnx_samples / "samples.npz")["arr_0"])


def bad_files(exported: Path, folder: Path) -> dict:
    """A truncated export, a foreign ONNX model (valid, no fastddpm metadata), garbage, a missing path."""
    data = exported.read_bytes()
    (folder / "truncated.onnx").write_bytes(data[: len(data) // 2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "foreign",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(graph), str(folder / "foreign.onnx"))
    (folder / "garbage.onnx").write_text("this is not a protobuf\n")
    return {"truncated": (folder / "truncated.onnx", "not a readable ONNX model"),
            "foreign": (folder / "foreign.onnx", "not a fastddpm export"),
            "garbage": (folder / "garbage.onnx", "not a readable ONNX model"),
            "missing": (folder / "missing.onnx", "does not exist")}


@pytest.mark.parametrize("kind", ["truncated", "foreign", "garbage", "missing"])
def test_bad_onnx_files_exit_2_with_one_line(exported, tmp_path, capsys, kind):
    path, message = bad_files(exported, tmp_path)[kind]
    assert main(["sample", "--backend", "onnx", "--onnx", str(path), "--steps", "2", "--batch", "1",
                 "--no-progress", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastddpm: error: ") and message in err and err.count("\n") == 1
    assert ort_sample_module.main(["--onnx", str(path), "--steps", "2", "--batch", "1", "--out",
                                   str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ort_sample.py: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "a" / "samples.npz").exists() and not (tmp_path / "b" / "samples.npz").exists()


def test_truncated_file_in_a_torch_free_subprocess(exported, tmp_path):
    path, message = bad_files(exported, tmp_path)["truncated"]
    code, stdout, stderr = run_script(ORT_SAMPLE, ["--onnx", path, "--out", tmp_path / "o"],
                                      stub_env(tmp_path, "torch"), cwd=tmp_path)
    assert code == 2 and message in stderr and "Traceback" not in stderr and stderr.count("\n") == 1


def test_sample_cli_onnx_refusals(exported, tiny, tmp_path, capsys):
    model, diffusion = tiny
    fp16 = tmp_path / "fp16.onnx"
    from fastddpm.export.onnx_export import export_onnx

    export_onnx(model, diffusion, fp16, dtype="fp16")
    cases = [
        (["--onnx", str(fp16)], "was exported as fp16; sample it with --dtype fp16"),
        (["--onnx", str(exported), "--model", "tiny"], "leave out --checkpoint and --model"),
        (["--onnx", str(exported), "--steps", "101"], "between 1 and the model's T = 100"),
    ]
    for args, message in cases:
        assert main(["sample", "--backend", "onnx", *args, "--batch", "1", "--no-progress",
                     "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    assert main(["sample", "--backend", "onnx", "--onnx", str(fp16), "--dtype", "fp16", "--steps", "2", "--batch",
                 "2", "--no-progress", "--out", str(tmp_path / "ok")]) == 0


def test_export_cli_refusals(tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_backend_onnx_takes_a_unet_in_python(tiny):
    """sample(unet, ..., backend="onnx") exports in memory; trajectory end point equals the reference's."""
    model, diffusion = tiny
    process = diffusion.respace("5")
    got = sample(model, process, (3, 3, 16, 16), seed=8, backend="onnx")
    want = sample(model, process, (3, 3, 16, 16), seed=8)
    assert rel_err(got, want) < 1e-5
    with pytest.raises(FastDDPMError, match="fp32 or fp16"):
        sample(copy.deepcopy(model).to(torch.bfloat16), process, (1, 3, 16, 16), backend="onnx")
