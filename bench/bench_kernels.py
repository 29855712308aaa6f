"""The fused kernels against eager PyTorch and torch.compile, at the cifar10 preset's real shapes.

    pytest bench/bench_kernels.py --benchmark-only -m gpu      # every GPU case (21 Inductor compiles)
    pytest bench/bench_kernels.py --benchmark-only             # also the CPU's eager rows (tiny)
    pytest bench/bench_kernels.py --benchmark-only -m gpu -k "$GPU_CHECK_KERNELS"   # bench/gpu_check.sh

gpu_check.sh's selection (GPU_CHECK_KERNELS there; tests/test_gpu_check.py checks what it
collects): the copy row and the five cifar10 GroupNorm shape classes in bf16 channels-last,
forward with eager, compile and fused (one Inductor compile per class, five in all) and backward
with eager and fused (a compiled backward would be a second compile per class; its fused rows
then carry no speedup_vs_compile, and meets_goal is None with goal_not_judged saying why):

    test_copy or (group_norm_forward and channels-last) or (group_norm_backward and not compile)

Each case runs on "cuda" (marked gpu, batch 256) and on "cpu" (batch 2, spatial sides of at most
8, one launch a timed call and 5 rounds, so the suite runs in seconds there: a trend only). On the CPU only the eager provider is timed: the fused kernels would run under
Triton's interpreter, whose timings mean nothing, and torch.compile is skipped unless
--bench-cpu-compile is given (bench/conftest.py).

test_group_norm_forward   y = act(GN(x + emb) * gamma + beta) for the U-Net's GroupNorm shapes
                          (below), fp32 NCHW and bf16 channels-last, by provider:
                            eager    the torch twin: x + emb, F.group_norm, F.silu (three ops)
                            compile  torch.compile of the twin (inductor's own fusion of the same ops)
                            fused    kernels.group_norm.group_norm_silu (channels-last: the whole-row
                                     kernels of kernels/group_norm_cl.py)
test_group_norm_backward  dx, dgamma, dbeta, demb from a saved forward (autograd.grad), bf16
                          channels-last, the same shapes and providers.
test_step                 one reverse step x_t -> x_{t-1} at [B, 3, 32, 32] (the cifar10 batch) and
                          at [B, 3, 256, 256] (large enough to be bandwidth-bound): the fused step
                          (no pred_x0 output) vs sampling.reference_step vs torch.compile of a
                          twin that reads no device value on the host (`_step_twin_no_sync`).
test_copy                 x.copy_() of 1 GiB: the copy-bandwidth row itself.

extra_info of every case: bytes (the op's minimal traffic: each input read once, each output
written once), gbps (bytes / median time per launch), copy_gbps (fastddpm.ceilings.
measure_copy_gbps, measured in this run) and fraction_of_copy = gbps / copy_gbps, plus shape,
dtype, layout, provider, first_call_s (the untimed first call: Triton's jit, inductor's compile),
device and commit. Providers run in the order eager, compile, fused, so a fused row also gets
speedup_vs_eager and speedup_vs_compile (ratios of median times within this run) and, for the
bf16 channels-last GroupNorm, the goals of issue 13 and whether they are met:
    forward   fraction_of_copy >= 0.80, >= 3x eager, faster than torch.compile
    backward  fraction_of_copy >= 0.60, >= 3x eager, faster than torch.compile
The module prints these rows as a table at the end (visible with -s).

Timing: one timed call runs INNER launches and then synchronizes once, so the synchronize
(~10 us) is amortised; the rate is per launch. Shapes below about 40 MB fit in the H100's
50 MB L2 across repeats, so their GB/s can exceed DRAM bandwidth; the large ones cannot.
"""
from __future__ import annotations

import functools
import subprocess
import time
from pathlib import Path

import pytest
import torch

from fastddpm.ceilings import measure_copy_gbps
from fastddpm.diffusion import GaussianDiffusion
from fastddpm.kernels import group_norm as gn
from fastddpm.noise import noise
from fastddpm.sampling import reference_step
from fastddpm.schedule import make_betas

INNER = 10  # launches per timed call (one synchronize each INNER launches)
PROVIDERS = ("eager", "compile", "fused")  # fused last: its row carries the ratios to the other two
# (C, H, emb, silu) of the cifar10 U-Net's GroupNorms (32 groups), from a hooked forward
# (kernels/aot.py lists all 17; these are the classes that matter for time):
GN_SHAPES = [
    pytest.param(128, 32, True, True, id="C128-32x32-emb"),  # ResBlock norm2, level 0 (5 per forward)
    pytest.param(256, 16, True, True, id="C256-16x16-emb"),  # ResBlock norm2, level 1 (5 per forward)
    pytest.param(256, 4, True, True, id="C256-4x4-emb"),  # level 3 (7 per forward): launch-bound
    pytest.param(256, 16, False, False, id="C256-16x16-attn"),  # attention norm: no emb, no SiLU (5)
    pytest.param(384, 32, False, True, id="C384-32x32"),  # up-path concat: 384 channels (1)
]
LAYOUTS = [  # the reference's precision and layout, and the fast paths' (see bench/conftest.py)
    pytest.param(torch.float32, False, id="fp32-nchw"),
    pytest.param(torch.bfloat16, True, id="bf16-channels-last"),
]
# Issue 13's goals for the bf16 channels-last GroupNorm (GPU): fraction of copy bandwidth, and
# speedups over eager and torch.compile.
GOALS = {"forward": (0.80, 3.0, 1.0), "backward": (0.60, 3.0, 1.0)}

_MEDIANS: dict[tuple, dict[str, float]] = {}  # (case key) -> {provider: seconds per launch}
_REPORT: list[dict] = []  # the fused rows, printed at the end


# ------------------------------------------------------------------------------------- helpers
def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@functools.cache
def _copy_gbps(device: str) -> float:
    """The device's copy bandwidth (fastddpm.ceilings), measured once per run."""
    return measure_copy_gbps(torch.device(device))["gbps"]


def _batch(device: torch.device) -> int:
    return 256 if device.type == "cuda" else 2


def _side(H: int, device: torch.device) -> int:
    """The spatial side on this device: the real one on CUDA, at most 8 on a CPU (tiny cases)."""
    return H if device.type == "cuda" else min(H, 8)


def _provider_or_skip(provider: str, device: torch.device, request) -> None:
    if device.type == "cuda":
        return
    if provider == "fused":
        pytest.skip("the fused kernels run under Triton's interpreter on a CPU: their timings mean nothing")
    if provider == "compile" and not request.config.getoption("--bench-cpu-compile"):
        pytest.skip("torch.compile on the CPU takes about a minute per case; pass --bench-cpu-compile")


def _run(benchmark, fn, nbytes: int, device: torch.device, key: tuple, provider: str, goals=None, **info):
    """Time fn (first call untimed, then INNER launches a round) and record the rates and ratios."""
    inner, rounds = (INNER, 20) if device.type == "cuda" else (1, 5)  # CPU rows: a quick trend only

    def timed():
        for _ in range(inner):
            out = fn()
        _sync(device)
        return out

    start = time.perf_counter()
    fn()
    _sync(device)
    first_s = time.perf_counter() - start
    out = benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
    copy = _copy_gbps(str(device))
    extra = benchmark.extra_info
    extra.update(info, provider=provider, bytes=nbytes, copy_gbps=copy, first_call_s=first_s, inner_launches=inner,
                 device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", commit=_commit())
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: ran once, untimed
        return out
    seconds = stats.stats.median / inner
    extra["gbps"] = nbytes / seconds / 1e9
    extra["fraction_of_copy"] = extra["gbps"] / copy
    others = _MEDIANS.setdefault(key, {})
    others[provider] = seconds
    if provider == "fused":
        for base in ("eager", "compile"):
            if base in others:
                extra[f"speedup_vs_{base}"] = others[base] / seconds
        if goals is not None:
            need_copy, need_eager, need_compile = goals
            extra["goal"] = dict(fraction_of_copy=need_copy, speedup_vs_eager=need_eager,
                                 speedup_vs_compile=need_compile)
            missing = [base for base in ("eager", "compile") if f"speedup_vs_{base}" not in extra]
            if missing:  # e.g. gpu_check's selection times the backward without its compile row
                extra["meets_goal"] = None
                extra["goal_not_judged"] = f"no {' or '.join(missing)} row in this run"
            else:
                extra["meets_goal"] = (extra["fraction_of_copy"] >= need_copy
                                       and extra["speedup_vs_eager"] >= need_eager
                                       and extra["speedup_vs_compile"] > need_compile)
        _REPORT.append(dict(case="-".join(map(str, key)), **{k: extra.get(k) for k in (
            "gbps", "fraction_of_copy", "speedup_vs_eager", "speedup_vs_compile", "meets_goal")}))
    return out


@pytest.fixture(scope="module", autouse=True)
def _print_report():
    """At the end of the module: the fused rows with their ratios, one line each (shown with -s)."""
    yield
    if _REPORT:
        print("\nfused kernels: GB/s, fraction of copy bandwidth, speedup vs eager / torch.compile, goal met")
        for r in _REPORT:
            fmt = {k: (f"{v:.2f}" if isinstance(v, float) else str(v)) for k, v in r.items()}
            print(f"  {fmt['case']:<48} {fmt['gbps']:>9} GB/s  {fmt['fraction_of_copy']:>5} of copy  "
                  f"x{fmt['speedup_vs_eager']} eager  x{fmt['speedup_vs_compile']} compile  goal {fmt['meets_goal']}")


def _compiled(fn):
    """torch.compile(fn) from a clean dynamo state: each case compiles for its own shapes (its
    first call, untimed), and no case falls back to eager by hitting the recompile limit."""
    torch._dynamo.reset()
    return torch.compile(fn)


def _gn_inputs(device, batch, C, H, emb, dtype, channels_last, grad=False):
    """Off-centre x, random affine and emb (never zeros), in `dtype` and layout."""
    g = torch.Generator(device).manual_seed(0)
    x = (-2.3 + 0.5 * torch.randn(batch, C, H, H, generator=g, device=device)).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (1.0 + 0.3 * torch.randn(C, generator=g, device=device)).to(dtype)
    b = (0.2 * torch.randn(C, generator=g, device=device)).to(dtype)
    e = torch.randn(batch, C, generator=g, device=device).to(dtype) if emb else None
    if grad:
        for t in (x, w, b, e):
            if t is not None:
                t.requires_grad_()
    return x, w, b, e


def _gn_fn(provider):
    if provider == "fused":
        return gn.group_norm_silu
    if provider == "eager":
        return gn.group_norm_silu_reference
    return _compiled(gn.group_norm_silu_reference)


# ------------------------------------------------------------------------------------- cases
def test_copy(benchmark, device):
    """The baseline every rate is compared with, as its own row (1 GiB on CUDA, 64 MiB on a CPU)."""
    device = torch.device(device)
    src = torch.empty((1 << 28) if device.type == "cuda" else (1 << 24), dtype=torch.float32, device=device)
    src.normal_()
    dst = torch.empty_like(src)
    _run(benchmark, lambda: dst.copy_(src), 2 * src.numel() * 4, device, ("copy",), "copy")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype, channels_last", LAYOUTS)
@pytest.mark.parametrize("C, H, emb, silu", GN_SHAPES)
def test_group_norm_forward(benchmark, request, device, C, H, emb, silu, dtype, channels_last, provider):
    """Bytes: read x (and emb) once, write y once."""
    device = torch.device(device)
    _provider_or_skip(provider, device, request)
    x, w, b, e = _gn_inputs(device, _batch(device), C, _side(H, device), emb, dtype, channels_last)
    fn = _gn_fn(provider)
    nbytes = (2 * x.numel() + (e.numel() if emb else 0)) * x.element_size()
    key = ("forward", f"C{C}-{x.shape[2]}x{x.shape[3]}", "emb" if emb else "noemb", "silu" if silu else "id",
           "bf16-cl" if channels_last else "fp32-nchw", device.type)
    with torch.no_grad():
        y = _run(benchmark, lambda: fn(x, 32, w, b, e, silu), nbytes, device, key, provider,
                 goals=GOALS["forward"] if channels_last else None, shape=list(x.shape), dtype=str(dtype),
                 channels_last=channels_last, emb=emb, silu=silu)
        ref = gn.group_norm_silu_reference(x.float(), 32, w.float(), b.float(), e.float() if emb else None, silu)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("C, H, emb, silu", GN_SHAPES)
def test_group_norm_backward(benchmark, request, device, C, H, emb, silu, provider):
    """The backward alone (autograd.grad of a saved forward), bf16 channels-last. Bytes: read x and
    dy (and emb), write dx (and demb); the [C] parameter gradients are negligible."""
    device = torch.device(device)
    _provider_or_skip(provider, device, request)
    x, w, b, e = _gn_inputs(device, _batch(device), C, _side(H, device), emb, torch.bfloat16, True, grad=True)
    y = _gn_fn(provider)(x, 32, w, b, e, silu)
    dy = torch.randn_like(y)
    inputs = [t for t in (x, w, b, e) if t is not None]
    nbytes = (3 * x.numel() + (2 * e.numel() if emb else 0)) * x.element_size()
    key = ("backward", f"C{C}-{x.shape[2]}x{x.shape[3]}", "emb" if emb else "noemb", "silu" if silu else "id", "bf16-cl",
           device.type)
    grads = _run(benchmark, lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True), nbytes, device, key,
                 provider, goals=GOALS["backward"], shape=list(x.shape), dtype="torch.bfloat16",
                 channels_last=True, emb=emb, silu=silu)
    assert all(torch.isfinite(g.float()).all() for g in grads)


def _step_twin_no_sync(tables, x, model_output, k_dev, t: int, seed: int, clip_denoised: bool = True):
    """kernels.step.step_twin's formula for torch.compile, reading no device value on the host.

    step_twin calls float() on the draw flag and int() on the device timestep table: two host
    syncs and two graph breaks a call, which is not what a compiled step would do. Here the
    coefficients are indexed by the device step index k_dev (index_select, no sync), the noise's
    step key t is a Python int taken once from the host-side timesteps before timing, and the
    noise is scaled by the draw flag instead of branching on it (at a middle step draw = 1, so
    both draw the noise, as the fused kernel does). x [B, C, ...], model_output [B, C or 2C, ...].
    """
    from fastddpm.kernels import step as st

    C = x.shape[1]
    col = tables.coefs.index_select(0, k_dev.reshape(1))[0]
    a, b_ = col[st.COEF_A], col[st.COEF_B]
    xf = x.float()
    eps = model_output[:, :C].float()
    x0 = a * xf - b_ * eps
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        if tables.eps_term:
            eps = (a * xf - x0) / b_
    xp = col[st.COEF_X0] * x0
    if tables.x_term:
        xp = xp + col[st.COEF_X] * xf
    if tables.eps_term:
        xp = xp + col[st.COEF_EPS] * eps
    if tables.var_mode == "learned":
        sigma = torch.exp(0.5 * model_output[:, C:].float())
    elif tables.var_mode == "learned_range":
        frac = (model_output[:, C:].float() + 1.0) / 2.0
        sigma = torch.exp(0.5 * (frac * col[st.COEF_LOG_BETA] + (1.0 - frac) * col[st.COEF_LOG_POST]))
    else:
        sigma = col[st.COEF_SIGMA]
    return xp + col[st.COEF_DRAW] * sigma * noise(seed, t, x.shape, 0, device=x.device)


STEP_VARIANTS = [
    pytest.param("ancestral", "fixedlarge", id="ancestral-fixedlarge"),
    pytest.param("ancestral", "learned_range", id="ancestral-learned_range"),
    pytest.param("ddim", "fixedlarge", id="ddim-eta1"),
]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", [32, 256], ids=["3x32x32", "3x256x256"])
@pytest.mark.parametrize("sampler, var_type", STEP_VARIANTS)
def test_step(benchmark, request, device, sampler, var_type, size, provider):
    """One middle step of a 1000-step process (noise drawn); state float32, clip_denoised on.
    Bytes: read x_t and the model output, write x_{t-1}."""
    from fastddpm.kernels import step as st

    device = torch.device(device)
    _provider_or_skip(provider, device, request)
    diffusion = GaussianDiffusion(make_betas("linear", 1000), var_type=var_type)
    eta = 1.0 if sampler == "ddim" else 0.0
    k, seed = 500, 0
    batch, size = _batch(device), _side(size, device)
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g, device=device)
    channels = 6 if diffusion.learned_variance else 3
    out = torch.randn(batch, channels, size, size, generator=g, device=device)
    if diffusion.learned_variance:
        out[:, 3:].uniform_(-1.0, 1.0)
    tables = st.step_tables(diffusion, device, sampler, eta)
    if provider == "fused":
        k_dev, key, buf = tables.steps[k], tables.key(seed, 0), torch.empty_like(x)

        def fn():
            return st.fused_step(tables, x, out, k_dev, key, out=buf)
    elif provider == "eager":
        def fn():
            return reference_step(diffusion, x, k, out, seed=seed, sampler=sampler, eta=eta)[0]
    else:
        twin = _compiled(_step_twin_no_sync)
        k_dev, t = tables.steps[k], int(diffusion.timesteps[k])  # t from the host-side table, before timing

        def fn():
            return twin(tables, x, out, k_dev, t, seed)
    nbytes = (x.numel() + out.numel() + x.numel()) * 4
    key = ("step", sampler, var_type, f"3x{size}x{size}", device.type)
    x_prev = _run(benchmark, fn, nbytes, device, key, provider, shape=list(x.shape), sampler=sampler,
                  var_type=var_type)
    ref = reference_step(diffusion, x, k, out, seed=seed, sampler=sampler, eta=eta)[0]
    assert ((x_prev - ref).norm() / ref.norm()).item() < 1e-5
