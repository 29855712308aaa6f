"""A full disk: one line and exit 2, outputs published together or not at all, training keeps
its last good checkpoint, no temporary file left.

Two ways to fill a disk: a real, tiny tmpfs (when the tests run as root and `mount` works; in
many containers it does not, and those tests skip), and a stand-in that makes the flush of
selected temporary files fail with ENOSPC, as a file system with delayed allocation reports
it (fastddpm.files._fsync_path: every output goes through it). The stand-in always runs.
"""
from __future__ import annotations

import errno
import os
import subprocess

import numpy as np
import pytest
from safetensors import safe_open

from fastddpm import GaussianDiffusion, make_betas, save_checkpoint
from fastddpm import files
from fastddpm.cli import main
from fastddpm.errors import OutOfSpaceError, OutputError
from helpers import randomized_unet

pytestmark = pytest.mark.usefixtures("one_thread")


def _one_line(capsys, *pieces):
    err = capsys.readouterr().err
    # (a sample from random weights says so when it starts, before any write can fail)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("fastddpm: no checkpoint given")]
    assert len(lines) == 1 and lines[0].startswith("fastddpm: error: "), err
    assert "Traceback" not in err
    for piece in pieces:
        assert piece in lines[0], (piece, err)


def _snapshot(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _no_temporaries(folder):
    left = [p.name for p in folder.rglob("*") if p.name.startswith((files.TMP_PREFIX, ".tmp")) or
            p.name.endswith((".tmp", ".lock"))]
    assert not left, left


@pytest.fixture
def full_on(monkeypatch):
    """full_on("grid.png"): from now on, flushing a temporary file for that target name fails with ENOSPC."""
    real = files._fsync_path

    def arm(*names):
        def fsync(path):
            if any(os.path.basename(path).startswith(files.TMP_PREFIX + n + ".") for n in names):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            real(path)
        monkeypatch.setattr(files, "_fsync_path", fsync)
    return arm


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(bytes) -> a folder on a fresh tmpfs of that size (skips where mount is refused)."""
    mounted = []

    def make(size: int):
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        mnt = tmp_path / f"disk{len(mounted)}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
        mounted.append(mnt)
        return mnt
    yield make
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(folder, leave: int) -> None:
    """Fill folder's file system up to `leave` free bytes."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def _sample(out, batch, seed=0):
    return main(["sample", "--model", "tiny", "--steps", "2", "--batch", str(batch), "--seed", str(seed),
                 "--no-progress", "--out", str(out)])


# ------------------------------------------------------------------------------------ sample
def test_sample_out_of_space_keeps_the_previous_set_stand_in(tmp_path, full_on, capsys):
    out = tmp_path / "s"
    assert _sample(out, 3) == 0
    before = _snapshot(out)
    capsys.readouterr()
    full_on("grid.png")  # samples.npz was written in full first: it must not be published alone
    assert _sample(out, 5, seed=1) == 2
    _one_line(capsys, "out of space", "grid.png", "nothing was published")
    assert _snapshot(out) == before
    _no_temporaries(out)


def test_sample_on_a_full_tmpfs(small_disk, capsys):
    disk = small_disk(512 * 1024)
    out = disk / "s"
    assert _sample(out, 2) == 0
    before = _snapshot(out)
    capsys.readouterr()
    _fill(disk, leave=24 * 1024)
    assert _sample(out, 64, seed=1) == 2  # samples.npz alone is 49 KiB
    _one_line(capsys, "out of space")
    assert _snapshot(out) == before
    _no_temporaries(out)
    (disk / "filler").unlink()
    assert _sample(out, 64, seed=1) == 0  # space again: the new set replaces the old one whole
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 64


def test_a_fresh_sample_folder_is_not_left_behind(tmp_path, full_on, capsys):
    full_on("samples.npz")
    assert _sample(tmp_path / "new", 2) == 2
    _one_line(capsys, "out of space")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------ train
@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "images.npz"
    np.savez(path, arr_0=np.random.default_rng(3).integers(0, 256, size=(16, 8, 8, 3), dtype=np.uint8))
    return path


def _train(npz, out, steps, *extra):
    return main(["train", "--no-progress", "--data", f"npz:{npz}", "--model", "tiny", "--out", str(out), "--steps",
                 str(steps), "--batch", "4", "--diffusion-steps", "25", "--save-every", "2", "--log-every", "1",
                 "--warmup", "2", *extra])


def _step(path) -> int:
    import json

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["config"])["meta"]["step"]


def test_training_out_of_space_keeps_the_last_good_checkpoint_stand_in(npz, tmp_path, full_on, capsys):
    out = tmp_path / "run"
    assert _train(npz, out, 2) == 0
    last = (out / "last.safetensors").read_bytes()
    capsys.readouterr()
    full_on("ckpt-4.safetensors")
    assert _train(npz, out, 6, "--resume") == 2
    _one_line(capsys, "out of space", "ckpt-4.safetensors", "is at step 2")
    assert (out / "last.safetensors").read_bytes() == last and _step(out / "last.safetensors") == 2
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-2.safetensors"]
    _no_temporaries(out)


def test_training_on_a_full_tmpfs(npz, tmp_path, small_disk, capsys):
    assert _train(npz, tmp_path / "probe", 2) == 0  # how big one checkpoint of this run is
    size = (tmp_path / "probe" / "last.safetensors").stat().st_size
    capsys.readouterr()
    disk = small_disk(int(size * 1.5) + 64 * 1024)  # room for one checkpoint (last is a hard link), not two
    out = disk / "run"
    assert _train(npz, out, 2) == 0
    last = (out / "last.safetensors").read_bytes()
    capsys.readouterr()
    assert _train(npz, out, 6, "--resume") == 2
    _one_line(capsys, "out of space", "is at step 2")
    assert (out / "last.safetensors").read_bytes() == last
    _no_temporaries(out)
    subprocess.run(["mount", "-o", f"remount,size={4 * size + 64 * 1024}", str(disk)], check=True)
    assert _train(npz, out, 6, "--resume") == 0  # more space: the run goes on from its last good checkpoint
    assert _step(out / "last.safetensors") == 6


# ------------------------------------------------------------------------------------ the shared writer
def test_save_checkpoint_out_of_space_leaves_the_old_file(tmp_path, full_on):
    path = tmp_path / "m.safetensors"
    model, diffusion = randomized_unet("tiny"), GaussianDiffusion(make_betas("linear", 25))
    save_checkpoint(path, model, diffusion, step=1)
    before = path.read_bytes()
    full_on("m.safetensors")
    with pytest.raises(OutOfSpaceError, match="no space left"):
        save_checkpoint(path, model, diffusion, step=2)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.parametrize("error, kind, text", [
    (OSError(errno.ENOSPC, "No space left on device"), OutOfSpaceError, "no space left"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), OutOfSpaceError, "quota"),
    (OSError(errno.EFBIG, "File too large"), OutOfSpaceError, "too large"),
    (Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on "
               "device\" })"), OutOfSpaceError, "no space left"),  # safetensors' SafetensorError, as convert saw it
    (OSError(errno.EROFS, "Read-only file system"), OutputError, "Read-only"),
])
def test_write_errors_are_typed_at_one_place(tmp_path, error, kind, text):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise error
    with pytest.raises(kind, match=text) as info:
        files.atomic_write(tmp_path / "out.bin", write)
    assert type(info.value) is kind
    assert list(tmp_path.iterdir()) == []


def test_other_errors_are_not_disguised(tmp_path):
    def write(tmp):
        raise KeyError("a bug")
    with pytest.raises(KeyError):
        files.atomic_write(tmp_path / "out.bin", write)
    assert list(tmp_path.iterdir()) == []


def test_publish_together_is_all_or_nothing(tmp_path, full_on):
    files.publish_together(tmp_path, {"a.bin": b"old a", "b.bin": b"old b", "stats.json": b"old"}, last="stats.json")
    full_on("b.bin")
    with pytest.raises(OutOfSpaceError):
        files.publish_together(tmp_path, {"a.bin": b"new a", "b.bin": b"new b", "stats.json": b"new"},
                               last="stats.json")
    assert _snapshot(tmp_path) == {"a.bin": b"old a", "b.bin": b"old b", "stats.json": b"old"}


def test_publish_together_spans_subfolders_all_or_nothing(tmp_path, full_on):
    """A set in subfolders (a diffusers pipeline's layout): an existing set stays as it was, and a new
    one leaves no folder behind, not even the ones above it that the call had to create."""
    def pipeline(tag: bytes) -> dict:
        return {"unet/w.bin": b"w" + tag, "unet/config.json": b"c" + tag, "scheduler/s.json": b"s" + tag,
                "model_index.json": b"i" + tag}

    files.publish_together(tmp_path / "old", pipeline(b"1"), last="model_index.json")
    before = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    full_on("s.json")
    with pytest.raises(OutOfSpaceError):
        files.publish_together(tmp_path / "old", pipeline(b"2"), last="model_index.json")
    with pytest.raises(OutOfSpaceError):
        files.publish_together(tmp_path / "new" / "pipe", pipeline(b"2"), last="model_index.json")
    assert {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    _no_temporaries(tmp_path)
    with pytest.raises(ValueError):
        files.publish_together(tmp_path, {"../escape.bin": b"x"})


def test_convert_out_of_space_is_one_line(tmp_path, full_on, capsys):
    src = tmp_path / "m.safetensors"
    save_checkpoint(src, randomized_unet("tiny"), GaussianDiffusion(make_betas("linear", 25)))
    full_on("diffusion_pytorch_model.safetensors")
    assert main(["convert", str(src), "--out", str(tmp_path / "diffusers")]) == 2
    _one_line(capsys, "out of space")
    _no_temporaries(tmp_path)


def test_a_read_only_file_system_is_one_line(small_disk, capsys):
    disk = small_disk(64 * 1024)
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    assert _sample(disk / "s", 2) == 2
    _one_line(capsys, "Read-only file system")
    assert main(["eval", "bpd", "--checkpoint", "digits", "--data", "digits", "--out", str(disk / "b.json")]) == 2
    _one_line(capsys, "Read-only file system")
