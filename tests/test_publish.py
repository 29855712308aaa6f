"""A failed run leaves the previous outputs exactly as they were, and a run taking a folder never
deletes a live writer's temporary file (issue 21, item 3).

The attacks: a folder where an output file should go; a rename that fails part-way through a
publish (injected into fastddpm.files._rename); a writer that is still writing (a thread holding
its temporary's flock, as a `convert` or `export` of another process would) while `sample` or
`train` sweeps the folder for leftovers.
"""
from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest

from fastddpm import files
from fastddpm.cli import main
from fastddpm.errors import OutputError
from fastddpm.run_folder import RunFolder, output_file_lock

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(folder) -> dict:
    """Every entry of `folder`: bytes of files, "<folder>" for folders (what must survive a failure)."""
    return {p.name: (p.read_bytes() if p.is_file() else "<folder>") for p in sorted(folder.iterdir())}


def no_temporaries(folder):
    left = [p.name for p in folder.iterdir() if p.name.startswith(files.TMP_PREFIX) or p.name.endswith(".lock")]
    assert not left, left


def sample(out, seed, batch=2):
    return main(["sample", "--checkpoint", "digits", "--steps", "1", "--batch", str(batch), "--seed", str(seed),
                 "--device", "cpu", "--no-progress", "--out", str(out)])


def test_a_folder_in_the_way_is_found_before_any_rename(tmp_path, capsys):
    """The reported case: grid.png a folder; samples.npz was already replaced and stats.json deleted."""
    out = tmp_path / "p"
    assert sample(out, seed=0) == 0
    (out / "grid.png").unlink()
    (out / "grid.png").mkdir()
    before = snapshot(out)
    capsys.readouterr()
    assert sample(out, seed=1, batch=3) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "grid.png" in err and "a folder is in the way" in err, err
    assert snapshot(out) == before
    no_temporaries(out)


@pytest.fixture
def fail_rename(monkeypatch):
    """fail_rename(k): the k-th rename from now on (1-based) fails with EIO, as a dying disk would."""
    real = files._rename

    def arm(k):
        calls = []

        def rename(tmp, path):
            calls.append(os.path.basename(str(path)))
            if len(calls) == k:
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
            real(tmp, path)
        monkeypatch.setattr(files, "_rename", rename)
        return calls
    return arm


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_publish_failing_part_way_puts_back_what_was_there(tmp_path, fail_rename, k):
    old = {"a.bin": b"old a", "b.bin": b"old b", "stats.json": b"old stats"}
    files.publish_together(tmp_path, old, last="stats.json")
    (tmp_path / "notes.txt").write_text("the user's")
    before = snapshot(tmp_path)
    calls = fail_rename(k)
    with pytest.raises(OutputError, match="Input/output error"):
        files.publish_together(tmp_path, {"a.bin": b"new a", "b.bin": b"new b", "stats.json": b"new stats"},
                               last="stats.json")
    assert calls[-1] == ["a.bin", "b.bin", "stats.json"][k - 1]
    assert snapshot(tmp_path) == before
    no_temporaries(tmp_path)


def test_a_failed_first_publish_leaves_no_file(tmp_path, fail_rename):
    fail_rename(3)
    with pytest.raises(OutputError):
        files.publish_together(tmp_path, {"a.bin": b"a", "b.bin": b"b", "stats.json": b"{}"}, last="stats.json")
    assert list(tmp_path.iterdir()) == []


def test_sample_failing_on_its_last_rename_keeps_the_previous_set(tmp_path, fail_rename, capsys):
    out = tmp_path / "s"
    assert sample(out, seed=0) == 0
    before = snapshot(out)
    capsys.readouterr()
    fail_rename(3)  # samples.npz and grid.png are in place, stats.json fails
    assert sample(out, seed=1, batch=3) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert snapshot(out) == before
    no_temporaries(out)


class PausedWriter:
    """A thread in the middle of files.atomic_write (its temporary written, flocked, not yet renamed),
    like a `convert` or an `export` of another process writing into the folder."""

    def __init__(self, path):
        self.path, self.ready, self.go, self.error = path, threading.Event(), threading.Event(), None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert self.ready.wait(30)

    def _run(self):
        def write(tmp):
            with files.open_output(tmp) as f:
                f.write(b"a whole file, written slowly")
            self.ready.set()
            self.go.wait(60)
        try:
            files.atomic_write(self.path, write)
        except BaseException as e:  # noqa: BLE001 (reported by finish)
            self.error = e

    def temporaries(self):
        return [p for p in self.path.parent.iterdir() if p.name.startswith(files.TMP_PREFIX + self.path.name)]

    def finish(self):
        self.go.set()
        self.thread.join(30)
        assert self.error is None, self.error


def test_the_leftover_sweep_spares_a_live_writer(tmp_path, capsys):
    """The reported race: starting `sample` in a folder deleted a running convert's temporary file."""
    out = tmp_path / "shared"
    out.mkdir()
    writer = PausedWriter(out / "model.safetensors")
    try:
        [live] = writer.temporaries()
        (out / f"{files.TMP_PREFIX}grid.png.dead01").write_bytes(b"a killed run's leftover")
        assert sample(out, seed=0) == 0  # takes the folder: sweeps it
        assert live.exists(), "the sweep deleted a live writer's temporary"
        assert not (out / f"{files.TMP_PREFIX}grid.png.dead01").exists()  # no writer: removed
        with RunFolder(out):  # and a second sweep, with the lock held, while the writer still writes
            assert live.exists()
    finally:
        writer.finish()
    assert (out / "model.safetensors").read_bytes() == b"a whole file, written slowly"
    no_temporaries(out)


def test_export_takes_its_output_files_lock(tmp_path, capsys):
    pytest.importorskip("onnx")
    target = tmp_path / "m.onnx"
    with output_file_lock(target):  # another export of the same file, running
        # (the same process: a second flock on a new open of the lock file conflicts like another process's)
        assert main(["export", "--checkpoint", "digits", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "in use" in err, err
    assert not target.exists()


def test_samples_written_by_a_failed_run_are_not_kept(tmp_path, fail_rename, capsys):
    """A fresh folder: nothing published, and the folder the run created is removed again."""
    fail_rename(2)
    assert sample(tmp_path / "new", seed=0) == 2
    capsys.readouterr()
    assert not (tmp_path / "new").exists()
    assert np.all([not p.name.startswith(files.TMP_PREFIX) for p in tmp_path.iterdir()])
