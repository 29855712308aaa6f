"""SIGINT and SIGTERM stop a run within seconds with one line and exit 130 / 143 (issue 21, item 4).

The reported failures: `train --sample-every 1 --sample-steps 1000` ran on for minutes after a
SIGTERM (it finished drawing its sample grid first), and a Ctrl-C while `import torch` ran (the
first second of every command, --help included) printed a KeyboardInterrupt traceback.

Here: a real `fastddpm train` process (tiny preset, digits) gets SIGTERM while it draws a
1000-step sample grid; it abandons the grid, writes a checkpoint of the step it finished, exits 143
with one line, and `--resume` then ends bit-exact with an uninterrupted run. A command gets SIGINT
while torch is being imported (a stand-in import that waits, so the signal lands there every time).
In-process: SIGINT in the middle of a training step and of sampling.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fastddpm import generate
from fastddpm.cli import main
from fastddpm.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _meta(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["config"])["meta"]


def _assert_same_state(a, b):
    ta, tb = load_file(str(a)), load_file(str(b))
    assert sorted(ta) == sorted(tb)
    assert not [k for k in ta if not torch.equal(ta[k], tb[k])]
    for key in ("step", "data_position", "skipped_steps"):
        assert _meta(a)[key] == _meta(b)[key], key


def _train_argv(out, *extra):
    return ["train", "--data", "digits", "--model", "tiny", "--out", str(out), "--batch", "4", "--diffusion-steps",
            "1000", "--lr", "1e-3", "--warmup", "2", "--ema", "0.9", "--save-every", "100", "--log-every", "1",
            "--device", "cpu", "--no-progress", *extra]


def _log_steps(path) -> list[int]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def test_sigterm_during_a_sample_grid_stops_at_once_and_resumes_exactly(tmp_path):
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fastddpm", *_train_argv(killed, "--steps", "6", "--sample-every",
                                                                            "2", "--sample-steps", "1000")],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while 2 not in _log_steps(killed / "log.jsonl"):  # step 2 is logged, then its 1000-step grid starts
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the training process never reached step 2"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        err = proc.communicate(timeout=120)[1]
        waited = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fastddpm: interrupted by SIGTERM at step 3"), err
    assert "--resume" in lines[0] and "Traceback" not in err
    # the grid was abandoned (not drawn to its end) and the step after it carried the stop to a checkpoint
    assert not (killed / "samples" / "step-0000002.png").exists()
    assert _meta(killed / "last.safetensors")["step"] == 3
    assert waited < 60, f"took {waited:.0f} s to stop"
    # continue the saved configuration (lr, warm-up, EMA...: not given again) to the same total
    assert main(["train", "--out", str(killed), "--resume", "--steps", "6", "--sample-every", "0", "--no-progress"]) == 0
    assert main(_train_argv(tmp_path / "straight", "--steps", "6")) == 0
    _assert_same_state(tmp_path / "straight" / "last.safetensors", killed / "last.safetensors")


_SLOW_TORCH = textwrap.dedent("""
    import sys, time
    class SlowTorch:  # stands in for the 1-2 s `import torch` takes, so the signal lands inside it
        def find_spec(self, name, path=None, target=None):
            if name == "torch":
                print("importing torch", flush=True)
                time.sleep(60)
            return None
    sys.meta_path.insert(0, SlowTorch())
    from fastddpm.cli import main  # what the `fastddpm` console script runs: must not import torch
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("argv", [["--help"], ["sample", "--steps", "1"]])
def test_sigint_while_torch_is_imported_is_one_line(argv):
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_TORCH, *argv], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "importing torch", proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert err == "fastddpm: interrupted by SIGINT\n", err


def test_sigint_in_a_training_step_saves_that_step_and_exits_130(tmp_path, monkeypatch, capsys):
    real_run = Trainer.run

    def run(self):
        original = self.loss_fn

        def interrupted_in_step_2(*args):
            if self.step == 2:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
            return original(*args)
        self.loss_fn = interrupted_in_step_2
        return real_run(self)
    monkeypatch.setattr(Trainer, "run", run)
    out = tmp_path / "run"
    assert main(_train_argv(out, "--steps", "6", "--diffusion-steps", "25")) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastddpm: interrupted by SIGINT at step 3"), err
    assert _meta(out / "last.safetensors")["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # main put the handlers back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_while_sampling_exits_with_one_line_and_no_outputs(tmp_path, monkeypatch, capsys, signum, code):
    real = generate.sample

    def sample(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return real(*args, **kwargs)
    monkeypatch.setattr(generate, "sample", sample)
    out = tmp_path / "s"
    assert main(["sample", "--checkpoint", "digits", "--steps", "2", "--batch", "2", "--device", "cpu", "--no-progress",
                 "--out", str(out)]) == code
    err = capsys.readouterr().err
    assert err == f"fastddpm: interrupted by {signal.Signals(signum).name}\n", err
    assert not out.exists()  # the folder this run made is gone again
