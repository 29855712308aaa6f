"""Where a steady-state sampling step's device time goes, by kernel family (torch.profiler).

    python bench/profile_step.py [--device cuda|cpu] [--model cifar10|tiny] [--batch B]
        [--backend graph] [--graph-capture compiled|eager] [--steps N] [--json FILE]

The backend is warmed up on the profiled process and shape (capture, compilation), one untimed
run follows, then one run of N steps is profiled and every kernel's device time is summed by
family and divided by N. The once-per-run work (drawing x_T, the final clamp) is spread over the
N steps with the rest; at N = 10 it is a small part of a step.

On CUDA the events are the GPU kernels (their own durations, so no host time is counted); on a
CPU, where there are no kernels, the ATen operators' self CPU time stands in (that is what
gpu_check.sh's dry run exercises). Families, decided from the kernel's name (`classify`):

    convolutions  cuDNN / CUTLASS convolution kernels (fprop, implicit GEMM, winograd)
    GroupNorm     fastddpm's fused Triton kernels (NCHW `_group_norm_*_kernel`, channels-last
                  `_gn_cl_*_kernel`), ATen's and inductor's group-norm kernels
    attention     fused attention (flash, memory-efficient, cuDNN SDPA) and softmax
    matmul        plain GEMMs outside fused attention: the linear layers (the time embedding and
                  each ResBlock's embedding projection), bmm
    fused step    fastddpm's Triton reverse-step kernel
    elementwise   pointwise kernels: ATen's elementwise loops, inductor's fused pointwise kernels
    other         everything else (copies between layouts, reductions, memset, ...)

UNVERIFIED on a GPU (written without one): the CUDA kernel names the rules expect come from
cuDNN, CUTLASS, ATen and inductor naming as documented and seen in public traces; a kernel the
rules miss lands in `other`, and the JSON lists the largest kernels by name so a miss shows.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable

FAMILIES = ("convolutions", "GroupNorm", "attention", "matmul", "fused step", "elementwise", "other")

# (family, substrings of the lower-cased name), tried in order: the first match wins. Order matters:
# cuDNN's SDPA kernels contain "cudnn", implicit-GEMM convolutions contain "gemm", and inductor's
# kernel names list every ATen op they fused ("triton_poi_fused_convolution_..." is a bias add).
_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GroupNorm", ("group_norm", "groupnorm", "rowwisemoments", "computefusedparams", "_gn_cl_")),
    ("fused step", ("_step_kernel",)),
    ("attention", ("attention", "fmha", "flash", "sdpa", "softmax", "mha_")),
)
_INDUCTOR_PREFIXES = ("triton_poi_", "triton_per_", "triton_red_", "triton_tem_")
_LATER_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("convolutions", ("convolution", "conv2d", "convolve", "fprop", "implicit_gemm", "winograd", "xmma_conv",
                      "_conv_")),
    ("matmul", ("gemm", "bmm", "matmul", "aten::mm", "aten::addmm", "aten::linear")),
    ("elementwise", ("elementwise", "pointwise", "vectorized", "unrolled", "aten::add", "aten::mul", "aten::sub",
                     "aten::div", "aten::silu", "aten::clamp", "aten::where", "aten::fill", "aten::cat",
                     "aten::exp", "aten::sqrt", "aten::neg", "aten::copy", "aten::to", "aten::_to_copy",
                     "aten::sin", "aten::cos", "aten::log", "aten::rsqrt", "aten::pow")),
)


def classify(name: str) -> str:
    """The family (one of FAMILIES) of a kernel or operator by its name."""
    low = name.lower()
    for family, keys in _RULES:
        if any(k in low for k in keys):
            return family
    if low.startswith(_INDUCTOR_PREFIXES):  # inductor's generated kernels: fused pointwise/reductions
        return "elementwise"
    for family, keys in _LATER_RULES:
        if any(k in low for k in keys):
            return family
    return "other"


def summarize(kernels: Iterable[tuple[str, float]], steps: int, top: int = 15) -> dict:
    """Per-family device time of one step from (name, microseconds) pairs of an N-step run.

    Returns {"steps", "us_per_step", "families": {family: {"us_per_step", "share", "launches_per_step"}},
    "top": [{"name", "family", "us_per_step"}, ...]} with every family present (zeros included)
    and the `top` kernels by time, so a kernel the rules put in "other" can be seen by name.
    """
    us, launches, by_name = defaultdict(float), defaultdict(int), defaultdict(float)
    for name, micros in kernels:
        family = classify(name)
        us[family] += micros
        launches[family] += 1
        by_name[name] += micros
    total = sum(us.values())
    families = {f: {"us_per_step": us[f] / steps, "share": us[f] / total if total else 0.0,
                    "launches_per_step": launches[f] / steps} for f in FAMILIES}
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    return {"steps": steps, "us_per_step": total / steps, "families": families,
            "top": [{"name": n, "family": classify(n), "us_per_step": t / steps} for n, t in ranked]}


def format_summary(summary: dict, title: str = "") -> str:
    """The per-family table: time per step, share, launches per step."""
    lines = [title] if title else []
    lines.append(f"{'family':<14}{'us/step':>12}{'share':>9}{'launches/step':>15}")
    for family in FAMILIES:
        f = summary["families"][family]
        lines.append(f"{family:<14}{f['us_per_step']:>12.1f}{100 * f['share']:>8.1f}%{f['launches_per_step']:>15.1f}")
    lines.append(f"{'total':<14}{summary['us_per_step']:>12.1f}{'100.0%' if summary['us_per_step'] else '-':>9}")
    return "\n".join(lines)


def events_of(prof, cuda: bool) -> list[tuple[str, float]]:
    """(name, microseconds) of the profiled kernels (CUDA) or ATen operators' self time (CPU)."""
    from torch.autograd import DeviceType

    if cuda:
        return [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
    return [(e.name, e.self_cpu_time_total) for e in prof.events()
            if e.device_type == DeviceType.CPU and e.name.startswith("aten::") and e.self_cpu_time_total > 0]


def profile_step(device: str, model: str, batch: int, backend: str, steps: int, graph_capture: str | None) -> dict:
    """Warm up, run once, profile one N-step run; returns summarize(...) plus what was profiled."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fastddpm.bench import fast_dtype, random_model
    from fastddpm.ceilings import synchronize
    from fastddpm.generate import default_diffusion, respaced_for
    from fastddpm.sampling import sample, warm_up
    from fastddpm.unet import PRESETS

    dev = torch.device(device)
    dtype = fast_dtype(dev)
    net = random_model(model, dev).to(dtype).to(memory_format=torch.channels_last)
    config = PRESETS[model]
    shape = (batch, config.in_channels, config.image_size, config.image_size)
    process = respaced_for(default_diffusion(), steps, "ancestral")
    kwargs = {"graph_capture": graph_capture} if graph_capture else {}
    warm_up(net, process, shape, backend=backend, **kwargs)
    sample(net, process, shape, seed=0, backend=backend, **kwargs)  # untimed: caches, allocator, autotuning
    synchronize(dev)
    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        sample(net, process, shape, seed=0, backend=backend, **kwargs)
        synchronize(dev)
    summary = summarize(events_of(prof, cuda), steps)
    summary.update(device=device, model=model, batch=batch, backend=backend, graph_capture=graph_capture,
                   dtype=str(dtype).removeprefix("torch."),
                   timed="CUDA kernel durations" if cuda else "ATen operators' self CPU time")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="cifar10")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--backend", default="graph")
    p.add_argument("--graph-capture", choices=("compiled", "eager"), default=None,
                   help="backend graph's capture mode (default: the backend's own default)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    summary = profile_step(args.device, args.model, args.batch, args.backend, args.steps, args.graph_capture)
    title = (f"one steady-state step of backend {args.backend}"
             + (f" (graph_capture={args.graph_capture})" if args.graph_capture else "")
             + f": {args.model} batch {args.batch} {summary['dtype']} on {args.device}, mean over {args.steps} "
               f"profiled steps ({summary['timed']})")
    text = format_summary(summary, title)
    if not summary["us_per_step"]:
        # A profiler that records no kernel inside CUDA-graph replays would leave nothing to sort.
        text += ("\nno kernel was recorded: if this is backend graph, its replays may hide their kernels "
                 "from the profiler; profile the same step without graphs with --backend triton")
    print(text)
    if args.json:  # through a hidden name and a rename: a kill never leaves half a file
        path = Path(args.json)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(dict(summary, table=text), indent=2) + "\n")
        os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
