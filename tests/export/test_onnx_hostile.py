"""Hostile ONNX files: metadata that lies about the graph or holds bad values gets one line and exit 2
from both `fastddpm sample --backend onnx` and the torch-free `ort_sample.py`, and no samples; and the
rest of issue 21 for ort_sample.py: hostile flags, paths and --x-T files, an interrupt in the first
moments, and outputs that are published all or nothing (a full disk, a failed rename, planted links)."""
from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import fastddpm.export.ort_sample as ort_sample  # noqa: E402
from fastddpm.cli import main  # noqa: E402
from fastddpm.errors import CheckpointError  # noqa: E402


def rewritten(src, dst, mutate):
    """Copy the ONNX file `src` to `dst` with its fastddpm metadata passed through mutate(meta) -> meta."""
    proto = onnx.load(str(src))
    prop = next(p for p in proto.metadata_props if p.key == ort_sample.META_KEY)
    prop.value = json.dumps(mutate(json.loads(prop.value)))
    onnx.save(proto, str(dst))
    return dst


def setting(section, **changes):
    def mutate(meta):
        (meta[section] if section else meta).update(changes)
        return meta
    return mutate


def betas(value):
    def mutate(meta):
        meta["betas"] = value(meta["betas"])
        return meta
    return mutate


CASES = {
    # metadata that disagrees with the graph
    "image_size_disagrees": ("fp32", setting("unet", image_size=8), "graph input 'x' is tensor(float) "
                             "['batch', 3, 16, 16], but the metadata promises tensor(float) ['batch', 3, 8, 8]"),
    "channels_disagree": ("fp32", setting("unet", in_channels=1), "graph input 'x'"),
    "inputs_not_promised": ("fp32", setting(None, graph="step"), "the graph takes inputs ['t', 'x'], but its "
                            "metadata promises a step graph with inputs ['coef', 'prev_x0', 't', 'x', 'z']"),
    "step_called_eps": ("step", setting(None, graph="eps"), "metadata promises a eps graph with inputs ['t', 'x']"),
    # values no graph can have
    "huge_image_size": ("fp32", setting("unet", image_size=10**6), "image_size=1000000 is not an integer in [1, 1024]"),
    "string_channels": ("fp32", setting("unet", in_channels="3"), "in_channels='3' is not an integer"),
    "bool_T": ("fp32", setting("diffusion", num_timesteps=True), "num_timesteps=True is not an integer"),
    "betas_of_one": ("fp32", betas(lambda b: [1.0] * len(b)), "every beta must be finite and in (0, 1)"),
    "negative_betas": ("fp32", betas(lambda b: [-x for x in b]), "every beta must be finite and in (0, 1)"),
    "nan_betas": ("fp32", betas(lambda b: [float("nan")] * len(b)), "every beta must be finite and in (0, 1)"),
    "string_betas": ("fp32", betas(lambda b: ["0.1"] * len(b)), "betas must be a list of numbers"),
    "bool_betas": ("fp32", betas(lambda b: [True] * len(b)), "betas must be a list of numbers"),
    "betas_2d": ("fp32", betas(lambda b: [b]), "betas must be a list of numbers"),
    "betas_scalar": ("fp32", betas(lambda b: 0.5), "betas must be a list of numbers"),
    "T_disagrees": ("fp32", setting("diffusion", num_timesteps=99), "says T=99 but holds 100 betas"),
    "unknown_mean_type": ("fp32", setting("diffusion", mean_type="v"), "mean_type='v' is not one of eps, x0, xprev"),
    "unknown_var_type": ("fp32", setting("diffusion", var_type="huge"), "var_type='huge' is not one of"),
    "unhashable_var_type": ("fp32", setting("diffusion", var_type=["fixedlarge"]), "var_type=['fixedlarge']"),
    "unknown_dtype": ("fp32", setting(None, dtype="int8"), "dtype='int8' is not one of fp32, fp16"),
    "clip_string": ("fp32", setting(None, clip_denoised="yes"), "clip_denoised='yes' is not one of"),
    "metadata_list": ("fp32", lambda meta: [meta], "a JSON list, not an object"),
    "unet_missing": ("fp32", lambda meta: {k: v for k, v in meta.items() if k != "unet"}, "corrupt fastddpm metadata"),
    # issue 21: betas whose alphabar never leaves 1 (1 - alphabar = 0 divides), a non-number FLOP count
    "betas_1e-300": ("fp32", betas(lambda b: [1e-300] * len(b)), "beta = 1e-300 at t=0 is too small for float64"),
    "gflop_lots": ("fp32", setting(None, gflop_per_image_forward="lots"),
                   "gflop_per_image_forward='lots' is not a finite number >= 0"),
    "gflop_negative": ("fp32", setting(None, gflop_per_image_forward=-1), "gflop_per_image_forward=-1 is not"),
    # issue 18: the Analytic-DPM table (T finite numbers >= 0) and the format versions
    "gamma_short": ("fp32", setting(None, gamma=[0.5] * 3), "gamma (Analytic-DPM's table) must be a list of T=100 "
                    "finite numbers >= 0"),
    "gamma_negative": ("fp32", setting(None, gamma=[-0.5] * 100), "gamma (Analytic-DPM's table) must be"),
    "gamma_nan": ("fp32", setting(None, gamma=[float("nan")] * 100), "gamma (Analytic-DPM's table) must be"),
    "gamma_strings": ("fp32", setting(None, gamma=["0.5"] * 100), "gamma (Analytic-DPM's table) must be"),
    "gamma_object": ("fp32", setting(None, gamma={"t": 1}), "gamma (Analytic-DPM's table) must be"),
    "version_3": ("fp32", setting(None, version="3"), "is export format version '3'; this sampler reads versions 1"),
    "step_version_1": ("step", setting(None, version="1"), "is a version-1 step graph"),
}


def _files_under(path):
    return sorted(p for p in path.rglob("*") if p.is_file())


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_onnx_metadata_exits_2_from_both_samplers(exports, tmp_path, capsys, case):
    variant, mutate, message = CASES[case]
    path = rewritten(exports[variant], tmp_path / "bad.onnx", mutate)
    code = main(["sample", "--backend", "onnx", "--onnx", str(path), "--steps", "2", "--batch", "1",
                 "--device", "cpu", "--no-progress", "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fastddpm: error: ") and err.count("\n") == 1, err
    assert message in err and "bad.onnx" in err and "Traceback" not in err
    code = ort_sample.main(["--onnx", str(path), "--steps", "2", "--batch", "1", "--provider", "cpu", "--threads",
                            "1", "--no-progress", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ort_sample.py: error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err
    assert _files_under(tmp_path) == [path]  # no samples, no temporary files


def test_load_onnx_raises_checkpoint_error(exports, tmp_path):
    from fastddpm.export.ort_backend import load_onnx

    path = rewritten(exports["fp32"], tmp_path / "bad.onnx", betas(lambda b: [1.0] * len(b)))
    with pytest.raises(CheckpointError, match="every beta must be finite"):
        load_onnx(path, "cpu")
    # a U-Net field ort_sample.py does not need (it reads only in_channels and image_size) is still
    # checked by fastddpm, as a checkpoint's config is
    path = rewritten(exports["fp32"], tmp_path / "bad2.onnx", setting("unet", model_channels="32"))
    with pytest.raises(CheckpointError, match="model_channels must be an integer, not str"):
        load_onnx(path, "cpu")
    path = rewritten(exports["fp32"], tmp_path / "bad3.onnx", setting("diffusion", loss_type="weird"))
    with pytest.raises(CheckpointError, match="loss_type='weird' is not one of"):
        load_onnx(path, "cpu")


def test_a_valid_rewrite_still_samples(exports, tmp_path):
    """The rewriting itself is harmless: an unchanged description samples as before."""
    path = rewritten(exports["fp32"], tmp_path / "same.onnx", lambda meta: meta)
    assert ort_sample.main(["--onnx", str(path), "--steps", "2", "--batch", "1", "--provider", "cpu", "--threads", "1",
                            "--no-progress", "--out", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok" / "samples.npz").is_file()


def test_export_refuses_a_folder_as_out(tmp_path, capsys):
    (tmp_path / "dir.onnx").mkdir()
    assert main(["export", "--checkpoint", "digits", "--out", str(tmp_path / "dir.onnx")]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and err.count("\n") == 1
    assert _files_under(tmp_path) == []


@pytest.mark.parametrize("flag, value", [
    ("--seed", "4294967296"),  # one past the noise key's 32-bit word: refused, never wrapped
    ("--seed", "-1"),
    ("--sample-offset", "4294967296"),
    ("--batch", "0"),
    ("--batch", "3x"),
])
def test_ort_sample_refuses_out_of_range_numbers_before_loading(tmp_path, capsys, flag, value):
    """Like `fastddpm sample --seed`, ort_sample.py takes seeds in 0..2^32-1 only: one line, exit 2,
    checked while parsing (the ONNX file named here does not even exist)."""
    args = ["--onnx", str(tmp_path / "absent.onnx"), "--out", str(tmp_path / "out"), flag, value]
    assert ort_sample.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ort_sample.py: error: argument " + flag) and err.count("\n") == 1, err
    assert repr(value) in err and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ issue 21: ort_sample.py
def ort_run(args, out):
    return ort_sample.main(["--provider", "cpu", "--threads", "1", "--no-progress", "--steps", "2", "--batch", "1",
                            *map(str, args), "--out", str(out)])


def one_line(capsys, message):
    err = capsys.readouterr().err
    assert err.startswith("ort_sample.py: error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err


def with_fixed_batch(src, dst, batch):
    """The export with every batch dimension of its inputs and outputs fixed to `batch`."""
    proto = onnx.load(str(src))
    for value in list(proto.graph.input) + list(proto.graph.output):
        if value.name != "coef":
            value.type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(proto, str(dst))
    return dst


def test_a_fixed_batch_graph_runs_only_its_batch(calibrated, tmp_path, capsys):
    path = with_fixed_batch(calibrated["eps"], tmp_path / "fixed.onnx", 2)
    assert ort_run(["--onnx", path, "--batch", "3"], tmp_path / "a") == 2
    one_line(capsys, "is a graph for batch 2 only; run it with --batch 2, not 3")
    assert main(["sample", "--backend", "onnx", "--onnx", str(path), "--steps", "2", "--batch", "3", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "b")]) == 2
    assert "is a graph for batch 2 only" in capsys.readouterr().err
    assert ort_run(["--onnx", path, "--batch", "2"], tmp_path / "c") == 0
    assert _files_under(tmp_path) == sorted([path] + [tmp_path / "c" / n for n in ("grid.png", "samples.npz",
                                                                                  "stats.json")])


@pytest.mark.parametrize("value", ["100000000000", "1025", "-1", "two"])
def test_threads_are_bounded(tmp_path, capsys, value):
    assert ort_run(["--onnx", tmp_path / "absent.onnx", "--threads", value], tmp_path / "out") == 2
    one_line(capsys, f"argument --threads: expected a thread count in 0..1024, got '{value}'")


def test_an_interrupt_while_numpy_imports_is_one_line(tmp_path):
    """SIGINT in the first moments (numpy's import, stubbed to take the signal): one line, exit 130."""
    stubs = tmp_path / "stubs" / "numpy"
    stubs.mkdir(parents=True)
    (stubs / "__init__.py").write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)\n")
    script = tmp_path / "ort_sample.py"
    script.write_bytes(Path(ort_sample.__file__).read_bytes())  # the file alone, as on a host
    proc = subprocess.run([sys.executable, str(script), "--onnx", "m.onnx"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(stubs.parent)}, cwd=tmp_path, timeout=60)
    assert proc.returncode == 130 and proc.stderr == "ort_sample.py: interrupted\n", proc.stderr


def npz_bytes(array, edit=None) -> bytes:
    """An .npz of arr_0 = array, its .npy member's bytes passed through edit (the zip's CRC stays right)."""
    npy = io.BytesIO()
    np.save(npy, array)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("arr_0.npy", npy.getvalue() if edit is None else edit(npy.getvalue()))
    return buf.getvalue()


ZEROS = np.zeros((1, 3, 8, 8), np.float32)
X_T_FILES = {  # name -> (bytes of the --x-T file, what the line says); the run wants float [1, 3, 8, 8]
    "garbage": (b"not a zip file at all\n", "is not a readable .npz with arr_0 (BadZipFile"),
    "truncated": (npz_bytes(ZEROS)[:150], "is not a readable .npz with arr_0"),
    "bad_crc": (npz_bytes(ZEROS).replace(b"\x00" * 64, b"\x01" * 64, 1), "(BadZipFile: Bad CRC-32"),
    "bad_header": (npz_bytes(ZEROS, lambda b: b.replace(b"'descr'", b"'dxscr'")),
                   "is not a readable .npz with arr_0 (ValueError"),
    "huge_shape": (npz_bytes(ZEROS, lambda b: b.replace(b"(1, 3, 8, 8)", b"(9**9, 9, 9)")),
                   "is not a readable .npz with arr_0 (ValueError"),
    "other_shape": (npz_bytes(ZEROS, lambda b: b.replace(b"(1, 3, 8, 8)", b"(99999999, 9)")),
                    "holds float32 [99999999, 9]; this run starts from float [1, 3, 8, 8]"),
    "short_data": (npz_bytes(ZEROS, lambda b: b[:-8]), "is not a readable .npz with arr_0 (ValueError"),
    "no_arr_0": (None, "is not a readable .npz with arr_0 (KeyError"),
    "integers": (npz_bytes(np.zeros((1, 3, 8, 8), np.int64)), "holds int64 [1, 3, 8, 8]"),
    "nan": (npz_bytes(np.full((1, 3, 8, 8), np.nan)), "holds NaN or infinite values"),
}


@pytest.mark.parametrize("name", list(X_T_FILES))
def test_a_corrupt_x_T_npz_is_one_line(calibrated, tmp_path, capsys, name):
    data, message = X_T_FILES[name]
    path = tmp_path / "x_T.npz"
    if data is None:
        np.savez(path, other=np.zeros((1, 3, 8, 8), np.float32))
    else:
        path.write_bytes(data)
    assert ort_run(["--onnx", calibrated["eps"], "--x-T", path], tmp_path / "out") == 2
    one_line(capsys, message)
    assert not (tmp_path / "out").exists()


def test_hostile_paths_are_one_line(calibrated, tmp_path, capsys):
    """A corrupt ONNX header, a path component over 255 bytes (as --onnx and in --out), a symlink loop as --out."""
    data = bytearray(calibrated["eps"].read_bytes())
    data[:16] = b"\xff" * 16
    (tmp_path / "header.onnx").write_bytes(bytes(data))
    assert ort_run(["--onnx", tmp_path / "header.onnx"], tmp_path / "a") == 2
    one_line(capsys, "is not a readable ONNX model")
    assert ort_run(["--onnx", tmp_path / ("m" * 300 + ".onnx")], tmp_path / "b") == 2
    one_line(capsys, "does not exist or is not a file")
    assert ort_run(["--onnx", calibrated["eps"]], tmp_path / "new" / ("o" * 300)) == 2
    one_line(capsys, "cannot write to output folder")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert ort_run(["--onnx", calibrated["eps"]], tmp_path / "loop") == 2
    one_line(capsys, "exists and is not a folder (a file, a broken link or a symlink loop)")
    assert ort_run(["--onnx", calibrated["eps"]], tmp_path / "loop" / "below") == 2
    one_line(capsys, "cannot write to output folder")
    assert _files_under(tmp_path) == [tmp_path / "header.onnx"] and not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------ all-or-nothing outputs
OUTPUTS = ("grid.png", "samples.npz", "stats.json")


def previous_set(folder):
    """An earlier run's three files in `folder`; returns their contents."""
    folder.mkdir(exist_ok=True)
    for name in OUTPUTS:
        (folder / name).write_bytes(f"previous {name}".encode())
    return {name: (folder / name).read_bytes() for name in OUTPUTS}


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_stats_json_a_folder_publishes_nothing(calibrated, tmp_path, capsys):
    out = tmp_path / "out"
    before = previous_set(out)
    (out / "stats.json").unlink()
    (out / "stats.json").mkdir()
    assert ort_run(["--onnx", calibrated["eps"]], out) == 2
    one_line(capsys, "stats.json': a folder is in the way; nothing was published")
    assert {p.name for p in out.iterdir()} == set(OUTPUTS) and (out / "stats.json").is_dir()
    assert all((out / n).read_bytes() == before[n] for n in ("grid.png", "samples.npz"))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_a_full_disk_publishes_nothing(calibrated, tmp_path, capsys, monkeypatch, code):
    """The second file's write fails: no file is published, the previous set stays, no temporary is left,
    and a folder the run created is removed again."""
    real, calls = ort_sample._FS.write_all, []

    def write_all(fd, data):
        calls.append(len(data))
        if len(calls) == 3:  # (the first write is the probe of --out)
            raise OSError(code, os.strerror(code))
        real(fd, data)

    monkeypatch.setattr(ort_sample._FS, "write_all", staticmethod(write_all))
    out = tmp_path / "kept"
    before = previous_set(out)
    assert ort_run(["--onnx", calibrated["eps"]], out) == 2
    one_line(capsys, f"out of space writing {str(out / 'grid.png')!r} ({os.strerror(code)}); nothing was published")
    assert contents(out) == before
    calls.clear()
    assert ort_run(["--onnx", calibrated["eps"]], tmp_path / "new" / "out") == 2
    one_line(capsys, "out of space writing")
    assert not (tmp_path / "new").exists()


def test_a_failed_rename_puts_the_previous_set_back(calibrated, tmp_path, capsys, monkeypatch):
    real, calls = ort_sample._FS.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 4:  # samples.npz -> backup, new samples.npz, grid.png -> backup, then this one fails
            raise OSError(errno.EIO, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(ort_sample._FS, "rename", staticmethod(rename))
    out = tmp_path / "out"
    before = previous_set(out)
    assert ort_run(["--onnx", calibrated["eps"]], out) == 2
    one_line(capsys, "grid.png' (Input/output error)")
    assert contents(out) == before


def test_planted_symlinks_are_not_followed(calibrated, tmp_path, monkeypatch):
    """A symlink at a temporary name the script will try, and one at an output name: neither target changes."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "out"
    out.mkdir()
    names = iter(["planted", "free", "planted"])  # the probe's first name, its second, samples.npz's first
    monkeypatch.setattr(ort_sample._FS, "token", staticmethod(lambda: next(names, os.urandom(6).hex())))
    planted = [f"{ort_sample.TMP_PREFIX}probe.planted", f"{ort_sample.TMP_PREFIX}samples.npz.planted"]
    for name in planted + ["samples.npz"]:
        (out / name).symlink_to(victim)
    assert ort_run(["--onnx", calibrated["eps"]], out) == 0
    assert victim.read_bytes() == b"precious"
    assert not (out / "samples.npz").is_symlink() and np.load(out / "samples.npz")["arr_0"].shape == (1, 8, 8, 3)
    assert sorted(p.name for p in out.iterdir()) == sorted(planted + list(OUTPUTS))
