"""Training curves from a run's log.jsonl: `fastddpm eval curves RUN [RUN ...]` (IDDPM Fig. 6, sec. 3.3).

The trainer appends one JSON record per --log-every steps to RUN/log.jsonl: {"step", "loss" (the
plain mean of the per-sample losses over the interval), "loss_weighted" (the objective that is
optimised, mean_b w_b L_b: for importance-sampled t the reweighted, unbiased estimate of L_vlb that
IDDPM Fig. 6 plots; equal to "loss" for uniform t), "loss_by_quarter": [4] (the plain loss over the
samples whose t fell in each quarter of 0..T-1), ...}. This module reads those records, summarises
how noisy the curves are, and plots one panel per quantity against step.

Noise of a curve: over the second half of the records, the standard deviation of successive
differences of the logged value divided by sqrt(2) (the noise of one logged value if the trend is
smooth) and by the mean logged value there (so runs whose losses differ in scale compare). It is
given for the plain loss and for the weighted objective (logs written before the weighted
objective was recorded have only the former).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import DataError, FastDDPMError
from .files import atomic_write_bytes
from .paths import check_path_length


def _log_path(run) -> Path:
    p = Path(run)
    try:
        return p / "log.jsonl" if p.is_dir() else p
    except OSError:  # a name too long: read_log says so
        return p


def read_log(run) -> list[dict]:
    """The records of RUN/log.jsonl (or of a .jsonl file given directly) that carry a finite loss.

    A line that is not UTF-8 text or not a JSON record is a DataError naming it (one line, exit 2)."""
    log = _log_path(run)
    check_path_length(log, "RUN", DataError)
    if not log.is_file():
        raise DataError(f"no training log at {str(log)!r} (expected a run folder holding log.jsonl)")
    records = []
    with open(log, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{str(log)!r} line {number} is not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                                f"column {e.start + 1}); remove or repair that line") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                raise DataError(f"{str(log)!r} line {number} is not JSON") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise DataError(f"{str(log)!r} line {number} is not a training record (no integer 'step')")
            loss = rec.get("loss")
            if isinstance(loss, (int, float)) and math.isfinite(loss):
                records.append(rec)
    if not records:
        raise DataError(f"{str(log)!r} holds no record with a finite loss yet")
    return records


def loss_noise(records: list[dict], key: str = "loss") -> dict:
    """{"relative_noise", "mean_loss", "records", "last_step"} of the logged `key` ("loss" or
    "loss_weighted") over the second half of `records` (see the module docstring); relative_noise
    is None with fewer than 3 records there. Records without `key` are left out."""
    records = [r for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not records:
        return {"relative_noise": None, "mean_loss": None, "records": 0, "last_step": None}
    half = [float(r[key]) for r in records[len(records) // 2:]]
    mean = sum(half) / len(half)
    noise = None
    if len(half) >= 3 and mean != 0:
        d = [b - a for a, b in zip(half, half[1:])]
        m = sum(d) / len(d)
        noise = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1)) / math.sqrt(2) / abs(mean)
    return {"relative_noise": noise, "mean_loss": mean, "records": len(half), "last_step": records[-1]["step"]}


@dataclass
class CurvesRequest:
    """`fastddpm eval curves`: run folders (or log.jsonl files), the JSON summary and an optional plot."""

    runs: list[str] = field(default_factory=list)
    out: str | None = "curves.json"
    plot: str | None = None


def evaluate_curves(request: CurvesRequest) -> dict:
    """Read every run's log and write {name: {"noise": loss_noise(...), "records": [...]}} to request.out.

    The outputs are checked first (not one of the logs read) and request.out is locked while the
    command runs (fastddpm.run_folder.output_file_lock)."""
    from .files import check_output_file, refuse_overwriting_inputs
    from .run_folder import output_file_lock

    if request.out is not None:
        check_output_file(request.out, "--out")
    if request.plot is not None:
        check_output_file(request.plot, "--plot")
        from .plots import require_matplotlib

        require_matplotlib()
    refuse_overwriting_inputs([(request.out, "--out"), (request.plot, "--plot")],
                              [(_log_path(run), "RUN") for run in request.runs])
    if request.out is None:
        return _evaluate_curves(request)
    with output_file_lock(request.out, "--out"):
        return _evaluate_curves(request)


def _evaluate_curves(request: CurvesRequest) -> dict:
    runs = {}
    for run in request.runs:
        records = read_log(run)
        name = Path(run).name if Path(run).is_dir() else Path(run).parent.name or str(run)
        if name in runs:
            raise FastDDPMError(f"two runs are named {name!r}; give each its own folder")
        runs[name] = records
    result = {name: {"noise": loss_noise(recs), "noise_weighted": loss_noise(recs, "loss_weighted"), "records": [
        {k: r.get(k) for k in ("step", "loss", "loss_weighted", "mse", "vb", "loss_by_quarter")} for r in recs]}
        for name, recs in runs.items()}
    for name, r in result.items():
        n = r["noise"]
        noise = "n/a" if n["relative_noise"] is None else f"{n['relative_noise']:.3f}"
        w = r["noise_weighted"]
        weighted = "" if w["relative_noise"] is None else (
            f"; weighted objective {w['mean_loss']:.4g}, relative noise {w['relative_noise']:.3f}")
        print(f"{name}: step {n['last_step']}, mean loss {n['mean_loss']:.4g} (2nd half), relative noise {noise}"
              + weighted)
    if request.out is not None:
        atomic_write_bytes(request.out, (json.dumps({"runs": result, "request": asdict(request)}, indent=1)
                                         + "\n").encode())
        print(f"wrote {request.out}")
    if request.plot is not None:
        from .plots import plot_training_curves

        plot_training_curves(runs, request.plot)
        print(f"wrote {request.plot}")
    return result
