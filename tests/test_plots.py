"""fastddpm.plots: PNGs with the [plots] extra; one line and exit 2 without it."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from fastddpm import plots
from fastddpm.cli import main
from fastddpm.errors import FastDDPMError

PNG = b"\x89PNG\r\n\x1a\n"


def test_every_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    T = 30
    vb = list(np.geomspace(1.0, 1e-5, T))
    from fastddpm.vlb_terms import rate_distortion_records, vlb_term_records

    plots.plot_vlb_terms(vlb_term_records(vb, 1e-5), tmp_path / "terms.png")
    plots.plot_rate_distortion(rate_distortion_records(vb, 1e-5, list(np.linspace(0, 1, T))), tmp_path / "rd.png")
    log = [{"step": s, "loss": 1 / s, "loss_by_quarter": [1 / s, 0.5 / s, None, 0.1 / s]} for s in (100, 200, 300)]
    plots.plot_training_curves({"a": log, "b": log}, tmp_path / "curves.png")
    plots.plot_series({"x": ([10, 100], [3.0, 1.0])}, tmp_path / "series.png", "steps", "fid", logx=True,
                      hline=(0.5, "floor"))
    rows = [np.random.default_rng(0).integers(0, 256, size=(k, 8, 8, 1), dtype=np.uint8) for k in (3, 2)]
    plots.plot_image_rows(rows, tmp_path / "rows.png", ["a", "b"], ["1", "2", "3"])
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["curves.png", "rd.png", "rows.png", "series.png", "terms.png"]  # no temporaries left
    for name in names:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, name


def _captured(monkeypatch):
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig))
    return figs


def test_training_curves_get_one_panel_per_quantity(monkeypatch):
    pytest.importorskip("matplotlib")
    figs = _captured(monkeypatch)
    kl = [{"step": s, "loss": 300.0 / s, "loss_weighted": 5.0 / s, "mse": 0.1, "vb": 0.3} for s in (25, 50, 75)]
    simple = [{"step": s, "loss": 0.1 / s, "loss_weighted": 0.1 / s, "mse": 0.1 / s, "vb": 0.0} for s in (25, 50)]
    plots.plot_training_curves({"kl": kl, "simple": simple}, "unused.png")
    axes = figs[-1].axes
    assert [a.get_title() for a in axes] == [plots.QUANTITY_LABELS[q] for q in ("loss_weighted", "loss", "mse", "vb")]
    assert [len(a.get_lines()) for a in axes] == [2, 2, 2, 1]  # the simple run's vb is 0: not drawn on a log axis
    # IDDPM Fig. 6 alone: the weighted objective; two seeds of one setting share a colour and a legend entry
    plots.plot_training_curves({"a-seed0": kl, "a-seed1": kl}, "unused.png", quantities=("loss_weighted", "q1"),
                               colours={"a-seed0": "C0", "a-seed1": "C0"})
    assert len(figs[-1].axes) == 1  # nothing logged a quarter: no empty panel
    with pytest.raises(FastDDPMError, match="none of the runs logged"):
        plots.plot_training_curves({"a": simple}, "unused.png", quantities=("grad_norm",))


def test_rate_distortion_figure_has_the_lossless_point_and_the_mean_image_line(monkeypatch):
    pytest.importorskip("matplotlib")
    from fastddpm.vlb_terms import rate_distortion_records

    figs = _captured(monkeypatch)
    T = 20
    vb = list(np.geomspace(1.0, 1e-5, T))
    recs = rate_distortion_records(vb, 1e-5, list(np.linspace(0, 1, T)), level_accuracy=list(np.linspace(1, 0.3, T)),
                                   exact_fraction=list(np.linspace(1, 0, T)))
    plots.plot_rate_distortion(recs, "unused.png", lossless=4.2, mean_image=70.7)
    axes = figs[-1].axes
    assert len(axes) == 4
    rd = axes[2]
    points = rd.collections[0].get_offsets()
    assert points.tolist() == [[4.2, 0.0]]
    assert any(list(line.get_ydata()) == [70.7, 70.7] for line in rd.get_lines())
    assert len(axes[3].get_lines()) == 2


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib made unimportable, as on an install without the [plots] extra."""
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError


def test_missing_matplotlib_says_how_to_install(no_matplotlib, tmp_path):
    with pytest.raises(FastDDPMError, match=r"pip install 'fastddpm\[plots\]'"):
        plots.plot_vlb_terms([{"t": 0, "term": "L_0", "vb": 1.0}], tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("metric", ["rate-distortion", "bpd"])
def test_cli_without_matplotlib_exits_2_before_the_work(no_matplotlib, tmp_path, capsys, metric):
    # the bundled checkpoint at T = 1000 would take a while: the refusal must come before that work
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    assert main(["eval", metric, "--checkpoint", "digits", "--data", "digits", "--out", str(out), "--plot",
                 str(plot), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'fastddpm[plots]'" in err, err
    assert not list(tmp_path.iterdir())


def test_import_fastddpm_does_not_import_matplotlib():
    import subprocess

    code = "import sys, fastddpm, fastddpm.plots, fastddpm.vlb_terms, fastddpm.digits_fid; " \
           "print('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
