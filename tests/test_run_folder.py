"""The output-folder lock (fastddpm.run_folder): one run per folder, no stale lock after SIGKILL,
our stale temporaries removed, and no empty folder left by a failed command.

A second process really holds the lock here (a child python), since flock is per process; the
fastddpm commands under test run in-process through cli.main.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fastddpm.cli import main
from fastddpm.errors import FolderBusyError, OutputError
from fastddpm.run_folder import LOCK_NAME, RunFolder, output_file_lock

pytestmark = pytest.mark.usefixtures("one_thread")

_HOLDER = textwrap.dedent("""
    import sys, time
    from fastddpm.run_folder import RunFolder, output_file_lock
    lock = output_file_lock(sys.argv[2]) if sys.argv[1] == "file" else RunFolder(sys.argv[2])
    lock.__enter__()
    print("locked", flush=True)
    time.sleep(600)
""")


class Holder:
    """A child process holding the lock of a folder (kind "folder") or of an output file ("file")."""

    def __init__(self, path, kind="folder"):
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLDER, kind, str(path)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        line = self.proc.stdout.readline()
        assert line.strip() == "locked", self.proc.stderr.read()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def holder():
    made = []

    def start(path, kind="folder"):
        made.append(Holder(path, kind))
        return made[-1]
    yield start
    for h in made:
        if h.proc.poll() is None:
            h.kill()


def _one_line(capsys, *pieces):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastddpm: error: "), err
    for piece in pieces:
        assert piece in lines[0], (piece, err)
    return lines[0]


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "images.npz"
    np.savez(path, arr_0=np.random.default_rng(3).integers(0, 256, size=(16, 8, 8, 3), dtype=np.uint8))
    return path


def _train_argv(npz, out, *extra):
    return ["train", "--no-progress", "--data", f"npz:{npz}", "--model", "tiny", "--out", str(out), "--steps", "2",
            "--batch", "4", "--diffusion-steps", "25", "--save-every", "2", "--log-every", "1", *extra]


def test_second_run_on_a_locked_folder_exits_2_naming_it(tmp_path, holder, npz, capsys):
    out = tmp_path / "run"
    h = holder(out)
    sample = ["sample", "--model", "tiny", "--steps", "2", "--batch", "2", "--no-progress", "--out", str(out)]
    assert main(sample) == 2
    line = _one_line(capsys, str(out), "in use by another fastddpm run", f"pid {h.proc.pid}")
    assert "Traceback" not in line
    assert main(_train_argv(npz, out)) == 2
    _one_line(capsys, str(out), "in use")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written beside the holder's lock

    h.kill()  # the kernel drops a dead process's lock: no stale lock, though the file stays
    assert (out / LOCK_NAME).exists()
    assert main(sample) == 0
    capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "samples.npz", "stats.json"]


def test_two_real_train_processes_on_one_folder(tmp_path, npz):
    """The reported bug: two `fastddpm train` on one --out both exited 0 and mixed their runs."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "-m", "fastddpm", *_train_argv(npz, out, "--steps", "100000",
                                                                            "--save-every", "100000")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "training tiny" in first.stdout.readline()  # printed with the lock held
        second = subprocess.run([sys.executable, "-m", "fastddpm", *_train_argv(npz, out, "--seed", "5")], env=env,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and str(out) in second.stderr and "in use" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
        first.stdout.close()
        first.stderr.close()
    assert not (out / "last.safetensors").exists()  # the second run wrote nothing


def test_eval_output_file_is_locked(tmp_path, holder, capsys):
    target = tmp_path / "bpd.json"
    holder(target, kind="file")
    assert main(["eval", "bpd", "--checkpoint", "digits", "--data", "digits", "--limit", "1", "--no-progress",
                 "--device", "cpu", "--out", str(target)]) == 2
    _one_line(capsys, str(tmp_path), "in use")
    assert not target.exists()


def test_leftover_temporaries_of_ours_are_removed_when_the_lock_is_taken(tmp_path):
    (tmp_path / ".fastddpm-tmp.ckpt-8.safetensors.abc123").write_bytes(b"x" * 100)
    (tmp_path / ".last.safetensors.k2j3.tmp").write_bytes(b"x")  # an earlier version's temporary name
    (tmp_path / ".tmpXYZ").write_bytes(b"not ours")
    (tmp_path / "notes.txt").write_text("keep")
    with RunFolder(tmp_path) as folder:
        assert (folder.path / LOCK_NAME).exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME, ".tmpXYZ", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmpXYZ", "notes.txt"]  # the lock file is gone too


def test_a_failed_run_removes_the_folders_it_created_only(tmp_path):
    new = tmp_path / "a" / "b" / "c"
    with pytest.raises(RuntimeError):
        with RunFolder(new):
            assert new.is_dir()
            raise RuntimeError("the run failed")
    assert not (tmp_path / "a").exists()
    existing = tmp_path / "kept"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        with RunFolder(existing):
            raise RuntimeError("the run failed")
    assert existing.is_dir() and not any(existing.iterdir())
    with pytest.raises(RuntimeError):  # not empty at the end: kept, with what it holds
        with RunFolder(tmp_path / "made") as f:
            (f.path / "log.jsonl").write_text("{}\n")
            raise RuntimeError("the run failed")
    assert (tmp_path / "made" / "log.jsonl").exists()


def test_one_process_cannot_take_a_folder_twice(tmp_path):
    with RunFolder(tmp_path):
        with pytest.raises(FolderBusyError, match="in use"):
            with RunFolder(tmp_path):
                pass
    with RunFolder(tmp_path):  # released: free again
        pass
    with output_file_lock(tmp_path / "x.json"), output_file_lock(tmp_path / "y.json"):
        pass  # two output files in one folder do not block each other


def test_failed_commands_leave_no_empty_out_folder(tmp_path, npz, capsys):
    out = tmp_path / "new" / "run"
    assert main(["sample", "--model", "tiny", "--steps", "5000", "--no-progress", "--out", str(out)]) == 2
    _one_line(capsys, "--steps")
    assert main(_train_argv(npz, out, "--batch", "17")) == 2  # larger than the 16 images
    _one_line(capsys, "larger than the 16 images")
    assert main(_train_argv(tmp_path / "missing.npz", out)) == 2
    _one_line(capsys, "does not exist")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("out, piece", [("", "--out is empty"), ("/proc/fastddpm-test", "system folder"),
                                        ("/dev/fastddpm-test", "system folder")])
def test_impossible_out_folders(out, piece, capsys, npz):
    assert main(["sample", "--model", "tiny", "--steps", "2", "--batch", "2", "--no-progress", "--out", out]) == 2
    _one_line(capsys, piece)
    assert main(_train_argv(npz, out)) == 2
    _one_line(capsys, piece)
    assert not os.path.exists("/dev/fastddpm-test")


def test_out_that_is_a_file(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["sample", "--model", "tiny", "--steps", "2", "--batch", "2", "--no-progress", "--out",
                 str(blocker)]) == 2
    _one_line(capsys, "is not a folder")
    with pytest.raises(OutputError, match="not a folder"):
        RunFolder(blocker)
    assert blocker.read_text() == "x"


def test_export_and_convert_check_their_out_first(tmp_path, capsys):
    (tmp_path / "a-folder").mkdir()
    for argv, piece in [(["export", "--checkpoint", "digits", "--out", str(tmp_path / "a-folder")], "is a folder"),
                        (["export", "--checkpoint", "digits", "--out", ""], "--out is empty"),
                        (["export", "--checkpoint", "digits", "--out", "/proc/x.onnx"], "system folder"),
                        (["convert", "digits", "--out", ""], "--out is empty")]:
        assert main(argv) == 2
        _one_line(capsys, piece)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-folder"]


def test_a_file_lock_removes_only_that_files_leftovers(tmp_path):
    """eval writing run/bpd.json must not delete a live training run's temporary checkpoint in run/."""
    mine = tmp_path / ".fastddpm-tmp.bpd.json.x1"
    theirs = tmp_path / ".fastddpm-tmp.ckpt-8.safetensors.y2"
    mine.write_text("{")
    theirs.write_bytes(b"half a checkpoint")
    with output_file_lock(tmp_path / "bpd.json"):
        assert not mine.exists() and theirs.exists()


def test_a_folder_lock_spares_the_temporaries_of_a_locked_output_file(tmp_path, holder):
    holder(tmp_path / "fid.json", kind="file")  # an evaluation writing into the folder
    (tmp_path / ".fastddpm-tmp.fid.json.k3j4").write_text("{")
    (tmp_path / ".fastddpm-tmp.grid.png.a1b2").write_bytes(b"stale")
    with RunFolder(tmp_path):
        assert sorted(p.name for p in tmp_path.glob(".fastddpm-tmp.*")) == [".fastddpm-tmp.fid.json.k3j4"]


def test_torchrun_ranks_all_stop_when_rank_0_is_refused(tmp_path, holder):
    """Only rank 0 locks; when it is refused the other ranks must stop too, not wait for it forever."""
    out = tmp_path / "run"
    holder(out)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(29500 + (os.getpid() + 7) % 1000), "-m", "fastddpm", "sample", "--model", "tiny",
                           "--steps", "2", "--batch", "4", "--device", "cpu", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("fastddpm: error:")]
    assert len(errors) == 2, proc.stderr  # one line from each rank
    assert any("in use by another fastddpm run" in ln for ln in errors)
    assert any("rank 0 could not take the output folder" in ln for ln in errors)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
