"""`--threads`: how many CPU threads torch's operators use (sample, calibrate, train, eval, bench).

On a CPU the thread count matters as much as the backend. Measured on the project's 2-core
machine (`fastddpm sample --checkpoint digits`, 64 samples, 50 steps, load average 6.7 from other
jobs): 98 ms/step with 1 thread, 418 ms/step with 2, the two threads spin-waiting for cores the
other jobs hold; idle (load average 0.4), 32.5 ms/step with 1 thread and 26.0 with 2. So the
default, "auto", is the number of cores the 1-minute load average leaves idle (at least 1), divided among the
processes of a torchrun job; `--threads N` sets it outright.
"""
from __future__ import annotations

import os

from .errors import FastDDPMError

MAX_THREADS = 1024


def auto_threads() -> int:
    """Idle cores by the 1-minute load average, shared among this machine's torchrun processes; >= 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, int(cores - busy + 0.5) // local)


def parse_threads(text: str) -> int | None:
    """An argparse type: "auto" (None) or an integer 1..MAX_THREADS."""
    if text == "auto":
        return None
    if not text.strip().isdecimal() or not 1 <= int(text) <= MAX_THREADS:
        raise ValueError(f"--threads takes 'auto' or an integer from 1 to {MAX_THREADS}, got {text!r}")
    return int(text)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (None: `auto_threads()`); returns the count set."""
    import torch

    n = auto_threads() if threads is None else int(threads)
    if not 1 <= n <= MAX_THREADS:
        raise FastDDPMError(f"--threads must be from 1 to {MAX_THREADS}, got {n}")
    torch.set_num_threads(n)
    return n
