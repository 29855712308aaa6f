"""`SampleOptions`: the sampler settings of one run, in one frozen, self-validating record.

`sampling.sample`, `sampling.warm_up`, `sampling.denoise_loop` and every backend's `run` /
`warmup` hook take one of these instead of a dozen loose keywords; `sample(...)` still accepts
the keywords DESIGN.md lists and builds the record from them.

This module is a leaf: it imports only `errors`, so anything may import it.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Callable

from .errors import FastDDPMError, check_choice

SAMPLERS = ("ancestral", "ddim", "dpm++2m", "dpm++2m-sde")
# Samplers that carry the previous step's x0 prediction from step to step (fastddpm/solvers.py).
MULTISTEP_SAMPLERS = ("dpm++2m", "dpm++2m-sde")
SEED_MAX = 0xFFFFFFFF  # fastddpm.noise.SEED_MAX (this module imports only errors)
GRAPH_CAPTURES = ("compiled", "eager")  # what the `graph` backend captures: the torch.compile'd U-Net or eager


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class SampleOptions:
    """How to walk the reverse process; the same record for every backend.

    seed            fixes every Gaussian with sample_offset (fastddpm.noise); an integer in 0..2^32-1
    sample_offset   index of the first sample of the batch (row b is sample sample_offset + b), >= 0
    sampler         "ancestral" (DDPM Algorithm 2), "ddim" (Song et al. 2021, eq. 12), "dpm++2m"
                    (DPM-Solver++(2M), Lu et al. 2022) or "dpm++2m-sde" (its SDE variant); see
                    fastddpm/solvers.py
    eta             DDIM's noise scale in [0, 1] (0: deterministic); the other samplers have none and
                    refuse an eta other than 0
    clip_denoised   clip the predicted x0 to [-1, 1] (images); off for unbounded data
    progress        show a progress bar on stderr
    callback        None, or called after every step with dict(index, k, t, x, pred_x0)
    steps_per_graph `graph` backend: consecutive steps captured in one CUDA graph, >= 1
    graph_capture   `graph` backend: "compiled" captures the torch.compile'd U-Net (Inductor's
                    kernels around the fused GroupNorm+SiLU op), "eager" the module as it is
    Invalid values raise FastDDPMError naming the value (and the valid choices).
    """

    seed: int = 0
    sample_offset: int = 0
    sampler: str = "ancestral"
    eta: float = 0.0
    clip_denoised: bool = True
    progress: bool = False
    callback: Callable | None = None
    steps_per_graph: int = 1
    graph_capture: str = "compiled"

    def __post_init__(self):
        if not _is_int(self.seed) or not 0 <= self.seed <= SEED_MAX:
            raise FastDDPMError(f"seed must be an integer from 0 to {SEED_MAX} (2^32 - 1), got {self.seed!r}")
        if not _is_int(self.sample_offset) or not 0 <= self.sample_offset < 2**32:
            raise FastDDPMError(f"sample_offset must be an integer in 0..2^32-1, got {self.sample_offset!r}")
        check_choice("sampler", self.sampler, SAMPLERS)
        if (not isinstance(self.eta, numbers.Real) or isinstance(self.eta, bool) or not math.isfinite(self.eta)
                or not 0.0 <= self.eta <= 1.0):
            raise FastDDPMError(f"eta must be in [0, 1], got {self.eta!r}")
        if self.eta != 0.0 and self.sampler != "ddim":
            raise FastDDPMError(f"eta is DDIM's noise scale; the {self.sampler!r} sampler has none (got eta={self.eta})")
        for name in ("clip_denoised", "progress"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Integral) and value in (0, 1)):
                raise FastDDPMError(f"{name} must be True or False, got {value!r}")
            object.__setattr__(self, name, bool(value))
        if self.callback is not None and not callable(self.callback):
            raise FastDDPMError(f"callback must be None or a callable, got {type(self.callback).__name__}")
        if not _is_int(self.steps_per_graph) or self.steps_per_graph < 1:
            raise FastDDPMError(f"steps_per_graph must be a positive integer, got {self.steps_per_graph!r}")
        check_choice("graph_capture", self.graph_capture, GRAPH_CAPTURES)
        # Normalise numbers a caller gave as numpy scalars, so records compare and hash alike.
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "sample_offset", int(self.sample_offset))
        object.__setattr__(self, "eta", float(self.eta))
        object.__setattr__(self, "steps_per_graph", int(self.steps_per_graph))

    def with_(self, **changes) -> "SampleOptions":
        """A copy with `changes` applied (and validated); unknown names raise FastDDPMError."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise FastDDPMError(f"unknown sample option(s) {unknown}; valid: {', '.join(f.name for f in fields(self))}")
        return replace(self, **changes)

    def step_kwargs(self) -> dict:
        """The keywords a step function (`sampling.reference_step`'s signature) takes from these options."""
        return {"seed": self.seed, "sample_offset": self.sample_offset, "sampler": self.sampler, "eta": self.eta,
                "clip_denoised": self.clip_denoised}


DEFAULTS = SampleOptions()


def options_from(options: SampleOptions | None, **settings) -> SampleOptions:
    """The options of a call that may pass a record, loose keywords, or both.

    With no record the keywords build one. With a record, keywords still at their default are
    ignored and any other keyword is a conflict (FastDDPMError): a setting has one source.
    """
    if options is None:
        return DEFAULTS.with_(**settings)
    if not isinstance(options, SampleOptions):
        raise FastDDPMError(f"options must be a fastddpm SampleOptions, got {type(options).__name__}")
    unknown = sorted(set(settings) - {f.name for f in fields(SampleOptions)})
    if unknown:
        raise FastDDPMError(f"unknown sample option(s) {unknown}")
    clash = sorted(k for k, v in settings.items() if v is not getattr(DEFAULTS, k) and v != getattr(DEFAULTS, k))
    if clash:
        raise FastDDPMError(f"pass the sampler settings either as options=SampleOptions(...) or as keywords, "
                            f"not both: got options and {', '.join(f'{k}={settings[k]!r}' for k in clash)}")
    return options
