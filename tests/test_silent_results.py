"""No silent wrong results, and the last tracebacks are one line (issue 21, items 5 and 6).

The attacks: betas of 1e-300 (alphabar exactly 1: every backend returned all-zero images, exit 0);
16-bit PNGs (flattened to 0/255 by Pillow's convert); a PNG whose header claims 30000 x 30000
pixels; a torchrun environment that is wrong (RANK=1 WORLD_SIZE=1 wrote and printed nothing,
exit 0); one byte 0xff in log.jsonl; --lr 1e300; a damaged .npy header; an .npz that inflates
past the free memory; digits-fid's out-of-memory line naming a flag it does not have.
"""
from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fastddpm import GaussianDiffusion, load_checkpoint, make_betas, save_checkpoint
from fastddpm.checkpoint import read_checkpoint
from fastddpm.cli import main
from fastddpm.data import load_dataset
from fastddpm.errors import CheckpointError, DataError, FastDDPMError
from fastddpm.evaluate import ImageSet
from fastddpm.schedule import check_betas
from fastddpm.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = UNetConfig(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(4,), dropout=0.0, num_groups=4)


def one_line(capsys, *pieces):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastddpm: error: ") and "Traceback" not in err, err
    for piece in pieces:
        assert piece in err, (piece, err)


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "images.npz"
    np.savez(path, arr_0=np.random.default_rng(2).integers(0, 256, size=(8, 8, 8, 1), dtype=np.uint8))
    return path


def _train(npz, out, *extra):
    return ["train", "--data", f"npz:{npz}", "--model", "tiny", "--out", str(out), "--steps", "2", "--batch", "4",
            "--diffusion-steps", "25", "--log-every", "1", "--device", "cpu", "--no-progress", *extra]


# ------------------------------------------------------------------------------ betas
@pytest.mark.parametrize("betas", [[1e-300] * 10, [1e-17] * 4, [1e-300] + [0.02] * 5])
def test_betas_too_small_for_float64_are_refused(betas):
    b = torch.tensor(betas, dtype=torch.float64)
    with pytest.raises(FastDDPMError, match="adds no noise float64 can represent at t=0"):
        check_betas(b)
    with pytest.raises(FastDDPMError):
        GaussianDiffusion(b)


def test_a_checkpoint_with_betas_of_1e_300_is_refused_not_sampled_to_zeros(tmp_path, capsys):
    good = tmp_path / "good.safetensors"
    torch.manual_seed(0)
    save_checkpoint(good, UNet(SMALL), GaussianDiffusion(make_betas("linear", 30)))
    tensors, config = read_checkpoint(good)
    import json

    bad = tmp_path / "bad.safetensors"
    save_file({**tensors, "diffusion.betas": torch.full((30,), 1e-300, dtype=torch.float64)}, str(bad),
              metadata={"format": "fastddpm", "version": "1", "config": json.dumps(config)})
    with pytest.raises(CheckpointError, match="adds no noise"):
        load_checkpoint(bad)
    assert main(["sample", "--checkpoint", str(bad), "--steps", "1", "--batch", "1", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "o")]) == 2
    one_line(capsys, "adds no noise")
    assert not (tmp_path / "o").exists()


def test_a_respaced_process_whose_beta_becomes_0_is_refused():
    # betas past t = 4 too small to change alphabar in float64: two kept steps share one alphabar,
    # and the respaced beta between them, 1 - alphabar_t / alphabar_s, is exactly 0
    betas = torch.cat([torch.full((5,), 0.02, dtype=torch.float64), torch.full((20,), 1e-300, dtype=torch.float64)])
    diffusion = GaussianDiffusion(betas)  # the full process still adds noise at every step
    with pytest.raises(FastDDPMError, match=r"in \(0, 1\)"):
        diffusion.respace("10")


# ------------------------------------------------------------------------------ images
def _sixteen_bit(folder, values) -> np.ndarray:
    folder.mkdir()
    for i in range(2):
        Image.fromarray(values.astype(np.uint16)).save(folder / f"{i}.png")
    assert Image.open(folder / "0.png").mode.startswith("I")
    return ((values.astype(np.int64) + 128) // 257).astype(np.uint8)  # value / 257, rounded


def test_16_bit_pngs_are_scaled_to_8_bits_not_clipped(tmp_path):
    values = np.arange(64, dtype=np.int64).reshape(8, 8) * 1040  # 0 .. 65520
    expected = _sixteen_bit(tmp_path / "png16", values)
    assert len(np.unique(expected)) > 60
    data = load_dataset(f"images:{tmp_path / 'png16'}", image_size=8)  # train --data images:DIR
    assert np.array_equal(data.images[0, ..., 0], expected)
    batch = next(ImageSet(tmp_path / "png16").batches(2))  # eval fid / eval digits-fid
    assert np.array_equal(batch[0, ..., 0], expected) and np.array_equal(batch[0, ..., 2], expected)


def _bomb(path) -> None:
    """A PNG whose header claims 30000 x 30000 pixels: a few dozen bytes on disk."""
    def chunk(kind, data):
        import zlib

        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
                     + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_one_line_everywhere(npz, tmp_path, capsys):
    folder = tmp_path / "bomb"
    folder.mkdir()
    _bomb(folder / "big.png")
    with pytest.raises(DataError, match="decompression bomb"):
        list(ImageSet(folder).batches(4))  # eval fid reads its images this way
    assert main(["eval", "digits-fid", str(folder)]) == 2
    one_line(capsys, "decompression bomb", "big.png")
    assert main(_train(npz, tmp_path / "r", "--data", f"images:{folder}")) == 2
    one_line(capsys, "decompression bomb")


# ------------------------------------------------------------------------------ distributed environment
@pytest.mark.parametrize("env, piece", [({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1 is outside a job of WORLD_SIZE=1"),
                                        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer"),
                                        ({"RANK": "one"}, "RANK='one' is not an integer"),
                                        ({"WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT is not set"),
                                        ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' must be at least 0")])
def test_a_wrong_distributed_environment_is_one_line(npz, tmp_path, monkeypatch, capsys, env, piece):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["sample", "--checkpoint", "digits", "--steps", "1", "--batch", "1", "--device", "cpu",
                 "--no-progress", "--out", str(tmp_path / "s")]) == 2
    one_line(capsys, piece)
    assert main(_train(npz, tmp_path / "t")) == 2
    one_line(capsys, piece)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ the last tracebacks
def test_a_0xff_byte_in_the_log_is_reported_by_curves_and_never_blocks_a_resume(npz, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train(npz, out)) == 0
    log = out / "log.jsonl"
    log.write_bytes(log.read_bytes().replace(b'"loss"', b'"lo\xffss"', 1))
    capsys.readouterr()
    assert main(["eval", "curves", str(out), "--out", str(tmp_path / "c.json")]) == 2
    one_line(capsys, "line 1 is not UTF-8 text", "0xff")
    assert main(_train(npz, out, "--resume", "--steps", "3")) == 0  # the log is not the state: the line is dropped
    assert b"\xff" not in log.read_bytes()
    assert main(["eval", "curves", str(out), "--out", str(tmp_path / "c.json")]) == 0


def test_an_absurd_learning_rate_is_one_line(npz, tmp_path, capsys):
    assert main(_train(npz, tmp_path / "r", "--lr", "1e300")) == 2
    one_line(capsys, "learning rate", "1e+300")
    assert not (tmp_path / "r").exists()


def _damaged_header_npz(path) -> None:
    """An .npz whose array header breaks off mid-dict: numpy's parser raised tokenize.TokenError."""
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (2, 8, 8, 1), "
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("arr_0.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(128))
    path.write_bytes(buf.getvalue())


def test_a_damaged_npy_header_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    _damaged_header_npz(bad)
    assert main(_train(bad, tmp_path / "r")) == 2
    one_line(capsys, "damaged .npy header")
    assert main(["eval", "digits-fid", str(bad)]) == 2
    one_line(capsys, "cannot read", "bad.npz")


def test_an_npz_that_inflates_past_free_memory_is_refused(tmp_path, monkeypatch, capsys):
    from fastddpm import memory

    big = tmp_path / "zeros.npz"
    np.savez_compressed(big, arr_0=np.zeros((64, 256, 256, 1), np.uint8))  # 4 MiB of images in ~5 KiB
    assert big.stat().st_size < 64 * 1024
    monkeypatch.setattr(memory, "available_memory", lambda device: 2**20)  # a host with 1 MiB free
    assert main(_train(big, tmp_path / "r")) == 2
    one_line(capsys, "out of memory", "GiB once decompressed", "smaller data set")
    assert not (tmp_path / "r").exists()


def test_digits_fid_out_of_memory_names_no_flag_it_lacks(npz, monkeypatch, capsys):
    from fastddpm import digits_fid

    def no_memory(images):
        raise MemoryError()
    monkeypatch.setattr(digits_fid, "digits_fid", no_memory)
    assert main(["eval", "digits-fid", str(npz)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of memory" in err and "--batch" not in err, err
    assert "the number of sample images" in err
