"""The training run's log, RUN/log.jsonl: one JSON record per --log-every steps, appended by rank 0.

A record: {"step", "loss", "loss_weighted", "mse", "vb", "loss_by_quarter": [4], "grad_norm", "lr", "images_per_s",
"skipped", "skipped_total", "time"} (fastddpm.train_curves reads them). "loss" is the plain mean
of the per-sample losses, mean_b L(x0_b, t_b); "loss_weighted" is the objective that is optimised,
mean_b w_b L(x0_b, t_b) with w_b = 1 / (T p(t_b)): under importance-sampled t (IDDPM eq. 18) it is
the unbiased estimate of L_vlb whose curve IDDPM Fig. 6 draws; with uniform t the two are equal; a resume that changed a
setting adds {"step", "event": "resume", "changed": [...]}.

The log is a record, not the training state: a resume never depends on it. When a run resumes,
lines past its checkpoint's step (written after the checkpoint, then lost to a kill) are dropped,
and so are lines that are not a JSON record (cut short by a kill, or damaged: one byte 0xff in
the file must not block a resume). The log is read, rewritten and appended to without following
links (fastddpm.safe_open): a link, a hard link or a FIFO at log.jsonl is refused with one line.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .files import atomic_write_bytes, mapped_write_errors, open_output
from .safe_open import read_bytes

LOG_NAME = "log.jsonl"


class Window:
    """Running sums over one logging interval (rank-summed values from Trainer.train_step)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.n = self.images = self.skipped = 0
        self.loss = self.loss_weighted = self.mse = self.vb = self.grad_norm = 0.0
        self.q_sum, self.q_cnt = [0.0] * 4, [0.0] * 4
        self.last_loss, self.lr = float("nan"), 0.0

    def add(self, s: dict, global_batch: int) -> None:
        """Add one step's stats (a dict from Trainer.train_step)."""
        self.images += global_batch
        self.lr = s["lr"]
        if not s["finite"]:
            return
        self.n += 1
        self.loss += s["loss"]
        self.loss_weighted += s["loss_weighted"]
        self.mse += s["mse"]
        self.vb += s["vb"]
        self.grad_norm += s["grad_norm"]
        self.last_loss = s["loss"]
        for i in range(4):
            self.q_sum[i] += s["q_sum"][i]
            self.q_cnt[i] += s["q_cnt"][i]

    def rate(self) -> float:
        """Images per second since the window opened."""
        return self.images / max(time.perf_counter() - self.start, 1e-9)

    def record(self, step: int, skipped_total: int) -> dict:
        """The log record of this window, ending at `step`."""
        n = max(self.n, 1)
        rec = {"step": step, "loss": self.loss / n, "loss_weighted": self.loss_weighted / n, "mse": self.mse / n,
               "vb": self.vb / n,
               "loss_by_quarter": [s / c if c else None for s, c in zip(self.q_sum, self.q_cnt)],
               "grad_norm": self.grad_norm / n, "lr": self.lr, "images_per_s": self.rate(),
               "skipped": self.skipped, "skipped_total": skipped_total, "time": time.time()}
        if self.n == 0:
            rec.update(loss=None, loss_weighted=None, mse=None, vb=None, grad_norm=None)
        return rec


def append_log(path: Path, record: dict) -> None:
    """Append one JSON record as a line to the log at `path` (created if missing; never through a link)."""
    with mapped_write_errors(path), open_output(path, binary=False, append=True) as f:
        f.write(json.dumps(record) + "\n")


def _kept(raw: bytes, step: int) -> bool:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False  # cut short by a kill, or damaged
    if not isinstance(record, dict):
        return False
    at = record.get("step", 0)
    return isinstance(at, int) and not isinstance(at, bool) and at <= step


def trim_log(path: Path, step: int) -> None:
    """Drop the lines past `step` and the lines that are not a JSON record (module docstring).

    A link, hard link, FIFO or foreign file at `path` raises UnsafeOutputError (one line)."""
    with mapped_write_errors(path):
        data = read_bytes(path)
    if data is None:
        return
    lines = [line for line in data.split(b"\n") if line.strip()]
    kept = [line for line in lines if _kept(line, step)]
    if len(kept) != len(lines) or (data and not data.endswith(b"\n")):
        atomic_write_bytes(path, b"".join(line + b"\n" for line in kept))
