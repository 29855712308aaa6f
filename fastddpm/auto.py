"""`backend="auto"`: the fastest backend this machine can run, checked against the reference
before it is trusted.

No GPU has run fastddpm's fused kernels and graphs before its users do, so a fast path is never
taken on faith. The candidates are tried fastest first:

    CUDA   graph over the compiled U-Net, graph over the eager U-Net, triton, compile, reference
    CPU    reference (measured: on a 2-core machine the compile backend spent 88 s compiling the
           tiny preset and then sampled 0.63x as fast as the reference; triton runs on a CPU only
           under Triton's interpreter, for tests)

and the first that can run here (`Backend.check`) is **verified**: the first PREFIX_STEPS steps
of the run (the process's noisiest steps, ending at x_0: `GaussianDiffusion.prefix`) at the real
batch, against the reference on the first VERIFY_SAMPLES of those samples (a sample depends only
on its seed and index, so the rows are comparable whatever the batch). The two must agree within
the tolerance of the model's dtype (TOLERANCE, the tests' tolerances for a few steps) and be
finite; an exception, a non-finite value or a larger difference rejects the candidate, with one
warning line saying why, and the next one is tried, down to the reference, which is never
verified against itself. The cost is PREFIX_STEPS steps of the candidate plus PREFIX_STEPS steps
of the eager reference on VERIFY_SAMPLES samples: 0.3% of a 1000-step run's model calls.

`choose` returns the decision with its record (what was verified, with the measured error, and
each rejected candidate with its reason); `fastddpm sample` writes it into stats.json.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from .backends import get_backend
from .errors import BackendUnavailableError, FastDDPMWarning

# (backend, graph_capture or None), fastest first, per device type
CANDIDATES: dict[str, tuple[tuple[str, str | None], ...]] = {
    "cuda": (("graph", "compiled"), ("graph", "eager"), ("triton", None), ("compile", None), ("reference", None)),
    "cpu": (("reference", None),),
}
PREFIX_STEPS = 3
VERIFY_SAMPLES = 2
# Relative L2 error allowed after PREFIX_STEPS steps, by the dtype the model computes in (the tests'
# tolerances: fp32 kernels agree to ~1e-5 per step; a bf16 model to ~1e-2).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 5e-2}


@dataclass
class Choice:
    """What `choose` decided: the backend (and the graph backend's capture mode) and its record."""

    backend: str
    graph_capture: str | None = None
    verified: list = field(default_factory=list)  # [{backend, rel_err, tolerance, seconds}]
    fallbacks: list = field(default_factory=list)  # [{backend, reason}]

    @property
    def label(self) -> str:
        return self.backend + (f" ({self.graph_capture} capture)" if self.graph_capture else "")

    def sample_kwargs(self) -> dict:
        """The keywords `sample` / `warm_up` take for this choice."""
        return {"backend": self.backend, **({"graph_capture": self.graph_capture} if self.graph_capture else {})}

    def record(self) -> dict:
        return asdict(self)


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    return float((x - ref).norm() / ref.norm().clamp(min=1e-30))


def verify(model, diffusion, shape, options, backend: str, graph_capture: str | None = None, *, device=None,
           dtype=None) -> dict:
    """Run the first PREFIX_STEPS steps with `backend` and with the reference; returns
    {backend, rel_err, tolerance, seconds, ok, reason}. Exceptions are caught and reported as not ok."""
    from .model_props import model_device_dtype
    from .sampling import sample

    label = backend + (f" ({graph_capture} capture)" if graph_capture else "")
    tolerance = TOLERANCE.get(model_device_dtype(model)[1], 5e-2)
    prefix = diffusion.prefix(PREFIX_STEPS)
    extra = {"graph_capture": graph_capture} if graph_capture else {}
    start = time.perf_counter()
    try:
        x = sample(model, prefix, shape, backend=backend, options=options.with_(progress=False, callback=None),
                   device=device, dtype=dtype, **extra)
        rows = min(VERIFY_SAMPLES, shape[0])
        ref = sample(model, prefix, (rows, *shape[1:]), backend="reference",
                     options=options.with_(progress=False, callback=None, steps_per_graph=1), device=device,
                     dtype=dtype)
        x = x[:rows]
    except Exception as e:  # noqa: BLE001 - any failure of a fast path rejects it; the reference still runs
        text = " ".join(str(e).split()) or type(e).__name__
        return {"backend": label, "ok": False, "reason": f"{type(e).__name__}: {text[:200]}",
                "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    if not bool(torch.isfinite(x).all()):
        return {"backend": label, "ok": False, "reason": "non-finite values in its samples", "seconds": seconds}
    err = _rel_err(x, ref)
    ok = err <= tolerance
    return {"backend": label, "ok": ok, "rel_err": err, "tolerance": tolerance, "seconds": seconds,
            "reason": None if ok else f"differs from the reference by {err:.2e} (tolerance {tolerance:.0e}) "
                                      f"after {prefix.num_steps} steps"}


def choose(model, diffusion, shape, options, *, device, dtype=None, verify_choice: bool = True,
           candidates=None, warn=None) -> Choice:
    """The first candidate backend that can run on `device` and passes verification (module docstring).

    candidates  [(backend, graph_capture or None)], default CANDIDATES[device.type] (reference last;
                it is appended if missing)
    verify_choice  False: take the first that can run, unverified (benchmarks: `--verify off`)
    warn        called with one line per rejected candidate (default: warnings.warn FastDDPMWarning)
    """
    device = torch.device(device)
    cands = list(candidates if candidates is not None else CANDIDATES.get(device.type, ()))
    if ("reference", None) not in cands:
        cands.append(("reference", None))
    warn = warn or (lambda line: warnings.warn(line, FastDDPMWarning, stacklevel=3))
    choice = Choice(backend="reference")
    for index, (name, capture) in enumerate(cands):
        label = name + (f" ({capture} capture)" if capture else "")
        try:
            get_backend(name).check(device)
        except BackendUnavailableError as e:
            choice.fallbacks.append({"backend": label, "reason": f"cannot run here: {e}"})
            continue
        if name == "reference" or not verify_choice:
            choice.backend, choice.graph_capture = name, capture
            return choice
        result = verify(model, diffusion, shape, options, name, capture, device=device, dtype=dtype)
        if result["ok"]:
            choice.verified.append({k: result[k] for k in ("backend", "rel_err", "tolerance", "seconds")})
            choice.backend, choice.graph_capture = name, capture
            return choice
        choice.fallbacks.append({"backend": label, "reason": result["reason"]})
        following = next((n + (f" ({c} capture)" if c else "") for n, c in cands[index + 1:]), "reference")
        warn(f"backend {label} failed verification ({result['reason']}); falling back to {following}")
    return choice
