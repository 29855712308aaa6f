"""The `compile` backend: the U-Net through torch.compile (TorchInductor), with every
GroupNorm(+emb)(+SiLU) as the custom op `fastddpm::group_norm_silu` (kernels/group_norm_op.py).

The op is one node Dynamo records without a graph break: on CUDA it runs our fused Triton
kernel and Inductor fuses the rest of the model around it; on CPU it is the torch twin.

Mode: "max-autotune-no-cudagraphs" is NOT the default: its autotuning costs minutes per shape.
We use "default" on CPU and "reduce-overhead" on CUDA (Inductor's fused kernels plus its own
CUDA graphs, which remove the launch gaps that dominate a 32x32 U-Net), with fullgraph=True so
a graph break is an error rather than a silent slow path, and dynamic=False since a sampling
run has one shape. Only the model is compiled; the step update stays `reference_step` (a few
elementwise ops). The `graph` backend captures the same compiled model (`compile_for_graph`,
mode "default": no CUDA graphs of Inductor's own inside ours) together with the fused step in
one CUDA graph.

The compiled wrapper is cached for one model while its weights fingerprint
(`model_props.weights_fingerprint`) is unchanged: an in-place `.half()` or
`load_state_dict(assign=True)` gets a fresh compile, never code specialised to freed tensors.
Compiled kernels are also cached across runs by Inductor's FX-graph cache (on by default; it
lives in TORCHINDUCTOR_CACHE_DIR, /tmp/torchinductor_$USER unless set), so the second run of a
shape skips most of the compile time.

Tested on CPU (torch 2.13: the op is the torch twin there). The CUDA path (Inductor around the
op's Triton kernel, "reduce-overhead" CUDA graphs) is UNVERIFIED: written without a GPU; the
gpu-marked tests and bench/gpu_check.sh check it on the first lent GPU.
"""
from __future__ import annotations

import torch

from .errors import BackendUnavailableError
from .model_props import model_device_dtype, weights_fingerprint

_CACHE: dict = {}


def compile_available(device: torch.device) -> None:
    """The backend's check: torch.compile exists, and on CUDA Inductor has Triton to generate kernels."""
    if not hasattr(torch, "compile"):
        raise BackendUnavailableError("backend 'compile' needs torch >= 2.0")
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise BackendUnavailableError("backend 'compile' on CUDA needs the triton package")


def compile_mode(device: torch.device) -> str:
    """torch.compile's mode for the `compile` backend on `device` (module docstring for why)."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def compile_model(model):
    """torch.compile(model) with `compile_mode`, fullgraph=True, dynamic=False; registers the custom
    GroupNorm+SiLU op first (the backend swaps it into the model). Cached per model and weights
    fingerprint; at most one compiled model is kept alive."""
    from .kernels.group_norm_op import register

    register()
    key = weights_fingerprint(model)
    cached = _CACHE.get("model")
    if cached is None or cached[0] is not model or cached[1] != key:
        device = model_device_dtype(model)[0]
        _CACHE.clear()
        _CACHE["model"] = (model, key, torch.compile(model, mode=compile_mode(device), fullgraph=True,
                                                      dynamic=False))
    return _CACHE["model"][2]


def compile_for_graph(model):
    """torch.compile(model) for capture inside the `graph` backend's CUDA graph: mode "default"
    (Inductor's kernels, none of its own CUDA graphs), fullgraph=True, dynamic=False. Not cached
    here: the graph backend caches the whole captured sampler (graph.py)."""
    return torch.compile(model, mode="default", fullgraph=True, dynamic=False)
