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


def plot_rate_distortion(records: list[dict], path, title: str = "", lossless: float | None = None,
                         mean_image: float | None = None) -> None:
    """DDPM Fig. 5: distortion and rate against reverse-process steps, and distortion against rate.

    records: {"t", "rate" (bits/dim), "distortion" (RMSE on 0..255)} as `fastddpm.vlb_terms` gives,
    optionally with "exact_fraction" and "level_accuracy" (drawn in a fourth panel, against rate).
    lossless: the bits/dim of the whole code, drawn as the point (lossless, 0); mean_image: the
    RMSE of sending only the mean image, drawn as a dashed line (the rate-0 baseline).
    """
    exact = [r for r in records if "exact_fraction" in r]
    panels = 4 if exact else 3
    fig = _figure(4.0 * panels, 3.6)
    T = max(r["t"] for r in records) + 1
    steps = [T - 1 - r["t"] for r in records]  # reverse-process steps taken, T - t in DDPM's 1-based count
    rate = [r["rate"] for r in records]
    dist = [r["distortion"] for r in records]

    def baseline(ax):
        if mean_image is not None:
            ax.axhline(mean_image, color="grey", ls="--", lw=1.0, label=f"mean image only ({mean_image:.1f})")
    for i, (y, label) in enumerate(((dist, "distortion (RMSE, 0..255)"), (rate, "rate (bits/dim)"))):
        ax = fig.add_subplot(1, panels, i + 1)
        ax.plot(steps, y, lw=1.2)
        if i == 0:
            baseline(ax)
            if mean_image is not None:
                ax.legend(fontsize=7)
        ax.set_xlabel("reverse process steps (T - t)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, panels, 3)
    ax.plot(rate, dist, lw=1.2, label="x0 predicted from x_t")
    baseline(ax)
    if lossless is not None:
        ax.scatter([lossless], [0.0], color="C3", s=20, zorder=3, label=f"lossless (+ L_0): {lossless:.2f} bits/dim")
    ax.set_xlabel("rate (bits/dim)")
    ax.set_ylabel("distortion (RMSE, 0..255)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if exact:
        ax = fig.add_subplot(1, panels, 4)
        ax.plot([r["rate"] for r in exact], [r["exact_fraction"] for r in exact], lw=1.2, label="images exact")
        if all("level_accuracy" in r for r in exact):
            ax.plot([r["rate"] for r in exact], [r["level_accuracy"] for r in exact], lw=1.2, ls="--",
                    label="pixels at the right level")
        ax.set_xlabel("rate (bits/dim)")
        ax.set_ylabel("share recovered by the rounded x0 prediction")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "Rate-distortion of the reverse process")
    _save(fig, path)


QUANTITY_LABELS = {
    "loss_weighted": "objective optimised: mean_b w_b L_b (importance-weighted)",
    "loss": "plain mean loss mean_b L_b",
    "mse": "eps-prediction MSE",
    "vb": "VLB term L_t (bits/dim, mean over drawn t)",
    "grad_norm": "gradient norm",
}


def plot_training_curves(runs: dict[str, list[dict]], path, title: str = "",
                         quantities: tuple[str, ...] = ("loss_weighted", "loss", "mse", "vb"),
                         colours: dict[str, str] | None = None) -> None:
    """One panel per logged quantity against step, one line per run (IDDPM Fig. 6 is the
    "loss_weighted" panel of an importance-sampled and a uniform L_vlb run).

    runs: name -> the records of that run's log.jsonl. quantities: record keys (QUANTITY_LABELS),
    or "q1".."q4" for the plain loss over the quarter of 0..T-1 a sample's t fell in. A quantity
    no run logged (or only as zeros, e.g. vb of an L_simple run) gets no panel. colours: name ->
    matplotlib colour (default one per run), so several seeds of one setting can share one.
    """
    def value(rec, q):
        if q.startswith("q") and q[1:].isdigit():
            quarters = rec.get("loss_by_quarter") or []
            k = int(q[1:]) - 1
            return quarters[k] if k < len(quarters) else None
        return rec.get(q)

    def series(recs, q):
        pts = [(r["step"], value(r, q)) for r in recs]
        return [(s, v) for s, v in pts if isinstance(v, (int, float)) and v > 0]
    shown = [q for q in quantities if any(series(recs, q) for recs in runs.values())]
    if not shown:
        raise FastDDPMError("none of the runs logged " + ", ".join(quantities))
    fig = _figure(4.2 * len(shown), 3.6)
    for k, q in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), k + 1)
        for i, (name, recs) in enumerate(runs.items()):
            pts = series(recs, q)
            if pts:
                ax.plot(*zip(*pts), color=(colours or {}).get(name, f"C{i % 10}"), lw=0.9, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        label = QUANTITY_LABELS.get(q) or f"plain loss, quarter {q[1:]} of t"
        ax.set_title(label, fontsize=8)
        ax.grid(alpha=0.3, which="both")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))  # seeds of one setting may share a label
        ax.legend(unique.values(), unique.keys(), fontsize=6)
    fig.suptitle(title or "Training curves")
    _save(fig, path)


def plot_series(series: dict[str, tuple[list, list]], path, xlabel: str, ylabel: str, title: str = "",
                logx: bool = False, hline: tuple[float, str] | None = None,
                errors: dict[str, list] | None = None) -> None:
    """Lines y(x), one per name (e.g. digits FID against sampling steps, IDDPM Fig. 8).

    series: name -> (xs, ys). hline: an optional (y, label) drawn dashed, e.g. a noise floor.
    errors: name -> a +- bar per point (e.g. the SD over seeds), drawn as error bars.
    """
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, (xs, ys) in series.items():
        bars = (errors or {}).get(name)
        if bars is not None:
            ax.errorbar(xs, ys, yerr=bars, marker="o", ms=3, lw=1.2, capsize=3, label=name)
        else:
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
