"""The `compile` backend: the U-Net through torch.compile (TorchInductor), with every
GroupNorm(+emb)(+SiLU) as the custom op `fastddpm::group_norm_silu` (kernels/group_norm_op.py).

The op is one node Dynamo records without a graph break: on CUDA it runs our fused Triton
kernel and Inductor fuses the rest of the model around it; on CPU it is the torch twin.

Mode: "max-autotune-no-cudagraphs" is NOT the default: its autotuning costs minutes per shape.
We use "default" on CPU and "reduce-overhead" on CUDA (Inductor's fused kernels plus its own
CUDA graphs, which remove the launch gaps that dominate a 32x32 U-Net), with fullgraph=True so
a graph break is an error rather than a silent slow path. Only the model is compiled; the step
update stays `reference_step` (a few elementwise ops). The `graph` backend captures the same
compiled model (`compile_for_graph`, mode "default": no CUDA graphs of Inductor's own inside
ours) together with the fused step in one CUDA graph.

Shapes: the batch is dynamic, everything else static. Every call marks dim 0 of x and t
dynamic (`torch._dynamo.maybe_mark_dynamic`, `_BatchDynamic`) on a wrapper compiled with
dynamic=False (no automatic dynamic shapes for the other dims, which a model's config fixes).
So one Dynamo/Inductor compile serves every batch size >= 2, and batch 1 gets a second one
(Dynamo specialises sizes 0 and 1; "maybe" makes that a specialisation, not an error): two
cache entries on the model's forward, however many batch sizes a long-lived process samples.
With static shapes each new batch size was a full recompile and one more cache entry, and the
9th hit Dynamo's recompile limit (torch._dynamo.config.recompile_limit, 8), which fullgraph=True
turns into FailOnRecompileLimitHit. Why this and not the alternatives:
  - CUDA graphs specialise on shapes whatever Inductor's code does: "reduce-overhead" records
    one graph per distinct input size (its CUDA graph trees; the graphs share one memory pool,
    and Inductor warns past torch._inductor.config.triton.cudagraph_dynamic_shape_warn_limit
    sizes), and the graph backend captures one graph per shape (graph.GraphSampler). Per-shape
    Inductor code buys nothing there; a dynamic batch leaves per shape only the recording or
    capture that a CUDA graph needs anyway, not a compile.
  - Raising the recompile limit (even scoped, with torch._dynamo.config.patch) only moves the
    failure, and every shape still costs a compile and a cache entry that is never evicted.
  - An LRU of compiled wrappers per shape bounds nothing: Dynamo keeps its cache on the code
    object (the model's forward), shared by every wrapper of that model (wrappers with equal
    settings reuse each other's entries), so dropping a wrapper frees no entry and resets no count.
The price: Inductor's own kernels (bias and residual adds, layout copies) index with a runtime
batch size. Convolutions and matmuls are library calls planned per call, and the GroupNorm+SiLU
op plans its launch from the real tensors, so the cost should be small; UNVERIFIED on a GPU.

The compiled wrapper is cached, one per mode, for one model while its weights fingerprint
(`model_props.weights_fingerprint`) is unchanged: an in-place `.half()` or
`load_state_dict(assign=True)` gets a fresh compile, never code specialised to freed tensors.
Compiled kernels are also cached across runs by Inductor's FX-graph cache (on by default; it
lives in TORCHINDUCTOR_CACHE_DIR, /tmp/torchinductor_$USER unless set), so the second run of a
shape skips most of the compile time.

Tested on CPU (torch 2.13: the op is the torch twin there; tests/test_backends.py samples 12
batch sizes in one process through both compiled paths). The CUDA path (Inductor around the op's
Triton kernel, "reduce-overhead" CUDA graphs, one recorded per batch size) is UNVERIFIED: written
without a GPU; the gpu-marked tests and bench/gpu_check.sh check it on the first lent GPU.
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


class _BatchDynamic:
    """A compiled model whose calls mark the batch dim (dim 0) of x and t dynamic (module docstring)."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, x, t, *args, **kwargs):
        for a in (x, t):
            if isinstance(a, torch.Tensor) and a.ndim:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        return self.compiled(x, t, *args, **kwargs)


def _compiled(model, mode: str) -> _BatchDynamic:
    """torch.compile(model, mode=mode, fullgraph=True, dynamic=False) with a dynamic batch, cached
    per mode while the model and its weights fingerprint are the same (one model per mode kept)."""
    key = weights_fingerprint(model)
    cached = _CACHE.get(mode)
    if cached is None or cached[0] is not model or cached[1] != key:
        _CACHE[mode] = (model, key, _BatchDynamic(torch.compile(model, mode=mode, fullgraph=True, dynamic=False)))
    return _CACHE[mode][2]


def compile_model(model):
    """torch.compile(model) with `compile_mode`, fullgraph=True, a dynamic batch and static other
    dims (module docstring); registers the custom GroupNorm+SiLU op first (the backend swaps it
    into the model). Cached per model and weights fingerprint; at most one compiled model is kept
    alive per mode."""
    from .kernels.group_norm_op import register

    register()
    return _compiled(model, compile_mode(model_device_dtype(model)[0]))


def compile_for_graph(model):
    """torch.compile(model) for capture inside the `graph` backend's CUDA graph: mode "default"
    (Inductor's kernels, none of its own CUDA graphs), fullgraph=True, a dynamic batch (module
    docstring). Cached as compile_model's, so a sampler captured for a new shape (graph.py keeps
    one at a time) reuses the compiled code and only captures."""
    return _compiled(model, "default")
