"""The backend registry: how a sampling run is computed, never what.

A backend is one frozen `Backend` record in `BACKENDS`, chosen by name (`backend=` in Python,
`--backend` on the command line). It may swap in
    group_norm_silu   the fused GroupNorm(+emb)(+SiLU) every `unet.GroupNormAct` calls,
    step              the fused reverse-step update (see `sampling.reference_step`),
    prepare_model     a wrapper around the whole model callable (torch.compile, ...),
    run               a whole sampling loop of its own (CUDA graphs, ONNX Runtime),
    warmup            one-time preparation of a run's shape (capture, compile, session start),
                      which `sampling.warm_up` times apart from the steady state,
and says with `check(device)` whether it can run here. Nothing falls back silently: a backend
that cannot run raises BackendUnavailableError, and the CLI turns that into exit status 2.

The hooks' signatures:
    run(model, diffusion, shape, options, *, device, dtype, x_T=None) -> x_0 [B, C, ...]
    warmup(model, diffusion, shape, options, *, device, dtype) -> None
with `options` a `fastddpm.options.SampleOptions`, dtype the sampler state's dtype, and x_T
None (draw the seeded start) or the checked starting noise in that dtype on that device.

This module is a leaf of the import graph: the implementations (graph.py, compiled.py,
kernels/, export/) are imported on first use inside the hooks below, and none of them imports
this module or sampling.py back (tests/test_options.py checks the import graph).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import BackendUnavailableError, FastDDPMError
from .kernels.group_norm_op import group_norm_silu_op  # registers nothing until first called
from .unet import group_norm_impl  # the seam's switch, re-exported here as before

__all__ = ["BACKENDS", "Backend", "get_backend", "group_norm_impl", "register", "triton_available"]


@dataclass(frozen=True)
class Backend:
    """One way to compute a sampling run: a name, a one-line description, an availability check
    `check(device)` (raises BackendUnavailableError), and the hooks it swaps in (module docstring);
    a hook left None keeps the reference's."""

    name: str
    description: str
    check: Callable[[torch.device], None]
    group_norm_silu: Callable | None = None
    step: Callable | None = None
    prepare_model: Callable | None = None
    run: Callable | None = None
    warmup: Callable | None = None

    def __post_init__(self):
        if not self.name or not self.description:
            raise ValueError("a backend needs a name and a description")


def _always(device: torch.device) -> None:
    return None


def triton_available(device: torch.device) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under its interpreter (TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        raise BackendUnavailableError("backend 'triton' needs the triton package (pip install triton)")
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device.type == "cuda" or (device.type == "cpu" and interpreted):
        return
    if device.type == "cpu":
        raise BackendUnavailableError(
            "backend 'triton' needs a CUDA device; on a CPU it runs only under Triton's interpreter "
            "(set TRITON_INTERPRET=1, slow, for testing)")
    raise BackendUnavailableError(f"backend 'triton' cannot run on device {device.type!r}")


def _triton_group_norm_silu(x, num_groups, weight, bias, emb=None, silu=True, eps=1e-5):
    """kernels.group_norm.group_norm_silu, imported on first call so `import fastddpm` never imports Triton."""
    from .kernels.group_norm import group_norm_silu

    return group_norm_silu(x, num_groups, weight, bias, emb, silu, eps)


def _triton_step(diffusion, x, k, model_output, **kwargs):
    """kernels.step.triton_step (reference_step's signature), imported on first call."""
    from .kernels.step import triton_step

    return triton_step(diffusion, x, k, model_output, **kwargs)


def _onnx_available(device: torch.device) -> None:
    """export.ort_backend.onnx_available, imported on first call so `import fastddpm` never imports onnxruntime."""
    from .export.ort_backend import onnx_available

    onnx_available(device)


def _onnx_run(model, diffusion, shape, options, **kwargs):
    """export.ort_backend.run (the whole loop in ONNX Runtime), imported on first call."""
    from .export.ort_backend import run

    return run(model, diffusion, shape, options, **kwargs)


def _onnx_warmup(model, diffusion, shape, options, **kwargs):
    """export.ort_backend.warmup (an in-memory export, one model call), imported on first call."""
    from .export.ort_backend import warmup

    warmup(model, diffusion, shape, options, **kwargs)


def _graph_available(device: torch.device) -> None:
    """graph.graph_available (CUDA and Triton), imported on first call."""
    from .graph import graph_available

    graph_available(device)


def _graph_run(model, diffusion, shape, options, **kwargs):
    """graph.run: capture the step once, replay it per step; imported on first call."""
    from .graph import run

    return run(model, diffusion, shape, options, **kwargs)


def _graph_warmup(model, diffusion, shape, options, **kwargs):
    """graph.warmup: build and capture the sampler for this shape (cached for the run that follows)."""
    from .graph import warmup

    return warmup(model, diffusion, shape, options, **kwargs)


def _compile_available(device: torch.device) -> None:
    """compiled.compile_available, imported on first call."""
    from .compiled import compile_available

    compile_available(device)


def _compile_model(model):
    """compiled.compile_model: torch.compile with the documented mode, imported on first call."""
    from .compiled import compile_model

    return compile_model(model)


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", "plain eager PyTorch; the ground truth", _always),
    "triton": Backend("triton", "fused Triton GroupNorm+SiLU and step kernels", triton_available,
                      group_norm_silu=_triton_group_norm_silu, step=_triton_step),
    "graph": Backend("graph", "the whole step captured in one CUDA graph", _graph_available, run=_graph_run,
                     warmup=_graph_warmup),
    "compile": Backend("compile", "the model under torch.compile, GroupNorm+SiLU as the fused custom op",
                       _compile_available, group_norm_silu=group_norm_silu_op, prepare_model=_compile_model),
    "onnx": Backend("onnx", "the eps-model (or the whole step) in ONNX Runtime, the loop of export/ort_sample.py",
                    _onnx_available, run=_onnx_run, warmup=_onnx_warmup),
}


def get_backend(name: str) -> Backend:
    """The registered backend `name`; FastDDPMError naming the valid ones otherwise."""
    if name not in BACKENDS:
        raise FastDDPMError(f"unknown backend {name!r}; choose one of {', '.join(map(repr, BACKENDS))} "
                            "(or 'auto' where a backend is chosen: sample, fastddpm sample)")
    return BACKENDS[name]


def register(backend: Backend) -> None:
    """Add or replace a backend (how the kernel and export packages plug theirs in)."""
    BACKENDS[backend.name] = backend
