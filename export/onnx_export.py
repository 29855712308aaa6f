"""Export a fastddpm model to one self-describing ONNX file.

    export_onnx(model, diffusion, out, dtype="fp32", step_graph=False)   a UNet in memory
    export_checkpoint(checkpoint, out, ...)                             `fastddpm export`

The file holds the eps-model (or the whole step, see step_graph.py) with a dynamic batch
dimension, float32 inputs and outputs (an fp16 export casts at its edges), and under the ONNX
metadata key "fastddpm" a JSON description that makes it enough to sample on its own:

    {"format": "fastddpm-onnx", "version": "2", "graph": "eps" | "step", "dtype": "fp32" | "fp16",
     "group_norm": "instancenorm" | "groupnorm21", "opset": 17 | 21, "clip_denoised": true,
     "unet": UNetConfig.to_dict(), "diffusion": GaussianDiffusion.config(),
     "betas": [T float64 values, exact as JSON numbers], "gflop_per_image_forward": ..., "meta": {...},
     "gamma": [T values]  (only for a calibrated model: Analytic-DPM's Gamma_t, for --variance analytic)}

Version 2 changed the step graph (prev_x0 input, 14 coefficients; step_graph.py); the eps graph is
as in version 1, and ort_sample.py still reads version-1 eps graphs.

Exporter: the TorchScript exporter (`torch.onnx.export(..., dynamo=False)`). The dynamo
exporter, torch's default since 2.9, needs the onnxscript package, which fastddpm does not
otherwise need; the TorchScript one traces this static U-Net exactly, lets us pick the opset
(it stops at 20) and supports the custom symbolic behind the GroupNorm placeholder
(group_norm_onnx.py). Every graph is checked with onnx.checker (full_check) before it is used.

GroupNorm form: "instancenorm" by default. On ONNX Runtime's CPU provider it measured faster
than GroupNormalization-21, which ORT 1.32 runs by expanding its function body (numbers in
bench/bench_onnx.py); see group_norm_onnx.py for the opset-18/21 and com.microsoft traps.
"""
from __future__ import annotations

import copy
import io
import json
import warnings
from pathlib import Path

import onnx
import torch

from fastddpm.unet import group_norm_impl
from fastddpm.checkpoint import load_checkpoint
from fastddpm.diffusion import GaussianDiffusion
from fastddpm.errors import FastDDPMError, check_choice
from fastddpm.files import atomic_write_bytes, ensure_writable_dir
from fastddpm.unet import UNet
from fastddpm.validate import ANALYTIC_KEY

from . import ort_sample
from .group_norm_onnx import DOMAIN, FORMS, lower_group_norm, onnx_group_norm_silu
from .step_graph import EpsGraph, StepGraph

EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
TRACE_OPSET = 17  # the TorchScript exporter's opset; "groupnorm21" is converted to 21 afterwards
DEFAULT_GROUP_NORM = "instancenorm"


def _trace(module: torch.nn.Module, model: UNet, inputs: tuple, input_names: list,
           output_names: list) -> onnx.ModelProto:
    """torch.onnx.export of `module` with a dynamic batch on every input and output but `coef`."""
    dynamic = {name: {0: "batch"} for name in input_names + output_names if name != "coef"}
    buf = io.BytesIO()
    with warnings.catch_warnings(), group_norm_impl(model, onnx_group_norm_silu):
        # The TorchScript exporter warns that it is deprecated in favour of dynamo (see module docstring).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
        torch.onnx.export(module, inputs, buf, dynamo=False, opset_version=TRACE_OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic, custom_opsets={DOMAIN: 1},
                          do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def describe(model: UNet, diffusion: GaussianDiffusion, *, graph: str, dtype: str, group_norm: str, opset: int,
             clip_denoised: bool, meta: dict | None = None) -> dict:
    """The JSON-able description stored in the file's metadata (module docstring)."""
    from fastddpm.unet import forward_gflops

    description = {"format": ort_sample.FORMAT, "version": ort_sample.FORMAT_VERSION, "graph": graph, "dtype": dtype,
                   "group_norm": group_norm, "opset": opset, "clip_denoised": clip_denoised,
                   "unet": model.config.to_dict(), "diffusion": diffusion.config(),
                   "betas": [float(b) for b in diffusion.schedule.betas.tolist()],
                   "gflop_per_image_forward": forward_gflops(model.config), "meta": meta or {}}
    if diffusion.gamma is not None:  # a calibrated model: Analytic-DPM's table, per original timestep
        description["gamma"] = [float(g) for g in diffusion.gamma.tolist()]
    return description


def trace_onnx(model: UNet, dtype: str = "fp32", step_graph: bool = False, group_norm: str = DEFAULT_GROUP_NORM,
               mean_type: str = "eps", var_type: str = "fixedlarge", clip_denoised: bool = True) -> onnx.ModelProto:
    """The lowered ONNX graph of `model`, checked by onnx.checker (full_check), without metadata.

    model      a fastddpm UNet (not modified: a copy is cast to `dtype` and traced on the CPU)
    dtype      "fp32" or "fp16" (compute dtype; inputs and outputs stay float32)
    step_graph the whole step (StepGraph) for the process settings mean_type, var_type and
               clip_denoised; otherwise the eps-model alone (EpsGraph)
    group_norm "instancenorm" (default) or "groupnorm21" (see group_norm_onnx.py)
    """
    check_choice("export dtype", dtype, tuple(EXPORT_DTYPES))
    check_choice("GroupNorm form", group_norm, FORMS)
    if not isinstance(model, UNet):
        raise FastDDPMError(f"ONNX export takes a fastddpm UNet, got {type(model).__name__}")
    c = model.config
    net = copy.deepcopy(model).to(device="cpu", dtype=EXPORT_DTYPES[dtype]).eval()
    gen = torch.Generator().manual_seed(0)  # trace inputs; the caller's RNG state stays untouched
    x = torch.randn(2, c.in_channels, c.image_size, c.image_size, generator=gen)
    t = torch.tensor([3, 999], dtype=torch.int64)
    if step_graph:
        module = StepGraph(net, EXPORT_DTYPES[dtype], mean_type, var_type, clip_denoised)
        coef = torch.rand(len(ort_sample.COEF_NAMES), generator=gen)
        z, prev_x0 = torch.randn(x.shape, generator=gen), torch.randn(x.shape, generator=gen)
        proto = _trace(module, net, (x, t, coef, z, prev_x0), ["x", "t", "coef", "z", "prev_x0"], ["x_prev", "pred_x0"])
    else:
        proto = _trace(EpsGraph(net, EXPORT_DTYPES[dtype]), net, (x, t), ["x", "t"], ["out"])
    proto = lower_group_norm(proto, group_norm)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:  # a bug here, not bad input: keep the details
        raise RuntimeError(f"the exported ONNX graph failed onnx.checker: {e}") from e
    return proto


def build_onnx(model: UNet, diffusion: GaussianDiffusion, dtype: str = "fp32", step_graph: bool = False,
               group_norm: str = DEFAULT_GROUP_NORM, clip_denoised: bool = True,
               meta: dict | None = None) -> onnx.ModelProto:
    """The checked ModelProto of `model` with its description as metadata (arguments: trace_onnx).

    diffusion  the FULL process the model was trained with: its betas and settings go into the
               metadata (respacing happens at sampling time).
    clip_denoised  clip the predicted x0 to [-1, 1] (images): built into a step graph, and
               recorded in the metadata for the sampler of an eps graph.
    """
    if diffusion.num_steps != diffusion.num_timesteps:
        raise FastDDPMError("export the full diffusion process, not a respaced one (respacing happens at sampling)")
    # the trained variance: a learned-variance model keeps its variance channels whatever var_type samples it
    proto = trace_onnx(model, dtype, step_graph, group_norm, diffusion.mean_type, diffusion.trained_var_type,
                       clip_denoised)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    description = describe(model, diffusion, graph="step" if step_graph else "eps", dtype=dtype,
                           group_norm=group_norm, opset=opset, clip_denoised=clip_denoised, meta=meta)
    onnx.helper.set_model_props(proto, {ort_sample.META_KEY: json.dumps(description)})
    proto.producer_name, proto.doc_string = "fastddpm", "fastddpm DDPM U-Net; sample with ort_sample.py"
    return proto


def export_onnx(model: UNet, diffusion: GaussianDiffusion, out, dtype: str = "fp32", step_graph: bool = False,
                group_norm: str = DEFAULT_GROUP_NORM, clip_denoised: bool = True, meta: dict | None = None) -> dict:
    """Write `model` as one ONNX file at `out` (atomically); returns the stored description.

    See build_onnx for the arguments. The file alone is enough to sample:
    `python ort_sample.py --onnx out` or `fastddpm sample --backend onnx --onnx out`.
    """
    if Path(out).is_dir():
        raise FastDDPMError(f"--out {str(out)!r} is a folder; name the .onnx file to write")
    ensure_writable_dir(Path(out).parent)  # fail before the export, not after it
    proto = build_onnx(model, diffusion, dtype, step_graph, group_norm, clip_denoised, meta)
    atomic_write_bytes(out, proto.SerializeToString())
    return json.loads(proto.metadata_props[0].value)


def export_checkpoint(checkpoint, out, dtype: str = "fp32", step_graph: bool = False,
                      group_norm: str = DEFAULT_GROUP_NORM) -> dict:
    """`fastddpm export`: load a checkpoint (path or bundled name) and export it to `out`."""
    check_choice("export dtype", dtype, tuple(EXPORT_DTYPES))
    model, diffusion, meta = load_checkpoint(checkpoint, device="cpu")  # a calibrated one: diffusion.gamma
    if isinstance(meta.get(ANALYTIC_KEY), dict):  # the table travels once, as the description's "gamma"
        meta = {**meta, ANALYTIC_KEY: {k: v for k, v in meta[ANALYTIC_KEY].items() if k != "gamma"}}
    return export_onnx(model, diffusion, out, dtype=dtype, step_graph=step_graph, group_norm=group_norm,
                       clip_denoised=bool(meta.get("clip_denoised", True)),  # as `fastddpm sample` honours it
                       meta={"checkpoint": str(checkpoint), **_json_safe(meta)})


def _json_safe(meta: dict) -> dict:
    """The JSON-serialisable part of a checkpoint's meta (everything else is dropped)."""
    safe = {}
    for key, value in meta.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        safe[key] = value
    return safe
