"""The `graph` backend: the whole sampling step captured in one CUDA graph and replayed.

One step is: the U-Net forward (with the fused Triton GroupNorm+SiLU kernels), the fused step
update x_{t-1} = cx x_t + c0 x0 + ce eps + cp prev_x0 + sigma z (kernels/step.py: every sampler,
ancestral, ddim, dpm++2m and dpm++2m-sde, with any variance; noise drawn in the kernel), and
k -= 1 on a device counter. Everything the step reads lives in static device buffers: the state
x, the step index k, the noise key (seed, sample_offset), the float32 schedule tables, and for
the multistep solvers the previous x0 prediction (the pred_x0 buffer: the kernel reads it as
prev_x0 and writes the new prediction over it in the same launch; its coefficient is 0 at the
first step, and `reset` zero-fills it on the device before every run, since 0 * stale NaN would
still be NaN). So the captured graph advances the sampler by one step per replay with no host
work and no host sync (`GraphSampler.run` writes the seed and offset into the static key buffer
in place, and reads timesteps from a host list built at construction: no sync before or inside
the replay loop), and the same graph serves every step: the loop is `for _ in range(K): graph.replay()`.
Optionally `steps_per_graph` consecutive steps are captured in one graph (fewer replays).

What is captured (`graph_capture`, a SampleOptions field):
    "compiled"  (default) the U-Net under torch.compile (Inductor's default mode: its own
                kernels, WITHOUT its own CUDA graphs) with every GroupNorm+SiLU as the custom op
                `fastddpm::group_norm_silu` (kernels/group_norm_op.py, our Triton kernel), so
                Inductor fuses the bias adds, residual adds and layout conversions around it;
                compiled during the warm-up, then captured together with the step. The
                compiled model is cached per model with a dynamic batch (compiled.py), so a
                sampler for a new batch size captures again but does not compile again.
    "eager"     the module as it is, with the Triton launcher as its GroupNorm+SiLU.

Cache: one captured sampler, reused while the model's weights fingerprint
(`model_props.weights_fingerprint`: storage addresses, dtypes, shapes, in-place versions), the
process, the shape and the settings are unchanged. An in-place `.half()` or
`load_state_dict(assign=True)` changes the fingerprint, so the graph is captured again instead
of replaying pointers to freed memory.

Capture follows PyTorch's recipe (and stable-fast's): a warm-up on a side stream so lazy
initialisation (cuBLAS/cuDNN handles, Triton compilation, autotuning) happens outside the
capture, then `torch.cuda.graph`. Capture and warm-up time is reported apart from the steady
state (`GraphSampler.capture_seconds`).

Precision and layout: the model runs in its parameters' dtype (bf16/fp16 for speed) with
channels-last activations when its weights are channels-last; the sampler state stays float32;
GroupNorm statistics are float32 inside the kernel; attention is scaled_dot_product_attention.

UNVERIFIED: written without a GPU (none was lent to the sessions that wrote it, including the
one that added the multistep solvers' prev_x0 buffer and the analytic variance); the GPU tests in
tests/test_graph.py and bench/gpu_check.sh exercise it on the first lent GPU. On CPU,
tests/test_graph_step_cpu.py walks the captured step function (`reset`, `_step`) for every
sampler against the reference, without the capture.
"""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .diffusion import GaussianDiffusion
from .errors import BackendUnavailableError, FastDDPMError
from .model_props import channels_last, weights_fingerprint
from .noise import XT_STEP, noise
from .options import GRAPH_CAPTURES, MULTISTEP_SAMPLERS, SampleOptions, options_from
from .unet import group_norm_impl

_MASK32 = 0xFFFFFFFF


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

    model          the U-Net (any nn.Module (x, t) -> output whose kernels can be captured)
    diffusion      the (respaced) process; mean_type must be "eps" (the fused step's)
    shape          [B, C, H, W] of the state
    sampler, eta, clip_denoised   as SampleOptions
    state_dtype    dtype of the state x (float32 for a half-precision model)
    steps_per_graph  consecutive steps per captured graph
    keep_pred_x0   also keep the step's x0 prediction (for a per-step callback; always kept for
                   the multistep samplers, whose state it is)
    graph_capture  "compiled" (torch.compile'd U-Net with the custom GroupNorm+SiLU op) or "eager"
    """

    def __init__(self, model, diffusion: GaussianDiffusion, shape, *, sampler: str = "ancestral",
                 eta: float = 0.0, clip_denoised: bool = True, state_dtype: torch.dtype = torch.float32,
                 steps_per_graph: int = 1, keep_pred_x0: bool = False, graph_capture: str = "compiled"):
        from .kernels.step import step_tables

        if diffusion.mean_type != "eps":
            raise BackendUnavailableError(f"backend 'graph' fuses the eps step only, not mean_type "
                                          f"{diffusion.mean_type!r}; use backend 'reference'")
        if graph_capture not in GRAPH_CAPTURES:
            raise FastDDPMError(f"unknown graph_capture {graph_capture!r}; choose one of "
                                f"{', '.join(map(repr, GRAPH_CAPTURES))}")
        p = next(model.parameters())
        self.device, self.model_dtype = p.device, p.dtype
        graph_available(self.device)
        self.model, self.diffusion, self.shape = model, diffusion, tuple(shape)
        self.clip_denoised = clip_denoised
        self.num_steps = diffusion.num_steps
        self.steps_per_graph = max(1, min(int(steps_per_graph), self.num_steps))
        self.graph_capture = graph_capture
        self.sampler = sampler
        self.multistep = sampler in MULTISTEP_SAMPLERS
        self.tables = step_tables(diffusion, self.device, sampler, eta)
        self.timesteps = [int(t) for t in diffusion.timesteps.tolist()]  # host copy: run() reads no device value
        self.memory_format = torch.channels_last if channels_last(model) else torch.contiguous_format
        self.forward, self.group_norm = self._model_call(model, graph_capture)
        # Static buffers: every replay reads and writes only these.
        self.x = torch.zeros(self.shape, dtype=state_dtype, device=self.device)
        self.k = torch.zeros((), dtype=torch.int64, device=self.device)
        self.key = torch.zeros(2, dtype=torch.int64, device=self.device)  # (seed mod 2^32, sample_offset)
        # The x0 prediction; for the multistep solvers also their state (read as prev_x0, then overwritten).
        self.pred_x0 = torch.zeros_like(self.x) if keep_pred_x0 or self.multistep else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_seconds = 0.0

    @staticmethod
    def _model_call(model, graph_capture: str):
        """(the callable to capture, the GroupNorm+SiLU it runs with) for graph_capture."""
        if graph_capture == "compiled":
            from .compiled import compile_for_graph
            from .kernels.group_norm_op import group_norm_silu_op, register

            register()  # before Dynamo traces the op
            return compile_for_graph(model), group_norm_silu_op
        from .kernels.group_norm import group_norm_silu

        return model, group_norm_silu

    def _step(self) -> None:
        """One reverse step on the static buffers, then k -= 1 (all device work)."""
        from .kernels.step import fused_step

        # index_select with a device index (a 0-d tensor used as an index would be read on the host)
        t = torch.index_select(self.tables.timesteps, 0, self.k.reshape(1)).expand(self.shape[0])
        x_in = self.x.to(dtype=self.model_dtype, memory_format=self.memory_format)
        out = self.forward(x_in, t)
        fused_step(self.tables, self.x, out, self.k, self.key, clip_denoised=self.clip_denoised, out=self.x,
                   pred_x0=self.pred_x0, prev_x0=self.pred_x0 if self.multistep else None)
        self.k.sub_(1)

    def reset(self, x_T: torch.Tensor, seed: int, sample_offset: int = 0) -> None:
        """Set the static buffers for a run from x_T: the state, the noise key (written in place,
        `fill_` from host scalars), k = K - 1, and the x0 prediction zero-filled (a device fill:
        the multistep solvers read it at the first step with coefficient 0, and 0 * a stale NaN is
        NaN). Device work only, no host sync."""
        if not 0 <= int(sample_offset) < 2**32:
            raise FastDDPMError(f"sample_offset {sample_offset} does not fit the 32-bit sample counter")
        self.x.copy_(x_T)
        self.key[0].fill_(int(seed) & _MASK32)
        self.key[1].fill_(int(sample_offset))
        self.k.fill_(self.num_steps - 1)
        if self.pred_x0 is not None:
            self.pred_x0.zero_()

    def capture(self) -> None:
        """Warm up on a side stream (compiling the model when graph_capture is "compiled"), then
        capture graphs of steps_per_graph steps (and of the remainder)."""
        torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        with torch.no_grad(), group_norm_impl(self.model, self.group_norm):
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # compile (Dynamo, Inductor, Triton), pick cuDNN algorithms, allocate
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
            callback=None) -> torch.Tensor:
        """Sample from x_T [B, C, H, W]: K replays, no host sync before or inside the loop.

        The seed and offset are written into the static key in place (`fill_` from host scalars,
        no pageable copy). callback as SampleOptions.callback (needs steps_per_graph = 1).
        Returns x_0 [B, C, H, W] (a copy of the state buffer).
        """
        n = self.steps_per_graph
        if callback is not None and n != 1:
            raise BackendUnavailableError("a per-step callback needs steps_per_graph=1")
        if not 0 <= int(sample_offset) < 2**32:
            raise FastDDPMError(f"sample_offset {sample_offset} does not fit the 32-bit sample counter")
        if not self.graphs:
            self.capture()
        self.reset(x_T, seed, sample_offset)
        bar = tqdm(total=self.num_steps, disable=not progress, desc="sampling (graph)", unit="step", leave=False)
        done = 0
        while done < self.num_steps:
            chunk = min(n, self.num_steps - done)
            self.graphs[chunk].replay()
            done += chunk
            bar.update(chunk)
            if callback is not None:
                k = self.num_steps - done
                callback({"index": done - 1, "k": k, "t": self.timesteps[k], "x": self.x.clone(),
                          "pred_x0": self.pred_x0.clone() if self.pred_x0 is not None else None})
        bar.close()
        return self.x.clone()


_CACHE: dict = {}


def _sampler_for(model, diffusion, shape, options: SampleOptions, dtype, keep_pred_x0: bool) -> GraphSampler:
    """The captured sampler for this model, process, shape and settings: reused while the model's
    weights fingerprint and everything else stay the same (module docstring), captured again otherwise."""
    if options.callback is not None and options.steps_per_graph != 1:  # refused before any capture
        raise BackendUnavailableError("a per-step callback needs steps_per_graph=1")
    key = (weights_fingerprint(model), tuple(shape), options.sampler, options.eta, options.clip_denoised, dtype,
           options.steps_per_graph, keep_pred_x0, options.graph_capture)
    cached = _CACHE.get(key)
    if cached is None or cached.model is not model or cached.diffusion is not diffusion:
        _CACHE.clear()  # one captured sampler at a time: its buffers hold the activations' memory
        cached = GraphSampler(model, diffusion, shape, sampler=options.sampler, eta=options.eta,
                              clip_denoised=options.clip_denoised, state_dtype=dtype,
                              steps_per_graph=options.steps_per_graph, keep_pred_x0=keep_pred_x0,
                              graph_capture=options.graph_capture)
        _CACHE[key] = cached
    if not cached.graphs:
        cached.capture()
    return cached


def warmup(model, diffusion: GaussianDiffusion, shape, options: SampleOptions | None = None, *, device=None,
           dtype=torch.float32, **settings) -> None:
    """`Backend.warmup` for "graph": build, compile and capture now, so the timed run only replays."""
    opts = options_from(options, **settings)
    _sampler_for(model, diffusion, shape, opts, dtype, keep_pred_x0=opts.callback is not None)


def run(model, diffusion: GaussianDiffusion, shape, options: SampleOptions | None = None, *, device,
        dtype=torch.float32, x_T: torch.Tensor | None = None, **settings) -> torch.Tensor:
    """`Backend.run` for "graph": replay the (cached) captured step K times from x_T.

    shape [B, C, H, W]; the settings come from `options` (or SampleOptions keywords in
    `settings`); x_T, if given, replaces the seeded starting noise. Returns x_0 [B, C, H, W] in `dtype`, unclipped (sample() clips).
    """
    opts = options_from(options, **settings)
    cached = _sampler_for(model, diffusion, shape, opts, dtype, keep_pred_x0=opts.callback is not None)
    if x_T is None:
        x_T = noise(opts.seed, XT_STEP, shape, opts.sample_offset, dtype=dtype, device=device)
    return cached.run(x_T, opts.seed, opts.sample_offset, progress=opts.progress, callback=opts.callback)
