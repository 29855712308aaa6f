"""Figures of the papers' experiments as PNG files (matplotlib, the optional `[plots]` extra).

matplotlib is imported only inside these functions, and through its object API (Figure +
the Agg canvas), so nothing here touches pyplot's global state or the user's backend choice.
Callers that will plot after long work call `require_matplotlib()` first, so a missing extra is
reported before the work, not after it. Every PNG is written to a temporary name and renamed.
"""
from __future__ import annotations

import io

from .errors import FastDDPMError
from .files import atomic_write_bytes

INSTALL_HINT = "plotting needs matplotlib, which is not installed: pip install 'fastddpm[plots]'"


def require_matplotlib() -> None:
    """Raise FastDDPMError with the install line when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise FastDDPMError(INSTALL_HINT) from None


def _figure(width: float = 6.0, height: float = 4.0):
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> None:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def plot_vlb_terms(terms: list[dict], path, title: str = "") -> None:
    """The variational bound's terms against t, log-scale y (IDDPM Fig. 2).

    terms: records {"t", "vb"} from `fastddpm.vlb_terms.vlb_term_records` (L_0 .. L_{T-1} at
    t = 0 .. T-1 and the prior L_T at t = T), in bits/dim.
    """
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    steps = [r for r in terms if r.get("term") != "L_T (prior)"]
    ax.plot([r["t"] for r in steps], [max(r["vb"], 1e-12) for r in steps], lw=1.2, label="L_t (t < T)")
    prior = [r for r in terms if r.get("term") == "L_T (prior)"]
    if prior:
        ax.scatter([prior[0]["t"]], [max(prior[0]["vb"], 1e-12)], color="C3", s=18, zorder=3, label="L_T (prior)")
    ax.set_yscale("log")
    ax.set_xlabel("diffusion step t")
    ax.set_ylabel("VLB term (bits/dim)")
    ax.set_title(title or "Terms of the variational bound")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    _save(fig, path)


def plot_rate_distortion(records: list[dict], path, title: str = "") -> None:
    """DDPM Fig. 5: distortion and rate against reverse-process steps, and distortion against rate.

    records: {"t", "rate" (bits/dim), "distortion" (RMSE on 0..255)} as `fastddpm.vlb_terms` gives.
    """
    fig = _figure(12.0, 3.6)
    T = max(r["t"] for r in records) + 1
    steps = [T - 1 - r["t"] for r in records]  # reverse-process steps taken, T - t in DDPM's 1-based count
    rate = [r["rate"] for r in records]
    dist = [r["distortion"] for r in records]
    for i, (y, label) in enumerate(((dist, "distortion (RMSE, 0..255)"), (rate, "rate (bits/dim)"))):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.plot(steps, y, lw=1.2)
        ax.set_xlabel("reverse process steps (T - t)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, 3, 3)
    ax.plot(rate, dist, lw=1.2)
    ax.set_xlabel("rate (bits/dim)")
    ax.set_ylabel("distortion (RMSE, 0..255)")
    ax.grid(alpha=0.3)
    fig.suptitle(title or "Rate-distortion of the reverse process")
    _save(fig, path)


def plot_training_curves(runs: dict[str, list[dict]], path, title: str = "") -> None:
    """Loss against step for each run, and the loss by timestep quartile (IDDPM Fig. 6).

    runs: name -> the records of that run's log.jsonl ({"step", "loss", "loss_by_quarter": [4]}).
    The quartile panel has one line style per quartile of t and one colour per run.
    """
    fig = _figure(12.0, 4.0)
    ax = fig.add_subplot(1, 2, 1)
    ax2 = fig.add_subplot(1, 2, 2)
    styles = ("-", "--", "-.", ":")
    for i, (name, recs) in enumerate(runs.items()):
        recs = [r for r in recs if r.get("loss") is not None]
        ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], color=f"C{i}", lw=1.0, label=name)
        for q in range(4):
            pts = [(r["step"], r["loss_by_quarter"][q]) for r in recs
                   if r.get("loss_by_quarter") and r["loss_by_quarter"][q] is not None]
            if pts:
                ax2.plot(*zip(*pts), color=f"C{i}", ls=styles[q], lw=1.0, label=f"{name} q{q + 1}")
    for a, label in ((ax, "training loss"), (ax2, "loss by quartile of t (q1: smallest t)")):
        a.set_yscale("log")
        a.set_xlabel("training step")
        a.set_ylabel(label)
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=6, ncol=2 if a is ax2 else 1)
    fig.suptitle(title or "Training curves")
    _save(fig, path)


def plot_series(series: dict[str, tuple[list, list]], path, xlabel: str, ylabel: str, title: str = "",
                logx: bool = False, hline: tuple[float, str] | None = None) -> None:
    """Lines y(x), one per name (e.g. digits FID against sampling steps, IDDPM Fig. 8).

    series: name -> (xs, ys). hline: an optional (y, label) drawn dashed, e.g. a noise floor.
    """
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", ms=3, lw=1.2, label=name)
    if hline is not None:
        ax.axhline(hline[0], color="grey", ls="--", lw=1.0, label=hline[1])
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_image_rows(rows: list, path, row_labels: list[str], col_labels: list[str] | None = None,
                    title: str = "", scale: float = 0.55) -> None:
    """A labelled table of small grey images (DDPM Figs. 6-8 at 8x8).

    rows: one uint8 array [K, H, W] or [K, H, W, 1] per row (rows may differ in K; short rows are
    left blank on the right); row_labels [R]; col_labels [max K] or None.
    """
    import numpy as np

    rows = [np.asarray(r).reshape(len(r), r.shape[1], r.shape[2]) for r in rows]
    h, w = rows[0].shape[1:]
    pad = max(1, h // 8)
    ncol = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        for j, img in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = img
    fig = _figure(max(3.0, 1.2 + scale * ncol), max(2.0, 0.8 + scale * len(rows)))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks([pad + i * (h + pad) + h / 2 - 0.5 for i in range(len(rows))], row_labels, fontsize=8)
    if col_labels is not None:
        ax.set_xticks([pad + j * (w + pad) + w / 2 - 0.5 for j in range(len(col_labels))], col_labels,
                      fontsize=7, rotation=0)
        ax.xaxis.tick_top()
    else:
        ax.set_xticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title, fontsize=10)
    _save(fig, path)
