"""Hostile ONNX files: metadata that lies about the graph or holds bad values gets one line and exit 2
from both `fastddpm sample --backend onnx` and the torch-free `ort_sample.py`, and no samples."""
from __future__ import annotations

import json

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
                            "metadata promises a step graph with inputs ['coef', 't', 'x', 'z']"),
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
