"""The `onnx` backend: sampling in ONNX Runtime through the numpy loop of ort_sample.py.

`fastddpm sample --backend onnx --onnx model.onnx` loads the file with `load_onnx` (the model
config, schedule and diffusion settings come from its metadata) and `sample(...)` hands the
whole loop to `run` (the backend's run hook), which calls `ort_sample.sample_loop`: the very
code the torch-free script runs, so both give the same samples.

`sample(unet, diffusion, backend="onnx")` with a plain fastddpm UNet also works: the model is
exported in memory (eps graph, its own dtype; cached while its weights are unchanged) and
sampled the same way. Every sampler, spacing (a respaced `diffusion`) and variance
(`diffusion.with_variance(...)`, Analytic-DPM's from a calibrated export's Gamma table) runs, and
`x_T` is honoured.
"""
from __future__ import annotations

import importlib.util
import weakref

import numpy as np
import torch

from fastddpm.diffusion import GaussianDiffusion
from fastddpm.errors import BackendUnavailableError, CheckpointError, FastDDPMError
from fastddpm.options import SampleOptions, options_from
from fastddpm.unet import UNet
from fastddpm.validate import betas_tensor, diffusion_settings
from fastddpm.validate import unet_config as validated_unet_config

from . import ort_sample

_DTYPE_NAMES = {"fp32": torch.float32, "fp16": torch.float16}


class OnnxEpsModel:
    """A fastddpm .onnx file as a model object for `sample(..., backend="onnx")`.

    config   the UNetConfig from the file; ort  the ort_sample.OnnxModel (session + description).
    Calling it, model(x [B, C, H, W], t [B] int64) -> output [B, C_out, H, W] float32 (eps
    graphs only), lets the generic loop use it too.
    """

    def __init__(self, ort_model: ort_sample.OnnxModel):
        self.ort = ort_model
        # the same checks as a checkpoint's config: field types, ranges, parameter count (CheckpointError)
        self.config = validated_unet_config(ort_model.unet, repr(ort_model.path))
        self.dtype = _DTYPE_NAMES.get(ort_model.dtype, torch.float32)

    def to(self, dtype=None, device=None, memory_format=None) -> "OnnxEpsModel":
        """Accepts only the file's own dtype: the precision of an .onnx file is fixed at export.

        device and memory_format are accepted and ignored: the provider was chosen at load time
        and ONNX Runtime picks its own layouts.
        """
        if isinstance(dtype, torch.dtype) and dtype != self.dtype:
            want = {v: k for k, v in _DTYPE_NAMES.items()}.get(dtype, str(dtype))
            raise FastDDPMError(f"{self.ort.path!r} was exported as {self.ort.dtype}; sample it with --dtype "
                                f"{self.ort.dtype} (or export again with --dtype {want})")
        return self

    def eval(self) -> "OnnxEpsModel":
        """No-op (an ONNX graph has no training mode), so code written for nn.Module works."""
        return self

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        try:
            out = self.ort.eps(x.detach().to("cpu", torch.float32).numpy(), t.to("cpu", torch.int64).numpy())
        except ort_sample.SampleError as e:
            raise FastDDPMError(str(e)) from None
        return torch.from_numpy(out).to(x.device)

    def diffusion(self) -> GaussianDiffusion:
        """The full diffusion process stored in the file, with its Analytic-DPM table (`gamma`) if it has one."""
        source = repr(self.ort.path)
        if self.ort.betas is None:
            raise CheckpointError(f"{source} holds no betas")
        betas = betas_tensor(torch.from_numpy(self.ort.betas.copy()), source)
        settings = diffusion_settings(self.ort.diffusion, len(betas), source)
        gamma = None if self.ort.gamma is None else torch.from_numpy(self.ort.gamma.copy())
        try:
            return GaussianDiffusion(betas, **settings, gamma=gamma)
        except FastDDPMError as e:
            raise CheckpointError(f"{source}: {e}") from None


def _provider(device) -> str:
    """ONNX Runtime provider choice for a device: "auto" stays "auto" (CUDA when onnxruntime-gpu finds a GPU)."""
    if isinstance(device, str) and device == "auto":
        return "auto"
    device = torch.device(device) if device is not None else torch.device("cpu")
    return "cuda" if device.type == "cuda" else "cpu"


def load_onnx(path, device="cpu") -> tuple[OnnxEpsModel, GaussianDiffusion]:
    """(model, full diffusion) of a `fastddpm export` file, on ONNX Runtime's CPU or CUDA provider.

    device: "cpu", "cuda" or "auto" (ONNX Runtime's CUDA provider when onnxruntime-gpu finds a GPU,
    whether or not torch was built with CUDA). A missing, truncated or foreign file raises
    CheckpointError (exit 2 on the command line).
    """
    provider = _provider(device)
    if provider != "auto":
        onnx_available(torch.device(provider))
    elif importlib.util.find_spec("onnxruntime") is None:
        onnx_available(torch.device("cpu"))  # raises the "needs onnxruntime" error
    try:
        model = OnnxEpsModel(ort_sample.OnnxModel(path, provider=provider))
    except ort_sample.SampleError as e:
        raise CheckpointError(str(e)) from None
    return model, model.diffusion()


def onnx_available(device: torch.device) -> None:
    """The backend's check: onnxruntime is installed and, for a CUDA device, offers the CUDA provider."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise BackendUnavailableError("backend 'onnx' needs onnxruntime (pip install onnxruntime, or "
                                      "fastddpm[gpu] for onnxruntime-gpu)")
    if device.type == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise BackendUnavailableError("backend 'onnx' on CUDA needs onnxruntime-gpu (pip install fastddpm[gpu]); "
                                          "this onnxruntime has no CUDA execution provider")
    elif device.type != "cpu":
        raise BackendUnavailableError(f"backend 'onnx' cannot run on device {device.type!r}")


# In-memory exports by model, reused while the weights are unchanged (a benchmark calls
# sample() again and again): the fingerprint holds every parameter's storage, in-place version,
# dtype and device.
_EXPORTS: "weakref.WeakKeyDictionary[UNet, tuple]" = weakref.WeakKeyDictionary()


def _fingerprint(model: UNet) -> tuple:
    return tuple((p.data_ptr(), p._version, p.dtype, str(p.device)) for p in model.parameters())


def _in_memory(model: UNet, diffusion: GaussianDiffusion) -> ort_sample.OnnxModel:
    """Export a UNet to an eps graph in memory (cached) and open it on the provider for its device."""
    from .onnx_export import trace_onnx

    key = _fingerprint(model)
    cached = _EXPORTS.get(model)
    if cached is not None and cached[0] == key:
        ort_model = cached[1]
    else:
        p = next(model.parameters())
        names = {v: k for k, v in _DTYPE_NAMES.items()}
        if p.dtype not in names:
            raise FastDDPMError(f"backend 'onnx' exports fp32 or fp16 models, not {p.dtype}")
        proto = trace_onnx(model, dtype=names[p.dtype])
        description = {"format": ort_sample.FORMAT, "version": ort_sample.FORMAT_VERSION, "graph": "eps",
                       "dtype": names[p.dtype], "clip_denoised": True, "unet": model.config.to_dict(),
                       "diffusion": diffusion.config(), "betas": None}
        try:
            ort_model = ort_sample.OnnxModel(proto.SerializeToString(), provider=_provider(p.device),
                                             description=description)
        except ort_sample.SampleError as e:
            raise FastDDPMError(str(e)) from None
        _EXPORTS[model] = (key, ort_model)
    return ort_model


def _ort_model_for(model, diffusion: GaussianDiffusion) -> ort_sample.OnnxModel:
    if isinstance(model, OnnxEpsModel):
        return model.ort
    if isinstance(model, UNet):
        return _in_memory(model, diffusion)
    raise FastDDPMError("backend 'onnx' samples a model loaded with fastddpm.export.ort_backend.load_onnx "
                        f"or a fastddpm UNet, not {type(model).__name__}")


def warmup(model, diffusion: GaussianDiffusion, shape, options: SampleOptions | None = None, *, device=None,
           dtype=None, **settings) -> None:
    """The backend's warmup hook: the in-memory export (for a UNet) and one run of the graph at `shape`,
    where ONNX Runtime allocates its buffers, so that `run` measures the steady state. The sampler
    settings (options, or SampleOptions keywords) pick the step graph's coefficients."""
    opts = options_from(options, **settings)
    ort_model = _ort_model_for(model, diffusion)
    try:
        shape = ort_model.check_shape(shape)
        x = ort_sample.noise(0, ort_sample.XT_STEP, shape)
        t = np.full((shape[0],), int(diffusion.timesteps[-1]), dtype=np.int64)
        if ort_model.kind == "step":
            process = numpy_process(diffusion)
            ort_model.step(x, t, process.coefficients(process.num_steps - 1, opts.sampler, opts.eta), x, x)
        else:
            ort_model.eps(x, t)
    except ort_sample.SampleError as e:
        raise FastDDPMError(str(e)) from None


def numpy_process(diffusion: GaussianDiffusion) -> ort_sample.Process:
    """ort_sample's float64 twin of `diffusion` (possibly respaced, any var_type including "analytic"):
    the same betas, timesteps, mean and variance types, output channels (learn_sigma) and Gamma table."""
    gamma = None if diffusion.gamma is None else diffusion.gamma.numpy()
    return ort_sample.Process(diffusion.schedule.betas.numpy(), diffusion.timesteps.numpy(), diffusion.mean_type,
                              diffusion.var_type, learn_sigma=diffusion.learn_sigma, gamma=gamma)


def loop_settings(options: SampleOptions) -> dict:
    """The keywords of `ort_sample.sample_loop` that mirror SampleOptions (the torch-free file
    cannot import fastddpm, so it takes plain arguments with the same names); progress and
    callback are adapted by `run`."""
    return {"seed": options.seed, "sample_offset": options.sample_offset, "sampler": options.sampler,
            "eta": options.eta, "clip_denoised": options.clip_denoised}


def run(model, diffusion: GaussianDiffusion, shape, options: SampleOptions | None = None, *, device=None,
        dtype=None, x_T: torch.Tensor | None = None, **settings) -> torch.Tensor:
    """The backend's run hook (see fastddpm.sampling.sample): the whole loop in ONNX Runtime + numpy.

    `diffusion` (possibly respaced) defines the tables, exactly as for the reference loop; the
    sampler settings come from `options` (or SampleOptions keywords in `settings`). Returns
    x_0 [B, C, H, W] float32 on the CPU.
    """
    from tqdm.auto import tqdm

    opts = options_from(options, **settings)
    callback, progress = opts.callback, opts.progress
    ort_model = _ort_model_for(model, diffusion)
    if dtype not in (None, torch.float32):
        raise FastDDPMError(f"backend 'onnx' keeps the sampler state in float32, not {dtype}")
    try:
        process = numpy_process(diffusion)
    except ort_sample.SampleError as e:
        raise FastDDPMError(str(e)) from None
    bar = tqdm(total=process.num_steps, disable=not progress, desc="sampling", unit="step", leave=False)

    def torch_callback(info):
        callback({**info, "x": torch.from_numpy(np.array(info["x"])),
                  "pred_x0": torch.from_numpy(np.array(info["pred_x0"]))})

    try:
        x = ort_sample.sample_loop(ort_model, process, shape, **loop_settings(opts),
                                   x_T=None if x_T is None else x_T.detach().to("cpu", torch.float32).numpy(),
                                   callback=torch_callback if callback is not None else None,
                                   progress=(lambda index: bar.update(1)) if progress else None)
    except ort_sample.SampleError as e:
        raise FastDDPMError(str(e)) from None
    finally:
        bar.close()
    return torch.from_numpy(x)
