"""`--threads` (fastddpm/threads.py): auto from the idle cores, explicit counts, bad values refused."""
import json
import os

import pytest
import torch

from fastddpm import threads
from fastddpm.cli import main


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("load, local, want", [(0.0, "1", 4), (1.4, "1", 3), (7.0, "1", 1), (0.0, "2", 2)])
def test_auto_counts_the_idle_cores(monkeypatch, load, local, want):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    assert threads.auto_threads() == want


def test_explicit_threads_are_set_and_recorded(tmp_path):
    out = tmp_path / "o"
    assert main(["sample", "--model", "tiny", "--steps", "1", "--batch", "1", "--threads", "1", "--no-progress",
                 "--backend", "reference", "--out", str(out)]) == 0
    assert torch.get_num_threads() == 1
    assert json.loads((out / "stats.json").read_text())["threads"] == 1


@pytest.mark.parametrize("value", ["0", "-2", "1025", "many", "100000000000"])
def test_bad_thread_counts_are_one_line(tmp_path, capsys, value):
    assert main(["sample", "--model", "tiny", "--threads", value, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--threads takes 'auto' or an integer from 1 to 1024" in err
