"""Nothing outside the output is ever written, and no input is destroyed (issue 21, items 1, 2, 6).

The attacks are the fixtures: at every name a command writes, a symbolic link to a file elsewhere
(the victim), a hard link to it, or a FIFO is planted first; an output is named the same as an
input; paths are too long, loop, or name system folders. Whatever the command answers (exit 0 with
the link replaced by our own file, or exit 2 with one line), the victim keeps its bytes and its
mtime, and nothing appears outside the test's folder. Hypothesis generates paths (lengths, links,
existing files at the output names) for the same properties.

Commands run in-process (fastddpm.cli.main) on a checkpoint of a few thousand parameters with
T = 30, so a sample or a bits/dim evaluation takes milliseconds.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from fastddpm import GaussianDiffusion, make_betas, save_checkpoint
from fastddpm import paths as fpaths
from fastddpm.cli import main
from fastddpm.errors import OutputError
from fastddpm.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = UNetConfig(image_size=8, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(4,), dropout=0.0, num_groups=4)
KINDS = ["symlink", "hardlink", "fifo"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "small.safetensors"
    torch.manual_seed(0)
    save_checkpoint(path, UNet(SMALL), GaussianDiffusion(make_betas("linear", 30)))
    return path


@pytest.fixture(scope="module")
def grey_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "grey.npz"
    np.savez(path, arr_0=np.random.default_rng(5).integers(0, 256, size=(8, 8, 8, 1), dtype=np.uint8))
    return path


class Victim:
    """A file outside the output folder, and the folder holding it, whose bytes and mtime must not change."""

    def __init__(self, folder: Path):
        folder.mkdir(exist_ok=True)
        self.folder = folder
        self.path = folder / "victim.txt"
        self.path.write_bytes(b"precious data\n")
        os.utime(self.path, ns=(10**18, 10**18))
        self.before = self._state()

    def _state(self):
        st = os.stat(self.path)
        return self.path.read_bytes(), st.st_mtime_ns, sorted(p.name for p in self.folder.iterdir())

    def assert_untouched(self):
        assert self._state() == self.before


@pytest.fixture
def victim(tmp_path):
    return Victim(tmp_path / "elsewhere")


def plant(path: Path, kind: str, victim: Victim) -> None:
    if kind == "symlink":
        os.symlink(victim.path, path)
    elif kind == "hardlink":
        os.link(victim.path, path)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "devnull":
        os.symlink("/dev/null", path)
    else:
        raise ValueError(kind)


def one_line(capsys, *pieces) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastddpm: error: ") and "Traceback" not in err, err
    for piece in pieces:
        assert piece in lines[0], (piece, err)
    return lines[0]


def is_own_file(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISREG(st.st_mode) and st.st_nlink in (1, 2)  # 2: last.safetensors is a link of ckpt-N


def sample_argv(ckpt, out, *extra):
    return ["sample", "--checkpoint", str(ckpt), "--steps", "1", "--batch", "2", "--device", "cpu", "--no-progress",
            "--out", str(out), *extra]


def train_argv(npz, out, *extra):
    return ["train", "--data", f"npz:{npz}", "--model", "tiny", "--out", str(out), "--steps", "1", "--batch", "4",
            "--diffusion-steps", "25", "--save-every", "1", "--log-every", "1", "--device", "cpu", "--no-progress",
            *extra]


def bpd_argv(ckpt, out, *extra):
    return ["eval", "bpd", "--checkpoint", str(ckpt), "--data", "digits", "--limit", "1", "--batch", "1",
            "--device", "cpu", "--no-progress", "--out", str(out), *extra]


# ---------------------------------------------------------------------- 1. planted names: replaced, never followed
@pytest.mark.parametrize("kind", KINDS)
def test_sample_replaces_planted_outputs_without_following_them(ckpt, tmp_path, victim, kind, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("samples.npz", "grid.png", "stats.json"):
        plant(out / name, kind, victim)
    assert main(sample_argv(ckpt, out)) == 0
    victim.assert_untouched()
    for name in ("samples.npz", "grid.png", "stats.json"):
        assert is_own_file(out / name) and os.stat(out / name).st_nlink == 1, name
    assert np.load(out / "samples.npz")["arr_0"].shape == (2, 8, 8, 1)
    json.loads((out / "stats.json").read_text())


@pytest.mark.parametrize("kind", KINDS + ["devnull"])
def test_a_planted_lock_file_is_refused(ckpt, tmp_path, victim, kind, capsys):
    """The reported attack: `ln -s ~/victim.txt out/.fastddpm.lock` made `sample` write its PID into it."""
    out = tmp_path / "out"
    out.mkdir()
    plant(out / ".fastddpm.lock", kind, victim)
    assert main(sample_argv(ckpt, out)) == 2
    one_line(capsys, "refusing to write", ".fastddpm.lock")
    victim.assert_untouched()
    assert sorted(p.name for p in out.iterdir()) == [".fastddpm.lock"]


@pytest.mark.parametrize("kind", KINDS)
def test_train_never_writes_through_a_planted_name(grey_npz, tmp_path, victim, kind, capsys):
    # written in place: the lock file and the log are refused
    for name in (".fastddpm.lock", "log.jsonl"):
        out = tmp_path / f"in-place-{name}"
        out.mkdir()
        plant(out / name, kind, victim)
        assert main(train_argv(grey_npz, out)) == 2
        one_line(capsys, "refusing to write", name)
        victim.assert_untouched()
        assert not (out / "last.safetensors").exists()
    # replaced by a rename: a checkpoint name is replaced by our own file
    out = tmp_path / "replaced"
    out.mkdir()
    plant(out / "ckpt-1.safetensors", kind, victim)
    assert main(train_argv(grey_npz, out)) == 0
    capsys.readouterr()
    victim.assert_untouched()
    assert is_own_file(out / "ckpt-1.safetensors") and is_own_file(out / "last.safetensors")
    # a planted last.safetensors is taken for an existing run: refused, untouched
    out = tmp_path / "last"
    out.mkdir()
    plant(out / "last.safetensors", kind, victim)
    assert main(train_argv(grey_npz, out)) == 2
    one_line(capsys)
    victim.assert_untouched()


def test_train_refuses_a_samples_folder_that_leads_elsewhere(grey_npz, tmp_path, victim, capsys):
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(victim.folder, out / "samples")
    assert main(train_argv(grey_npz, out, "--sample-every", "1", "--sample-steps", "2")) == 2
    one_line(capsys, "refusing to write sample grids", "symbolic link")
    victim.assert_untouched()
    assert not (out / "last.safetensors").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_eval_bpd_never_writes_through_a_planted_name(ckpt, tmp_path, victim, kind, capsys):
    out = tmp_path / "e"
    out.mkdir()
    plant(out / ".bpd.json.fastddpm.lock", kind, victim)
    assert main(bpd_argv(ckpt, out / "bpd.json")) == 2
    one_line(capsys, "refusing to write", ".bpd.json.fastddpm.lock")
    victim.assert_untouched()
    (out / ".bpd.json.fastddpm.lock").unlink()
    plant(out / "bpd.json", kind, victim)
    code = main(bpd_argv(ckpt, out / "bpd.json"))
    victim.assert_untouched()
    if kind == "fifo":  # not a file to replace: refused before the work
        assert code == 2
        one_line(capsys, "not a regular file")
    else:
        assert code == 0
        assert is_own_file(out / "bpd.json") and "bpd" in json.loads((out / "bpd.json").read_text())


def test_export_and_curves_never_write_through_a_planted_name(ckpt, tmp_path, victim, capsys):
    pytest.importorskip("onnx")
    out = tmp_path / "x"
    out.mkdir()
    for kind in KINDS:
        plant(out / ".m.onnx.fastddpm.lock", kind, victim)
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(out / "m.onnx")]) == 2
        one_line(capsys, "refusing to write")
        (out / ".m.onnx.fastddpm.lock").unlink()
    plant(out / "m.onnx", "symlink", victim)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(out / "m.onnx")]) == 0
    capsys.readouterr()
    assert is_own_file(out / "m.onnx")
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n')
    for kind in KINDS:
        plant(out / ".curves.json.fastddpm.lock", kind, victim)
        assert main(["eval", "curves", str(run), "--out", str(out / "curves.json")]) == 2
        one_line(capsys, "refusing to write")
        (out / ".curves.json.fastddpm.lock").unlink()
    for kind in KINDS:  # digits-fid: refused at its lock, before its classifier is fitted
        plant(out / ".fid.json.fastddpm.lock", kind, victim)
        assert main(["eval", "digits-fid", str(run), "--json", str(out / "fid.json")]) == 2
        one_line(capsys, "refusing to write")
        (out / ".fid.json.fastddpm.lock").unlink()
    plant(out / "curves.json", "hardlink", victim)
    assert main(["eval", "curves", str(run), "--out", str(out / "curves.json")]) == 0
    assert is_own_file(out / "curves.json") and os.stat(out / "curves.json").st_nlink == 1
    victim.assert_untouched()


# ---------------------------------------------------------------------- 2. an output that is an input
def test_no_command_overwrites_its_input(ckpt, grey_npz, tmp_path, capsys):
    import shutil

    c = tmp_path / "c.safetensors"
    shutil.copy(ckpt, c)
    data = tmp_path / "d.npz"
    shutil.copy(grey_npz, data)
    s = tmp_path / "s"
    s.mkdir()
    np.savez(s / "samples.npz", arr_0=np.zeros((4, 8, 8, 1), np.uint8))
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    sample_folder = tmp_path / "p"
    sample_folder.mkdir()
    shutil.copy(ckpt, sample_folder / "stats.json")  # a checkpoint under the name of an output
    link = tmp_path / "link.onnx"
    os.symlink(c, link)
    inputs = [c, data, s / "samples.npz", run / "log.jsonl", sample_folder / "stats.json"]
    before = {p: p.read_bytes() for p in inputs}
    cases = [
        (["export", "--checkpoint", str(c), "--out", str(c)], "--checkpoint"),
        (["export", "--checkpoint", str(c), "--out", str(link)], "--checkpoint"),  # a link to the input
        (bpd_argv(c, c), "--checkpoint"),
        (["eval", "bpd", "--checkpoint", str(ckpt), "--data", f"npz:{data}", "--out", str(data)], "--data"),
        (["eval", "rate-distortion", "--checkpoint", str(c), "--data", "digits", "--out", str(c)], "--checkpoint"),
        (["eval", "bpd", "--checkpoint", str(ckpt), "--data", f"npz:{data}", "--per-timestep", "--out",
          str(tmp_path / "t.json"), "--plot", str(data)], "--data"),
        (["eval", "digits-fid", str(s / "samples.npz"), "--json", str(s / "samples.npz")], "SAMPLES"),
        (["eval", "digits-fid", str(s), "--json", str(s / "samples.npz")], "SAMPLES"),
        (["eval", "fid", str(s / "samples.npz"), "--json", str(s / "samples.npz")], "SAMPLES"),
        (["eval", "curves", str(run), "--out", str(run / "log.jsonl")], "RUN"),
        (sample_argv(sample_folder / "stats.json", sample_folder), "--checkpoint"),
        (train_argv(run / "log.jsonl", run), "--data"),
    ]
    for argv, flag in cases:
        assert main(argv) == 2, argv
        one_line(capsys, "is the same file as", flag)
    assert {p: p.read_bytes() for p in inputs} == before


# ---------------------------------------------------------------------- 6. paths the kernel cannot take
def test_paths_too_long_or_looping_are_one_line(ckpt, grey_npz, tmp_path, capsys):
    long_name = tmp_path / ("x" * 300)
    deep = tmp_path.joinpath(*["d" * 200] * 21)  # over 4096 bytes
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    cases = [
        (sample_argv(ckpt, long_name), "255 bytes"),
        (sample_argv(ckpt, deep), "4095 bytes"),
        (sample_argv(ckpt, loop), "symbolic link loop"),
        (["sample", "--checkpoint", str(long_name), "--steps", "1", "--out", str(tmp_path / "o")], "255 bytes"),
        (train_argv(long_name, tmp_path / "r"), "255 bytes"),
        (train_argv(grey_npz, loop), "symbolic link loop"),
        (bpd_argv(ckpt, long_name), "255 bytes"),
        (bpd_argv(ckpt, deep / "bpd.json"), "4095 bytes"),
        (["eval", "curves", str(long_name), "--out", str(tmp_path / "c.json")], "255 bytes"),
    ]
    for argv, piece in cases:
        assert main(argv) == 2, argv
        one_line(capsys, piece)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop"]


# ---------------------------------------------------------------------- 5. system folders
@pytest.mark.parametrize("path", ["/", "/etc", "/usr", "/usr/bin", "/usr/local", "/root", "/var", "/lib", "/boot",
                                  "/proc/1", "/dev/shm", "/sys/kernel"])
def test_system_folders_are_never_output_folders(path):
    with pytest.raises(OutputError, match="system folder|home folder"):
        fpaths.check_output_dir(path)


@pytest.mark.parametrize("path", ["/etc/fastddpm-test.json", "/fastddpm-test.json", "/usr/bin/x.onnx",
                                  "/etc/fastddpm-test/new/bpd.json", "/proc/x.json"])
def test_outputs_directly_inside_system_folders_are_refused(path):
    with pytest.raises(OutputError, match="system folder"):
        fpaths.check_output_file(path)
    with pytest.raises(OutputError, match="system folder"):
        fpaths.check_output_dir(path)  # a new output folder there is refused too


def test_home_folder_is_not_an_output_folder_but_may_hold_outputs(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(OutputError, match="home folder"):
        fpaths.check_output_dir(home)
    assert fpaths.check_output_dir(home / "samples") == home / "samples"
    assert fpaths.check_output_file(home / "bpd.json") == home / "bpd.json"
    assert fpaths.check_output_dir("/tmp") == Path("/tmp")  # a top-level folder that exists is no system folder


def test_sample_refuses_system_folders_on_the_command_line(ckpt, capsys):
    made = [Path("/etc/fastddpm-test-out"), Path("/fastddpm-test-out")]
    try:
        for out in ["/etc", "/", "/usr/bin", "/root", *map(str, made)]:
            assert main(sample_argv(ckpt, out)) == 2, out
            one_line(capsys, "folder")
            assert not Path(out, "samples.npz").exists()
    finally:
        for folder in made:
            if folder.exists():  # only if the check failed: do not leave litter in system folders
                for p in folder.iterdir():
                    p.unlink()
                folder.rmdir()
    assert not any(p.exists() for p in made)


# ---------------------------------------------------------------------- 7. properties over paths
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
components = st.one_of(st.text(alphabet="ab-_.~ é", min_size=1, max_size=6).filter(lambda c: c not in (".", "..")),
                       st.integers(250, 260).map(lambda n: "n" * n))
ENTRIES = [None, "file", "folder", "symlink", "hardlink", "fifo", "loop", "dangling"]


def _make(path: Path, entry: str, victim: Victim) -> None:
    if entry == "file":
        path.write_bytes(b"old")
    elif entry == "folder":
        path.mkdir()
    elif entry == "loop":
        os.symlink(path, path)
    elif entry == "dangling":
        os.symlink(victim.folder / "missing", path)
    else:
        plant(path, entry, victim)


@SETTINGS
@given(parts=st.lists(components, min_size=1, max_size=3) | st.just(["d" * 200] * 21),
       entry=st.sampled_from(ENTRIES), at=st.sampled_from(["", "samples.npz", "stats.json", ".fastddpm.lock"]),
       command=st.sampled_from(["sample", "curves"]))
def test_any_output_path_is_written_inside_or_refused_in_one_line(ckpt, tmp_path_factory, capsys, parts, entry, at,
                                                                    command):
    root = tmp_path_factory.mktemp("p")
    victim = Victim(root / "elsewhere")
    run = root / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    target = root.joinpath(*parts)
    if entry is not None:
        where = target / at if at else target
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
            _make(where, entry, victim)
        except OSError:
            assume(False)  # a name the file system cannot hold: nothing to plant
    argv = sample_argv(ckpt, target) if command == "sample" else ["eval", "curves", str(run), "--out", str(target)]
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    victim.assert_untouched()
    assert "Traceback" not in err
    if code == 0:
        written = target / "samples.npz" if command == "sample" else target
        assert is_own_file(written)
        assert os.path.realpath(written).startswith(str(root) + "/")
    else:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("fastddpm: error: "), (code, err)
