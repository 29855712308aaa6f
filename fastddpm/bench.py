"""The side-by-side throughput table behind `fastddpm bench`.

One process times every sampling engine that can run on the device, on the same batch, the
same number of steps and the same device, each drawing samples from x_T to x_0:

    reference          fastddpm, plain eager PyTorch, float32, NCHW (the ground truth)
    eager-bf16         fastddpm, plain eager PyTorch, bfloat16 weights, channels-last
    compile, triton,   fastddpm's fast backends (fastddpm.backends), in the fast dtype
    graph, onnx        (bfloat16 on CUDA, float32 on a CPU; onnx float16 on CUDA, since ONNX
                       export has no bfloat16 path), channels-last
    graph-compiled     backend graph with graph_capture="compiled" (CUDA graphs over the
                       torch.compile'd U-Net, the graph backend's default) and
    graph-eager        graph_capture="eager" (CUDA graphs over the eager U-Net)
    diffusers          the peer: diffusers' UNet2DModel in the google/ddpm-cifar10-32 layout
                       (random weights, nothing downloaded) with its DDPMScheduler, in the
                       loop DDPMPipeline runs, in the fast dtype
    diffusers-compile  the same under torch.compile, channels-last, as diffusers recommends

Before the rows, the device's two ceilings are measured in the same run: the matrix-product
peak (a large bfloat16 matmul on CUDA, float32 on a CPU) and copy bandwidth (bytes read plus
bytes written). Each row is warmed up first (compilation, graph capture and autotuning land
there and are reported apart: fastddpm rows through `sampling.warm_up` on the very process and
shape that is timed, so a backend's capture cache is hit; the diffusers rows by a 3-step run),
then timed `repeat` times, synchronised, and the median is reported:

    images/s = batch / seconds           ms/step = 1000 seconds / steps
    TFLOP/s  = GFLOP(forward, 1 image) * batch * steps / seconds / 1000
    of peak  = TFLOP/s / measured peak

FLOPs come from torch's FLOP counter (convolutions, linear layers and attention matmuls): for
the cifar10 preset 12.44 GFLOP per image forward, attention included, against the 12.1 the
DDPM literature quotes without it; the diffusers model is counted the same way. A backend that
cannot run here (BackendUnavailableError, "not implemented", no CUDA, no diffusers) becomes a
`skipped` row with the reason; anything else that goes wrong in a row (building, warming up,
timing, comparing with the reference) makes it a `failed` row with the reason, and the next row
runs: the table always prints. Final samples are compared on the CPU in float64, whatever device
and dtype a row returns them in (ONNX Runtime's come back on the host).

Accuracy in the same run: after its timed runs every row also draws a short run (ACCURACY_STEPS
= 3 steps, the same sampler and spacing, respaced over all of T so that the model's output rather
than x_T decides x_0) from the same seed, and its x_0 is compared with eager-bf16's on that run:
`rel_err_vs_eager_bf16` = ||x0 - x0_bf16|| / ||x0_bf16||, so a fast but wrong row shows in the
table itself. The diffusers rows run their U-Net (compiled as for the timing, fed the same
0-d timestep and NCHW input) loaded with fastddpm's weights (unet_layouts.diffusers_state_dict)
inside fastddpm's sampler: their own scheduler draws other noise, so only their model is
compared. `rel_err_vs_reference` compares the timed runs' final samples with the reference row's
(when it ran).

The compile row warms up with WARMUP_CALLS["compile"] = 3 calls of `sampling.warm_up`: under
mode "reduce-overhead" Inductor runs its first call without CUDA graphs, records them on the
second and replays from the third, so only then is the timed run in the steady state.

fp32 rows run with the TF32 settings torch has when the bench starts (cuDNN's default: TF32
convolutions on Ampere and later); the report records them and the table says which precision
the fp32 rows used.
"""
from __future__ import annotations

import copy
import datetime
import functools
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .backends import get_backend
from .bench_peers import (DDPM_SCHEDULER_CONFIG, SEED, _diffusers_sampler, _peer_accuracy,  # noqa: F401 - re-exported
                          diffusers_forward_gflops, diffusers_unet_kwargs)
from .bench_table import ACCURACY_FLAG, format_table, headline_lines  # noqa: F401 - the report's text forms
from .ceilings import measure_copy_gbps, measure_peak_tflops, synchronize
from .errors import FastDDPMError
from .files import atomic_write_bytes, ensure_writable_dir
from .generate import default_diffusion, forward_gflops, resolve_device, respaced_for
from .sampling import sample, warm_up
from .unet import PRESETS, UNet, UNetConfig, count_parameters

SCHEMA = "fastddpm-bench/1"
FASTDDPM_ROWS = ("reference", "eager-bf16", "compile", "triton", "graph", "graph-compiled", "graph-eager", "onnx")
PEER_ROWS = ("diffusers", "diffusers-compile")
ROWS = FASTDDPM_ROWS + PEER_ROWS
# The diffusers rows' warm-up run: enough steps for compilation, CUDA-graph recording and any
# recompilation on a new timestep value to happen before the timed runs, few enough to stay cheap.
PEER_WARMUP_STEPS = 3
# Rows that are backend "graph" with a capture mode (sample's / warm_up's graph_capture keyword).
GRAPH_CAPTURE = {"graph-compiled": "compiled", "graph-eager": "eager"}
# What each row's warm-up holds besides one untimed step, so compile and capture times read apart.
WARMUP_HOLDS = {"compile": "compile + CUDA-graph recording (3 calls)", "graph": "capture (default graph_capture)",
                "graph-compiled": "compile + capture", "graph-eager": "capture", "onnx": "export + session start",
                "diffusers-compile": "compile + CUDA-graph recording"}
# The accuracy column (module docstring): every row's x_0 after a short run of this many steps
# against this row's on the same seed and process.
ACCURACY_STEPS = 3
ACCURACY_BASELINE = "eager-bf16"
# sampling.warm_up calls per fastddpm row where one is not enough: compile's "reduce-overhead"
# records Inductor's CUDA graphs on the 2nd call and replays them from the 3rd.
WARMUP_CALLS = {"compile": 3}

@dataclass
class BenchRequest:
    """Everything `fastddpm bench` takes (see `fastddpm bench --help`)."""

    device: str = "auto"
    model: str = "cifar10"
    steps: int = 100
    batch: int = 64
    backends: tuple[str, ...] = ROWS
    repeat: int = 3
    json: str | None = None
    progress: bool = True  # one line per row on stderr while it runs
    sampler: str = "ancestral"  # every row walks the same sampler: ancestral, ddim, dpm++2m, dpm++2m-sde
    spacing: str = "iddpm"  # and the same timesteps (fastddpm.schedule.sampling_timesteps)
    accuracy_steps: int = ACCURACY_STEPS  # the accuracy run's steps (0: no accuracy column)
    # called with the report whenever it changes (after each row, and at the end): what a caller
    # that keeps the report somewhere else than --json uses (bench/gpu_check_report.py)
    on_report: Callable[[dict], None] | None = None


@dataclass
class Row:
    """One line of the table. `seconds` holds every timed run; the figures are their median."""

    name: str
    engine: str  # "fastddpm" or "diffusers"
    dtype: str
    layout: str  # "NCHW" or "channels-last"
    status: str = "ok"  # "ok", "skipped" (cannot run here) or "failed" (raised while running)
    reason: str = ""
    notes: str = ""
    warmup_s: float | None = None
    seconds: list[float] = field(default_factory=list)
    median_s: float | None = None
    spread: float | None = None  # (slowest - fastest) / median of the timed runs: how noisy the row is
    images_per_s: float | None = None
    ms_per_step: float | None = None
    tflops: float | None = None
    peak_fraction: float | None = None
    speedup_vs_reference: float | None = None
    speedup_vs_diffusers: float | None = None
    rel_err_vs_reference: float | None = None
    rel_err_vs_eager_bf16: float | None = None  # the accuracy run's x_0 against eager-bf16's
    accuracy_error: str = ""  # why the accuracy run failed, if it did (the timing stands)
    peak_memory_gib: float | None = None


# ----------------------------------------------------------------------------------- fastddpm rows
def random_model(preset: str, device: torch.device) -> UNet:
    """The preset with seeded random weights, its zero-initialised output convs re-randomised.

    DDPM starts conv2, proj and conv_out at zero; a random-weight model would then predict
    eps = 0 exactly, so the rows would be compared on a degenerate function.
    """
    torch.manual_seed(SEED)
    model = UNet.from_preset(preset)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and not m.weight.any():
            m.reset_parameters()
    return model.to(device).eval()


def _fastddpm_sampler(name: str, base: UNet, process, shape, device: torch.device,
                      dtype: torch.dtype, sampler: str = "ancestral") -> tuple[Callable, Callable, str, str]:
    """(warm(), run(process=process) -> x_0, dtype name, layout) for a fastddpm row; raises if it
    cannot run here.

    warm() is `sampling.warm_up` on the same model, process and shape as run(), WARMUP_CALLS[name]
    times (once for most rows): the backend's one-time work (compilation, capture, session start,
    CUDA-graph recording) for exactly what is timed next. run(other) draws another process with
    the same model and settings (the accuracy run).
    """
    backend = "reference" if name in ("reference", "eager-bf16") else "graph" if name in GRAPH_CAPTURE else name
    get_backend(backend).check(device)
    # graph_capture goes to sample/warm_up only for the graph-* rows (the keyword is graph's alone)
    extra = {"graph_capture": GRAPH_CAPTURE[name]} if name in GRAPH_CAPTURE else {}
    channels_last = name != "reference"
    model = copy.deepcopy(base).to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)

    def warm() -> None:
        for _ in range(WARMUP_CALLS.get(name, 1)):
            warm_up(model, process, shape, backend=backend, sampler=sampler, **extra)

    def run(proc=process) -> torch.Tensor:
        return sample(model, proc, shape, seed=SEED, backend=backend, sampler=sampler, **extra)

    return warm, run, _dtype_name(dtype), "channels-last" if channels_last else "NCHW"


def _parameter_count(config: UNetConfig) -> int:
    with torch.device("meta"):
        return count_parameters(UNet(config))


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def fast_dtype(device: torch.device) -> torch.dtype:
    """The dtype of the fast rows and the peer: bfloat16 on CUDA, float32 on a CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def row_dtype(name: str, device: torch.device) -> torch.dtype:
    """A row's model dtype: reference fp32, eager-bf16 bf16, onnx fp16 where the others run bf16
    (ONNX export has no bf16 path), every other row the fast dtype."""
    if name == "reference":
        return torch.float32
    if name == "eager-bf16":
        return torch.bfloat16
    if name == "onnx" and fast_dtype(device) == torch.bfloat16:
        return torch.float16
    return fast_dtype(device)


# ----------------------------------------------------------------------------------- the run
def _validate(request: BenchRequest) -> tuple[str, ...]:
    if request.model not in PRESETS:
        raise FastDDPMError(f"unknown model preset {request.model!r}; choose one of {', '.join(map(repr, PRESETS))}")
    names = tuple(dict.fromkeys(n.strip() for n in request.backends if n.strip()))
    unknown = [n for n in names if n not in ROWS]
    if unknown or not names:
        raise FastDDPMError(f"unknown bench backend {(unknown or [''])[0]!r}; choose from {', '.join(ROWS)}")
    for flag, value in (("--steps", request.steps), ("--batch", request.batch), ("--repeat", request.repeat)):
        if value < 1:
            raise FastDDPMError(f"{flag} must be a positive integer, got {value}")
    if request.accuracy_steps < 0:
        raise FastDDPMError(f"accuracy_steps must be 0 (no accuracy column) or more, got {request.accuracy_steps}")
    return names


def fp32_precision(device: torch.device) -> dict:
    """The settings that decide whether float32 convolutions and matmuls run in TF32, and in words.

    "summary" is what the table prints: on CUDA e.g. "convolutions TF32, matmuls fp32" (torch's
    defaults); on a CPU the flags change nothing and it reads "fp32 (no TF32 on cpu)". Read through
    the legacy flags (allow_tf32, float32_matmul_precision); where a program set torch's newer
    fp32_precision API instead, torch (2.9+) refuses legacy reads, and that API is read.
    """
    try:
        matmul_flag, conv_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        precision = torch.get_float32_matmul_precision()
        matmul_tf32 = matmul_flag or precision != "highest"
        settings = {"matmul_allow_tf32": matmul_flag, "cudnn_allow_tf32": conv_tf32,
                    "float32_matmul_precision": precision}
    except RuntimeError:  # "mix of the legacy and new APIs"
        matmul, conv = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
        matmul_tf32, conv_tf32 = matmul == "tf32", conv == "tf32"
        settings = {"matmul_allow_tf32": matmul_tf32, "cudnn_allow_tf32": conv_tf32,
                    "float32_matmul_precision": f"fp32_precision matmul={matmul!r}, conv={conv!r}"}
    if device.type == "cuda":
        summary = f"convolutions {'TF32' if conv_tf32 else 'fp32'}, matmuls {'TF32' if matmul_tf32 else 'fp32'}"
    else:
        summary = f"fp32 (no TF32 on {device.type})"
    return dict(settings, summary=summary)


def machine_info(device: torch.device) -> dict:
    """Where the numbers were taken: device, library versions, the settings that move them, the commit."""
    info = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                                        platform.machine()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cudnn_allow_tf32": fp32_precision(device)["cudnn_allow_tf32"],
        "matmul_allow_tf32": fp32_precision(device)["matmul_allow_tf32"],
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        # Other work on the machine moves CPU timings: the 1-minute load average when the run began.
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if importlib.util.find_spec("diffusers") is not None:
        from importlib.metadata import version
        info["diffusers"] = version("diffusers")
    return info


def _git_commit() -> str | None:
    """HEAD of the checkout fastddpm runs from, with '-dirty' for uncommitted changes; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _time_row(row: Row, warm: Callable, run: Callable, device: torch.device, repeat: int) -> torch.Tensor:
    """Time warm() once, then run() `repeat` times, each synchronised; fills row's timings."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    warm()
    synchronize(device)
    row.warmup_s = time.perf_counter() - start
    x = None
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        x = run()
        synchronize(device)
        row.seconds.append(time.perf_counter() - start)
    if device.type == "cuda":
        row.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    return x


def _fill_rates(row: Row, batch: int, steps: int, gflop: float, peak_tflops: float) -> None:
    row.median_s = statistics.median(row.seconds)
    row.spread = (max(row.seconds) - min(row.seconds)) / row.median_s
    row.images_per_s = batch / row.median_s
    row.ms_per_step = 1000.0 * row.median_s / steps
    row.tflops = gflop * batch * steps / row.median_s / 1000.0
    row.peak_fraction = row.tflops / peak_tflops


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 on the CPU, wherever x and ref live."""
    x, ref = (v.detach().to(device="cpu", dtype=torch.float64) for v in (x, ref))
    if x.shape != ref.shape:
        raise ValueError(f"samples of shape {tuple(x.shape)} where the reference has {tuple(ref.shape)}")
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


def _log(request: BenchRequest, message: str) -> None:
    if request.progress:
        print(f"bench: {message}", file=sys.stderr, flush=True)


def _release(device: torch.device) -> None:
    """Hand the last row's cached blocks back. After a sticky CUDA error (an illegal access in a
    row) this raises too; the rows after it then fail one by one, each recorded, instead of the
    whole table ending here."""
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError:
            pass


def run_bench(request: BenchRequest) -> dict:
    """Time every requested row on one device; returns the report (also written to request.json).

    The JSON is rewritten after each row ("complete": false until the last), so a run cut off
    by a time limit still leaves the rows it finished.
    """
    names = _validate(request)
    device = resolve_device(request.device)
    if request.json is not None:
        ensure_writable_dir(Path(request.json).parent)
    config = PRESETS[request.model]
    shape = (request.batch, config.in_channels, config.image_size, config.image_size)
    full = default_diffusion()
    process = respaced_for(full, request.steps, request.sampler, request.spacing)
    gflop = forward_gflops(config)
    have_diffusers = importlib.util.find_spec("diffusers") is not None
    count_peer = have_diffusers and any(n in PEER_ROWS for n in names)

    _log(request, f"measuring the device's ceilings on {device.type}")
    report = {
        "schema": SCHEMA,
        "complete": False,
        "request": {"device": request.device, "model": request.model, "steps": process.num_steps,
                    "sampler": request.sampler, "spacing": request.spacing,
                    "batch": request.batch, "backends": list(names), "repeat": request.repeat,
                    "peer_warmup_steps": min(process.num_steps, PEER_WARMUP_STEPS), "seed": SEED,
                    "accuracy_steps": request.accuracy_steps},
        "machine": machine_info(device),
        "model": {"preset": request.model, "parameters": _parameter_count(config),
                  "gflop_per_image_forward": gflop,
                  "diffusers_gflop_per_image_forward": diffusers_forward_gflops(config) if count_peer else None},
        "ceilings": {"peak": measure_peak_tflops(device), "copy": measure_copy_gbps(device)},
        "fast_dtype": _dtype_name(fast_dtype(device)),
        "fp32_precision": fp32_precision(device),
        "rows": [],
    }
    peak = report["ceilings"]["peak"]["tflops"]
    _log(request, f"peak {peak:.3g} TFLOP/s ({report['ceilings']['peak']['dtype']} matmul), "
                  f"copy {report['ceilings']['copy']['gbps']:.4g} GB/s")

    # every row needs the weights now: the fastddpm rows run them, the diffusers rows' accuracy run loads them
    base = random_model(request.model, device)
    bench = _Bench(request, device, base, shape, process, config, gflop, peak, have_diffusers,
                   accuracy=_Accuracy(request, base, full, shape, device))
    report["accuracy"] = bench.accuracy.report  # the same dict: filled in when the baseline is drawn
    rows: list[Row] = []
    for name in names:
        row, x = _run_row(name, bench)
        if name == "reference" and x is not None:
            bench.reference_x = x
        rows.append(row)
        _speedups(rows)
        report["rows"] = [asdict(r) for r in rows]
        _write_json(request, report)
        _release(device)
    report["complete"] = True
    _write_json(request, report)
    return report


class _Accuracy:
    """The accuracy run's process and eager-bf16's x_0 on it (CPU, float64), drawn once per bench, when
    the first row that ran asks for it (a table of skipped rows draws nothing). `report` is what the
    JSON keeps: steps, against, seed, flag_above, timesteps, status and reason; status is "pending" until
    the baseline is drawn, then "ok" or "failed" ("off" with accuracy_steps 0)."""

    def __init__(self, request: BenchRequest, base: UNet, full, shape, device: torch.device):
        self.request, self.base, self.shape, self.device = request, base, shape, device
        steps = request.accuracy_steps
        self.report = {"steps": steps, "against": ACCURACY_BASELINE, "seed": SEED, "flag_above": ACCURACY_FLAG,
                       "status": "off" if steps == 0 else "pending", "reason": ""}
        self.process = respaced_for(full, steps, request.sampler, request.spacing) if steps else None
        if self.process is not None:
            self.report["timesteps"] = [int(t) for t in self.process.timesteps.tolist()]
        self._x, self._drawn = None, False

    def baseline(self) -> torch.Tensor | None:
        """eager-bf16's x_0 (None when the column is off or its run failed; the report says why)."""
        if self.process is None or self._drawn:
            return self._x
        self._drawn = True
        try:
            model = copy.deepcopy(self.base).to(row_dtype(ACCURACY_BASELINE, self.device))
            model = model.to(memory_format=torch.channels_last)
            x = sample(model, self.process, self.shape, seed=SEED, backend="reference", sampler=self.request.sampler)
            self._x = x.detach().to(device="cpu", dtype=torch.float64)
            self.report["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - the table still runs, without its accuracy column
            self.report["status"], self.report["reason"] = "failed", _one_line(e)
            _log(self.request, f"accuracy baseline ({ACCURACY_BASELINE}) failed:\n{traceback.format_exc()}")
        return self._x


def _one_line(e: BaseException) -> str:
    return (f"{type(e).__name__}: {e}".splitlines() or [""])[0][:300]


@dataclass
class _Bench:
    """What every row of one bench run shares: the request, the device, the random-weight model and
    the process it samples, the FLOPs and the measured peak, the accuracy baseline, and the reference
    row's samples once it ran (on the CPU in float64)."""

    request: BenchRequest
    device: torch.device
    base: UNet
    shape: tuple
    process: object
    config: UNetConfig
    gflop: float
    peak: float
    have_diffusers: bool
    accuracy: _Accuracy | None = None
    reference_x: torch.Tensor | None = None


def _run_row(name: str, bench: _Bench) -> tuple[Row, torch.Tensor | None]:
    """(row, final samples on the CPU in float64): build, warm up, time one row, compare it with
    the reference row's samples, and run its accuracy run against eager-bf16's (`_Accuracy`).
    One that cannot run here comes back skipped, one where anything raises comes back failed with
    the reason; either way with no samples, and the table goes on. An accuracy run that raises
    leaves the timing standing and says why in `accuracy_error`."""
    request, device, base, shape, process = bench.request, bench.device, bench.base, bench.shape, bench.process
    config, accuracy = bench.config, bench.accuracy
    peer = name in PEER_ROWS
    dtype = row_dtype(name, device)
    layout = "NCHW" if name in ("reference", "diffusers") else "channels-last"
    row = Row(name=name, engine="diffusers" if peer else "fastddpm", dtype=_dtype_name(dtype), layout=layout)
    if name in WARMUP_HOLDS:
        row.notes = f"warm-up: {WARMUP_HOLDS[name]}"
    try:
        if peer:
            if not bench.have_diffusers:
                raise FastDDPMError("diffusers is not installed (pip install diffusers)")
            run_steps, notes, unet = _diffusers_sampler(config, shape, device, dtype,
                                                        compiled=name == "diffusers-compile",
                                                        sampler=request.sampler, spacing=request.spacing)
            row.notes = "; ".join(filter(None, [notes, row.notes]))
            warm_steps = min(process.num_steps, PEER_WARMUP_STEPS)
            warm, run = (lambda: run_steps(warm_steps)), (lambda: run_steps(process.num_steps))
            accuracy_run = functools.partial(_peer_accuracy, unet, base, shape=shape, sampler=request.sampler)
            row_gflop = diffusers_forward_gflops(config)
        else:
            warm, run, row.dtype, row.layout = _fastddpm_sampler(name, base, process, shape, device, dtype,
                                                                 request.sampler)
            accuracy_run = run
            row_gflop = bench.gflop
        _log(request, f"{name}: warm-up, then {request.repeat} x {process.num_steps} steps")
        x = _time_row(row, warm, run, device, request.repeat)
        # one device, one dtype for the comparison: a row's samples may come back elsewhere (the
        # onnx row's on the host while the reference's are on CUDA) or in its own dtype
        x = x.detach().to(device="cpu", dtype=torch.float64)
        ref = x if name == "reference" else bench.reference_x  # the reference row against itself: 0
        if ref is not None and not peer:
            row.rel_err_vs_reference = _rel_err(x, ref)
        _fill_rates(row, request.batch, process.num_steps, row_gflop, bench.peak)
        baseline = accuracy.baseline() if accuracy is not None else None
        if baseline is not None:
            try:
                row.rel_err_vs_eager_bf16 = _rel_err(accuracy_run(accuracy.process), baseline)
            except Exception as e:  # noqa: BLE001 - the row's timing stands; the column says why it is empty
                row.accuracy_error = _one_line(e)
                _log(request, f"{name}: accuracy run failed:\n{traceback.format_exc()}")
    except FastDDPMError as e:  # BackendUnavailableError included: cannot run here
        _clear_figures(row)
        row.status, row.reason = "skipped", str(e)
        _log(request, f"{name}: skipped: {e}")
        return row, None
    except Exception as e:  # noqa: BLE001 - one broken row must not hide the others' numbers
        _clear_figures(row)
        row.status, row.reason = "failed", (f"{type(e).__name__}: {e}".splitlines() or [""])[0][:300]
        _log(request, f"{name}: failed:\n{traceback.format_exc()}")
        return row, None
    err = "-" if row.rel_err_vs_eager_bf16 is None else f"{row.rel_err_vs_eager_bf16:.1e}"
    _log(request, f"{name}: {row.images_per_s:.4g} images/s, {row.ms_per_step:.4g} ms/step "
                  f"(warm-up {row.warmup_s:.2f} s), err vs {ACCURACY_BASELINE} {err}")
    return row, x


def _clear_figures(row: Row) -> None:
    """A row that did not finish reports no figures: nothing half-measured reads as a result."""
    keep = {"name", "engine", "dtype", "layout", "notes"}
    for key, value in asdict(Row(name=row.name, engine=row.engine, dtype=row.dtype, layout=row.layout)).items():
        if key not in keep:
            setattr(row, key, value)


def _speedups(rows: list[Row]) -> None:
    """vs reference: over the reference row; vs diffusers: over the fastest diffusers row."""
    ok = [r for r in rows if r.status == "ok"]
    ref = next((r for r in ok if r.name == "reference"), None)
    peers = [r for r in ok if r.engine == "diffusers"]
    best_peer = max(peers, key=lambda r: r.images_per_s, default=None)
    for r in ok:
        r.speedup_vs_reference = r.images_per_s / ref.images_per_s if ref else None
        r.speedup_vs_diffusers = r.images_per_s / best_peer.images_per_s if best_peer else None


def _write_json(request: BenchRequest, report: dict) -> None:
    if request.json is not None:
        atomic_write_bytes(request.json, (json.dumps(report, indent=2) + "\n").encode())
    if request.on_report is not None:
        request.on_report(report)
