"""The `graph` backend: the whole sampling step captured in one CUDA graph and replayed.

One step is: the U-Net forward (with the fused Triton GroupNorm+SiLU kernels), the fused step
update x_{t-1} = c1 x0 + c2 x_t + sigma z (kernels/step.py, noise drawn in the kernel), and
k -= 1 on a device counter. Everything the step reads lives in static device buffers: the state
x, the step index k, the noise key (seed, sample_offset), the float32 schedule tables. So the
captured graph advances the sampler by one step per replay with no host work and no host sync,
and the same graph serves every step: the loop is `for _ in range(K): graph.replay()`.
Optionally `steps_per_graph` consecutive steps are captured in one graph (fewer replays).

Capture follows PyTorch's recipe (and stable-fast's): a warm-up on a side stream so lazy
initialisation (cuBLAS/cuDNN handles, Triton compilation, autotuning) happens outside the
capture, then `torch.cuda.graph`. Capture and warm-up time is reported apart from the steady
state (`GraphSampler.capture_seconds`).

Precision and layout: the model runs in its parameters' dtype (bf16/fp16 for speed) with
channels-last activations when its weights are channels-last; the sampler state stays float32;
GroupNorm statistics are float32 inside the kernel; attention is scaled_dot_product_attention.

UNVERIFIED: written without a GPU (none was lent to the session that wrote it); the GPU tests in
tests/test_graph.py and bench/gpu_check.sh exercise it on the first lent GPU.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from tqdm.auto import tqdm

from .backends import group_norm_impl
from .diffusion import GaussianDiffusion
from .errors import BackendUnavailableError
from .noise import XT_STEP, noise
from .sampling import channels_last


def graph_available(device: torch.device) -> None:
    """CUDA graphs need a CUDA device, and the fused kernels need Triton."""
    import importlib.util

    if device.type != "cuda":
        raise BackendUnavailableError(f"backend 'graph' needs a CUDA device (it captures CUDA graphs), "
                                      f"not {device.type!r}")
    if importlib.util.find_spec("triton") is None:
        raise BackendUnavailableError("backend 'graph' needs the triton package for its fused kernels")


class GraphSampler:
    """A captured sampling step for one (model, process, shape, sampler) on a CUDA device.

    model      the U-Net (any callable (x, t) -> output whose kernels can be captured)
    diffusion  the (respaced) process; mean_type must be "eps" (the fused step's)
    shape      [B, C, H, W] of the state
    """

    def __init__(self, model, diffusion: GaussianDiffusion, shape, *, sampler: str = "ancestral",
                 eta: float = 0.0, clip_denoised: bool = True, state_dtype: torch.dtype = torch.float32,
                 steps_per_graph: int = 1, keep_pred_x0: bool = False):
        from .kernels.step import noise_key, step_tables

        if diffusion.mean_type != "eps":
            raise BackendUnavailableError(f"backend 'graph' fuses the eps step only, not mean_type "
                                          f"{diffusion.mean_type!r}; use backend 'reference'")
        p = next(model.parameters())
        self.device, self.model_dtype = p.device, p.dtype
        graph_available(self.device)
        self.model, self.diffusion, self.shape = model, diffusion, tuple(shape)
        self.clip_denoised = clip_denoised
        self.num_steps = diffusion.num_steps
        self.steps_per_graph = max(1, min(int(steps_per_graph), self.num_steps))
        self.tables = step_tables(diffusion, self.device, sampler, eta)
        self.memory_format = torch.channels_last if channels_last(model) else torch.contiguous_format
        # Static buffers: every replay reads and writes only these.
        self.x = torch.zeros(self.shape, dtype=state_dtype, device=self.device)
        self.k = torch.zeros((), dtype=torch.int64, device=self.device)
        self.key = noise_key(0, 0, self.device)
        self.pred_x0 = torch.zeros_like(self.x) if keep_pred_x0 else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0

    def _step(self) -> None:
        """One reverse step on the static buffers, then k -= 1 (all device work)."""
        from .kernels.step import fused_step

        # index_select with a device index (a 0-d tensor used as an index would be read on the host)
        t = torch.index_select(self.tables.timesteps, 0, self.k.reshape(1)).expand(self.shape[0])
        x_in = self.x.to(dtype=self.model_dtype, memory_format=self.memory_format)
        out = self.model(x_in, t)
        fused_step(self.tables, self.x, out, self.k, self.key, clip_denoised=self.clip_denoised, out=self.x,
                   pred_x0=self.pred_x0)
        self.k.sub_(1)

    def capture(self) -> None:
        """Warm up on a side stream, then capture graphs of steps_per_graph steps (and of the remainder)."""
        from .kernels.group_norm import group_norm_silu

        torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        with torch.no_grad(), group_norm_impl(self.model, group_norm_silu):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # compile the Triton kernels, pick cuDNN algorithms, allocate
                    self.k.fill_(self.num_steps - 1)
                    self._step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            pool = None
            sizes = {self.steps_per_graph, self.num_steps % self.steps_per_graph} - {0}
            for n in sorted(sizes, reverse=True):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    for _ in range(n):
                        self._step()
                pool = graph.pool()
                self.graphs[n] = graph
        torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start

    def run(self, x_T: torch.Tensor, seed: int, sample_offset: int = 0, progress: bool = False,
            callback: Callable | None = None) -> torch.Tensor:
        """Sample from x_T [B, C, H, W]: K replays, no host sync inside the loop. Returns x_0 (a copy)."""
        from .kernels.step import noise_key

        if not self.graphs:
            self.capture()
        self.x.copy_(x_T)
        self.key.copy_(noise_key(seed, sample_offset, self.device))
        self.k.fill_(self.num_steps - 1)
        n = self.steps_per_graph
        if callback is not None and n != 1:
            raise BackendUnavailableError("a per-step callback needs steps_per_graph=1")
        timesteps = self.diffusion.timesteps.tolist()
        bar = tqdm(total=self.num_steps, disable=not progress, desc="sampling (graph)", unit="step", leave=False)
        done = 0
        while done < self.num_steps:
            chunk = min(n, self.num_steps - done)
            self.graphs[chunk].replay()
            done += chunk
            bar.update(chunk)
            if callback is not None:
                k = self.num_steps - done
                callback({"index": done - 1, "k": k, "t": timesteps[k], "x": self.x.clone(),
                          "pred_x0": self.pred_x0.clone() if self.pred_x0 is not None else None})
        bar.close()
        return self.x.clone()


_CACHE: dict = {}


def _sampler_for(model, diffusion, shape, *, dtype, sampler, eta, clip_denoised, keep_pred_x0,
                 steps_per_graph: int = 1) -> GraphSampler:
    """The captured sampler for this model, process and shape: reused while they stay the same."""
    key = (id(model), id(diffusion), tuple(shape), sampler, float(eta), clip_denoised, dtype, steps_per_graph,
           keep_pred_x0)
    cached = _CACHE.get(key)
    if cached is None or cached.model is not model or cached.diffusion is not diffusion:
        _CACHE.clear()  # one captured sampler at a time: its buffers hold the activations' memory
        cached = GraphSampler(model, diffusion, shape, sampler=sampler, eta=eta, clip_denoised=clip_denoised,
                              state_dtype=dtype, steps_per_graph=steps_per_graph, keep_pred_x0=keep_pred_x0)
        _CACHE[key] = cached
    if not cached.graphs:
        cached.capture()
    return cached


def warmup(model, diffusion: GaussianDiffusion, shape, *, device, dtype, sampler="ancestral", eta=0.0,
           clip_denoised=True, callback=None, steps_per_graph: int = 1, **_) -> None:
    """`Backend.warmup` for "graph": warm up and capture now, so the timed run only replays."""
    _sampler_for(model, diffusion, shape, dtype=dtype, sampler=sampler, eta=eta, clip_denoised=clip_denoised,
                 keep_pred_x0=callback is not None, steps_per_graph=steps_per_graph)


def run(model, diffusion: GaussianDiffusion, shape, *, device, dtype, seed, sample_offset=0, sampler="ancestral",
        eta=0.0, clip_denoised=True, progress=False, callback=None, steps_per_graph: int = 1):
    """`Backend.run` for "graph": replay the (cached) captured step K times from x_T."""
    cached = _sampler_for(model, diffusion, shape, dtype=dtype, sampler=sampler, eta=eta,
                          clip_denoised=clip_denoised, keep_pred_x0=callback is not None,
                          steps_per_graph=steps_per_graph)
    x_T = noise(seed, XT_STEP, shape, sample_offset, dtype=dtype, device=device)
    return cached.run(x_T, seed, sample_offset, progress=progress, callback=callback)
