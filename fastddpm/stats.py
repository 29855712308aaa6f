"""The few statistics every comparison in fastddpm quotes: a mean with its spread, a paired difference.

A number measured once is an anecdote. Results here come from several independent draws (noise
seeds of a sampler, training seeds, test images), and a comparison of two settings is made on
the *same* draws (the same x_T, the same images and x_t), so that what they share cancels:

    mean_sd(x)              mean, sample standard deviation SD (ddof 1), SE = SD / sqrt(n)
    paired_difference(a, b) d_i = a_i - b_i over matched draws i: mean(d) and SE(d) = SD(d) / sqrt(n)

A difference is called resolved when |mean(d)| > 2 SE(d) (about a 95% two-sided level for
normal errors; `resolved`); with n = 3 training seeds that is a weak test, and the reports say n.
"""
from __future__ import annotations

import math
from typing import Sequence

RESOLVED_AT = 2.0  # |mean| / SE above which a difference is reported as resolved


def mean_sd(values: Sequence[float]) -> dict:
    """{"mean", "sd", "se", "n"} of a list of numbers (sd and se are None for a single value)."""
    x = [float(v) for v in values]
    n = len(x)
    if n == 0:
        raise ValueError("mean_sd of no values")
    mean = math.fsum(x) / n
    if n == 1:
        return {"mean": mean, "sd": None, "se": None, "n": 1}
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in x) / (n - 1))
    return {"mean": mean, "sd": sd, "se": sd / math.sqrt(n), "n": n}


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict:
    """a - b over matched draws: {"mean", "sd", "se", "n", "z"} with z = mean / se (None if se is 0 or n < 2).

    a[i] and b[i] must come from the same draw (the same seed, image or x_t): that is what makes the
    standard error of the difference smaller than either one's spread."""
    if len(a) != len(b):
        raise ValueError(f"a paired difference needs matched draws; got {len(a)} and {len(b)} values")
    d = mean_sd([float(x) - float(y) for x, y in zip(a, b)])
    d["z"] = d["mean"] / d["se"] if d["se"] else None
    return d


def resolved(diff: dict) -> bool:
    """Whether a paired difference is more than RESOLVED_AT standard errors from zero."""
    return diff["z"] is not None and abs(diff["z"]) > RESOLVED_AT


def fmt(summary: dict, digits: int = 2) -> str:
    """'m +- sd (n = k)' for mean_sd, or 'm +- se (SE, n = k)' for paired_difference."""
    if summary.get("sd") is None:
        return f"{summary['mean']:.{digits}f} (n = 1)"
    if "z" in summary:
        return f"{summary['mean']:+.{digits}f} +- {summary['se']:.{digits}f} (SE, n = {summary['n']})"
    return f"{summary['mean']:.{digits}f} +- {summary['sd']:.{digits}f} (SD, n = {summary['n']})"
