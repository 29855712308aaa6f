"""The argument types and the parser class every `fastddpm` sub-command shares (fastddpm.cli).

Standard library only: `fastddpm --help` must not import torch.
"""
from __future__ import annotations

import argparse

from .errors import FastDDPMError

SEED_MAX = 0xFFFFFFFF  # fastddpm.noise.SEED_MAX (not imported: that would import torch for --help)


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage block) and exits 2."""

    def error(self, message):
        # prog is "fastddpm sample"; main() adds the "fastddpm: error: " prefix once.
        where = self.prog[len("fastddpm "):] if self.prog.startswith("fastddpm ") else ""
        raise FastDDPMError(f"{where}: {message}" if where else message)


def seed_arg(text: str) -> int:
    """A --seed: an integer in 0 .. 2^32 - 1, the range of the noise key (fastddpm.noise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {SEED_MAX}, got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be from 0 to {SEED_MAX} (2^32 - 1), got {value}")
    return value


def threads_arg(text: str):
    """A --threads value: "auto" (None) or 1..1024 (fastddpm.threads)."""
    from .threads import parse_threads

    try:
        return parse_threads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_threads(p) -> None:
    """The --threads flag (sample, calibrate, train, eval, bench): cli.main applies it before the command."""
    p.add_argument("--threads", type=threads_arg, default=None, metavar="N|auto",
                   help="CPU threads for torch (default auto: the cores the load average leaves idle)")


def positive_int(text: str) -> int:
    """A count flag: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
