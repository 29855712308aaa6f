"""The `compile` backend: the reference U-Net through torch.compile (TorchInductor).

Mode: "max-autotune-no-cudagraphs" is NOT the default: its autotuning costs minutes per shape.
We use "default" on CPU and "reduce-overhead" on CUDA (Inductor's fused kernels plus its own
CUDA graphs, which remove the launch gaps that dominate a 32x32 U-Net), with fullgraph=True so
a graph break is an error rather than a silent slow path, and dynamic=False since a sampling
run has one shape. Only the model is compiled; the step update stays `reference_step` (a few
elementwise ops). The `graph` backend is the hand-built alternative: our fused kernels and the
step update captured together in one CUDA graph.

Compiled kernels are cached across runs by Inductor's FX-graph cache (on by default; it lives in
TORCHINDUCTOR_CACHE_DIR, /tmp/torchinductor_$USER unless set), so the second run of a shape
skips most of the compile time.
"""
from __future__ import annotations

import torch

from .errors import BackendUnavailableError

_CACHE: dict = {}


def compile_available(device: torch.device) -> None:
    if not hasattr(torch, "compile"):
        raise BackendUnavailableError("backend 'compile' needs torch >= 2.0")
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise BackendUnavailableError("backend 'compile' on CUDA needs the triton package")


def compile_mode(device: torch.device) -> str:
    return "reduce-overhead" if device.type == "cuda" else "default"


def compile_model(model):
    """torch.compile(model) with the mode above; the compiled wrapper is cached per model object."""
    key = id(model)
    if key not in _CACHE or _CACHE[key][0] is not model:
        device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
        _CACHE.clear()  # keep at most one compiled model alive
        _CACHE[key] = (model, torch.compile(model, mode=compile_mode(device), fullgraph=True, dynamic=False))
    return _CACHE[key][1]
