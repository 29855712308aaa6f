"""Hostile checkpoints: every bad config, betas or weight tensor is one CheckpointError naming the file
and the field (exit 2 and one line from the CLI), checked before anything is built or allocated."""
import json

import pytest
import torch
from safetensors.torch import save_file

from fastddpm import GaussianDiffusion, load_checkpoint, make_betas, save_checkpoint
from fastddpm.checkpoint import read_checkpoint
from fastddpm.cli import main
from fastddpm.errors import CheckpointError
from fastddpm.unet import UNet, UNetConfig
from fastddpm.validate import MAX_PARAMETERS, unet_config

# A few thousand parameters: every file here is written and read in milliseconds.
SMALL = UNetConfig(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(4,), dropout=0.0, num_groups=4)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(tensors, config) of a valid small checkpoint, to be mutated by each case."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "ok.safetensors"
    save_checkpoint(path, UNet(SMALL), GaussianDiffusion(make_betas("linear", 50)), step=1)
    return read_checkpoint(path)


def write(path, tensors, config, **metadata):
    meta = {"format": "fastddpm", "version": "1", "config": json.dumps(config) if not isinstance(config, str)
            else config, **metadata}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def unet(**changes):
    return lambda t, c: c["unet"].update(changes)


def diffusion(**changes):
    return lambda t, c: c["diffusion"].update(changes)


def tensor(name, value):
    return lambda t, c: t.__setitem__(name, value)


def _nan_weight(t, c):
    t["conv_in.weight"] = t["conv_in.weight"].clone()
    t["conv_in.weight"][0, 0, 0, 0] = float("nan")


CASES = {
    # U-Net config: zero / non-dividing groups, negative and absurd widths, wrong types, unknown fields
    "groups_zero": (unet(num_groups=0), "num_groups=0 is out of range"),
    "groups_not_dividing": (unet(num_groups=3), "do not split into 3 groups"),
    "negative_channels": (unet(model_channels=-8), "model_channels=-8 is out of range"),
    "absurd_channels": (unet(model_channels=8192, channel_mult=[1, 1, 1, 1]), "parameters"),
    "absurd_width": (unet(channel_mult=[1, 100000]), "channel_mult holds 100000"),
    "string_size": (unet(image_size="8"), "image_size must be an integer, not str"),
    "float_size": (unet(image_size=8.0), "image_size must be an integer, not float"),
    "bool_channels": (unet(in_channels=True), "in_channels must be an integer, not bool"),
    "negative_size": (unet(image_size=-8), "image_size=-8 is out of range"),
    "huge_size": (unet(image_size=2**20), "image_size=1048576 is out of range"),
    "nan_dropout": (unet(dropout=float("nan")), "dropout must be a finite number"),
    "string_mult": (unet(channel_mult="12"), "channel_mult must be a list"),
    "empty_mult": (unet(channel_mult=[]), "channel_mult must be a list"),
    "sigma_string": (unet(learn_sigma="yes"), "learn_sigma must be true or false"),
    "zero_eps": (unet(norm_eps=0), r"norm_eps=0.0 is not in \(0, 1\]"),
    "unknown_unet_field": (unet(heads=4), r"unknown U-Net config fields \['heads'\]"),
    "unet_not_object": (lambda t, c: c.update(unet=[8, 1]), "the 'unet' config must be a JSON object"),
    "no_unet": (lambda t, c: c.pop("unet"), "no 'unet' section"),
    # diffusion settings
    "unknown_diffusion_key": (diffusion(schedule="linear"), r"unknown diffusion config keys \['schedule'\]"),
    "unknown_var_type": (diffusion(var_type="huge"), "var_type='huge' is not one of"),
    "unknown_mean_type": (diffusion(mean_type="v"), "mean_type='v' is not one of"),
    "unknown_loss_type": (diffusion(loss_type=3), "loss_type=3 is not one of"),
    "string_T": (diffusion(num_timesteps="50"), "num_timesteps='50' but the file holds 50 betas"),
    "wrong_T": (diffusion(num_timesteps=49), "num_timesteps=49 but the file holds 50 betas"),
    "diffusion_not_object": (lambda t, c: c.update(diffusion="eps"), "'diffusion' config must be a JSON object"),
    "meta_not_object": (lambda t, c: c.update(meta=[1]), "'meta' config must be a JSON object"),
    # betas
    "betas_0d": (tensor("diffusion.betas", torch.tensor(0.1, dtype=torch.float64)), "must be 1-D"),
    "betas_all_ones": (tensor("diffusion.betas", torch.ones(50, dtype=torch.float64)), r"beta\[0\] = 1.0"),
    "betas_nan": (tensor("diffusion.betas", torch.full((50,), float("nan"), dtype=torch.float64)), "finite"),
    "betas_above_one": (tensor("diffusion.betas", torch.full((50,), 1.5, dtype=torch.float64)), "in \\(0, 1\\)"),
    "betas_zero": (tensor("diffusion.betas", torch.zeros(50, dtype=torch.float64)), "in \\(0, 1\\)"),
    "betas_int": (tensor("diffusion.betas", torch.ones(50, dtype=torch.int64)), "floating-point tensor"),
    "betas_missing": (lambda t, c: t.pop("diffusion.betas"), "no 'diffusion.betas'"),
    # weights
    "nan_weight": (_nan_weight, "non-finite weights \\(conv_in.weight\\)"),
    "int_weight": (tensor("conv_in.bias", torch.zeros(8, dtype=torch.int64)), "non-floating-point weights"),
    "bool_weight": (tensor("conv_in.bias", torch.zeros(8, dtype=torch.bool)), "non-floating-point weights"),
    "wrong_rank": (tensor("conv_in.weight", torch.zeros(8, 9)), r"conv_in.weight \(8, 9\) vs \(8, 1, 3, 3\)"),
    "extra_tensor": (tensor("junk", torch.zeros(1)), "unexpected keys: junk"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_checkpoint_is_one_checkpoint_error(parts, tmp_path, case):
    mutate, message = CASES[case]
    tensors, config = dict(parts[0]), json.loads(json.dumps(parts[1]))
    mutate(tensors, config)
    path = write(tmp_path / "bad.safetensors", tensors, config)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert "bad.safetensors" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("config, message", [
    ("[1, 2]", "the config must be a JSON object"),
    ("3", "the config must be a JSON object"),
    ("{", "corrupt config"),
    ("[" * 100000, "corrupt config"),  # deep nesting: RecursionError inside json
])
def test_config_that_is_not_an_object(parts, tmp_path, config, message):
    path = write(tmp_path / "bad.safetensors", parts[0], config)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_absurd_config_is_refused_without_allocating():
    # 8192 channels at 4 levels: ~40 billion parameters (150 GiB); counted on the meta device, so the
    # process's peak resident memory (ru_maxrss, KiB on Linux) grows by far less than 1 GiB
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=f"at most {MAX_PARAMETERS:,}"):
        unet_config({**SMALL.to_dict(), "model_channels": 8192, "channel_mult": [1, 1, 1, 1]}, "'x'")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < (1 << 20)


def test_valid_config_round_trips():
    assert unet_config(SMALL.to_dict(), "'x'") == SMALL
    assert unet_config({}, "'x'") == UNetConfig()  # missing fields take the defaults


def test_loaded_model_is_float32_and_matches(parts, tmp_path):
    tensors, config = parts
    half = {k: (v.half() if not k.startswith("diffusion.") else v) for k, v in tensors.items()}
    model, d, meta = load_checkpoint(write(tmp_path / "half.safetensors", half, config))
    assert all(p.dtype == torch.float32 for p in model.parameters()) and meta == {"step": 1}
    assert torch.equal(model.conv_in.weight, tensors["conv_in.weight"].half().float())


@pytest.mark.parametrize("case", ["groups_zero", "nan_weight", "betas_all_ones", "unknown_diffusion_key"])
def test_cli_answers_one_line_and_exit_2(parts, tmp_path, capsys, case):
    mutate, message = CASES[case]
    tensors, config = dict(parts[0]), json.loads(json.dumps(parts[1]))
    mutate(tensors, config)
    path = write(tmp_path / "bad.safetensors", tensors, config)
    code = main(["sample", "--checkpoint", str(path), "--steps", "1", "--batch", "1", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "out")])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("fastddpm: error: ") and "bad.safetensors" in err
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["bad.safetensors"]


def test_read_checkpoint_checks_the_unet_config_too(parts, tmp_path):
    """read_checkpoint is what a resumed training run reads: a zero group count must not reach UNetConfig."""
    tensors, config = parts
    path = write(tmp_path / "bad.safetensors", tensors, {**config, "unet": {**config["unet"], "num_groups": 0}})
    with pytest.raises(CheckpointError, match="num_groups=0 is out of range"):
        read_checkpoint(path)


def test_fifo_checkpoint_is_refused_without_blocking(tmp_path, capsys):
    import os

    os.mkfifo(tmp_path / "pipe.safetensors")
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(tmp_path / "pipe.safetensors")
