"""`fastddpm eval curves` (fastddpm.train_curves): training logs read, summarised, plotted; bad logs exit 2."""
from __future__ import annotations

import json
import math

import pytest

from fastddpm.cli import main
from fastddpm.train_curves import loss_noise, read_log


def _run(folder, losses, start=100):
    folder.mkdir()
    with open(folder / "log.jsonl", "w") as f:
        for i, loss in enumerate(losses):
            f.write(json.dumps({"step": start * (i + 1), "loss": loss, "mse": loss, "vb": 0.0,
                                "loss_by_quarter": [2 * loss, loss, loss / 2, None]}) + "\n")
    return folder


def test_noise_of_a_known_curve():
    # second half (records 10..19): 0.99, 1.01, 0.99, ...; successive differences +0.02, -0.02, ... (9)
    recs = [{"step": i, "loss": 1.0 + (0.01 if i % 2 else -0.01)} for i in range(20)]
    diffs = [0.02 if k % 2 == 0 else -0.02 for k in range(9)]
    mean = sum(diffs) / 9
    expected = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 8) / math.sqrt(2) / 1.0
    n = loss_noise(recs)
    assert n["mean_loss"] == pytest.approx(1.0) and n["records"] == 10 and n["last_step"] == 19
    assert n["relative_noise"] == pytest.approx(expected, rel=1e-9)
    smooth = loss_noise([{"step": i, "loss": 2.0 - 0.01 * i} for i in range(20)])
    assert smooth["relative_noise"] == pytest.approx(0.0, abs=1e-12)
    assert loss_noise(recs[:3])["relative_noise"] is None
    # the weighted objective has its own noise; an old log without it gives none
    weighted = [dict(r, loss_weighted=5.0 + (0.5 if r["step"] % 2 else -0.5)) for r in recs]
    w = loss_noise(weighted, "loss_weighted")
    assert w["mean_loss"] == pytest.approx(5.0) and w["relative_noise"] == pytest.approx(expected * 50 / 5, rel=1e-9)
    assert loss_noise(recs, "loss_weighted") == {"relative_noise": None, "mean_loss": None, "records": 0,
                                                 "last_step": None}


def test_cli_writes_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = _run(tmp_path / "quiet", [1.0 / k for k in range(1, 11)])
    b = _run(tmp_path / "noisy", [1.0 / k + (0.05 if k % 2 else -0.05) for k in range(1, 11)])
    out, plot = tmp_path / "c.json", tmp_path / "c.png"
    assert main(["eval", "curves", str(a), str(b / "log.jsonl"), "--out", str(out), "--plot", str(plot)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"quiet", "noisy"} and len(runs["quiet"]["records"]) == 10
    assert runs["noisy"]["noise"]["relative_noise"] > 5 * runs["quiet"]["noise"]["relative_noise"]
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "relative noise" in capsys.readouterr().out


def test_bad_logs_exit_2(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "log.jsonl").write_text('{"step": 1, "loss": 0.5}\nnot json\n')
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.jsonl").write_text('{"step": 1, "loss": null}\n')
    good = _run(tmp_path / "good", [1.0, 0.5, 0.25])
    for argv, piece in (([str(tmp_path / "none")], "no training log"),
                        ([str(tmp_path / "junk")], "line 2 is not JSON"),
                        ([str(tmp_path / "empty")], "no record with a finite loss"),
                        ([str(good), str(good)], "two runs are named 'good'"),
                        ([str(good), "--out", str(tmp_path)], "is a folder")):
        assert main(["eval", "curves", *argv, "--out", str(tmp_path / "c.json")] if "--out" not in argv
                    else ["eval", "curves", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastddpm: error: ") and err.count("\n") == 1 and piece in err, err
    assert not (tmp_path / "c.json").exists()
    assert read_log(good)[-1]["step"] == 300
