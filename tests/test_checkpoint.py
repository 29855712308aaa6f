"""Checkpoints: safetensors + JSON round trip, atomic writes, clear errors for broken or foreign files."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from fastddpm import GaussianDiffusion, load_checkpoint, make_betas, save_checkpoint
from fastddpm.checkpoint import read_checkpoint
from fastddpm.errors import CheckpointError, FastDDPMError
from helpers import randomized_unet


@pytest.fixture
def saved(tmp_path):
    model = randomized_unet("tiny", learn_sigma=True)
    diffusion = GaussianDiffusion(make_betas("cosine", 50), var_type="learned_range", loss_type="hybrid")
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, model, diffusion, step=123, note="hello",
                    extra_tensors={"train.ema_shadow": torch.ones(3)})
    return path, model, diffusion


def test_round_trip(saved):
    path, model, diffusion = saved
    loaded, d2, meta = load_checkpoint(path)
    assert loaded.config == model.config and not loaded.training
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    torch.testing.assert_close(d2.schedule.betas, diffusion.schedule.betas, rtol=0, atol=0)
    assert (d2.mean_type, d2.var_type, d2.loss_type, d2.num_timesteps) == ("eps", "learned_range", "hybrid", 50)
    assert meta == {"step": 123, "note": "hello"}
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 40])
    torch.testing.assert_close(loaded(x, t), model(x, t), rtol=0, atol=0)


def test_no_temporary_files_are_left(saved):
    path = saved[0]
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_training_state_is_kept_but_not_loaded_into_the_model(saved):
    tensors, config = read_checkpoint(saved[0])
    assert torch.equal(tensors["train.ema_shadow"], torch.ones(3))
    assert config["unet"]["learn_sigma"] is True


def test_extra_tensors_must_be_namespaced(tmp_path):
    with pytest.raises(ValueError, match="train"):
        save_checkpoint(tmp_path / "x.safetensors", randomized_unet(), GaussianDiffusion(make_betas("linear", 50)),
                        extra_tensors={"ema": torch.ones(1)})


def test_respaced_process_is_not_saved(tmp_path):
    d = GaussianDiffusion(make_betas("linear", 100)).respace("10")
    with pytest.raises(FastDDPMError, match="respaced"):
        save_checkpoint(tmp_path / "x.safetensors", randomized_unet(), d)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_file(saved, tmp_path):
    data = saved[0].read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(bad)


def test_foreign_safetensors(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a fastddpm checkpoint.*fastddpm convert"):
        load_checkpoint(path)


def test_pickle_is_refused_not_executed(tmp_path):
    import pickle

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_mismatched_weights_name_the_keys(saved, tmp_path):
    tensors, config = read_checkpoint(saved[0])
    tensors.pop("conv_in.bias")
    tensors["conv_out.weight"] = torch.zeros(6, 32, 3, 1)
    tensors["extra.weight"] = torch.zeros(1)
    meta = {"format": "fastddpm", "version": "1", "config": json.dumps(config)}
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=r"missing keys: conv_in.bias.*unexpected keys: extra.weight.*"
                                              r"shape mismatches: conv_out.weight \(6, 32, 3, 1\) vs \(6, 32, 3, 3\)"):
        load_checkpoint(path)


def test_bundled_name_without_the_asset(monkeypatch, tmp_path):
    import fastddpm.checkpoint as ck

    monkeypatch.setattr(ck, "bundled_path", lambda name: tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="bundled 'digits' checkpoint is not installed"):
        load_checkpoint("digits")


def test_the_only_temporary_file_is_ours_and_it_is_complete(tmp_path, monkeypatch):
    """safetensors' save_file writes through its own `.tmpXXXX`, which a kill leaves behind; we serialise in
    memory and write one temporary of ours (recognisable, so the next run removes a leftover)."""
    from fastddpm import files

    seen = []
    real = files._rename

    def spy(tmp, path):
        seen.append((sorted(p.name for p in tmp_path.iterdir()), os.path.getsize(tmp)))
        real(tmp, path)
    monkeypatch.setattr(files, "_rename", spy)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, randomized_unet("tiny"), GaussianDiffusion(make_betas("linear", 25)), step=1)
    [(names, size)] = seen
    assert len(names) == 1 and names[0].startswith(files.TMP_PREFIX + "m.safetensors.")
    assert size == path.stat().st_size
    load_checkpoint(path)
