"""The fused kernels against eager PyTorch and torch.compile, at the cifar10 preset's real shapes.

    pytest bench/bench_kernels.py --benchmark-only -m gpu

Every case needs CUDA (the interpreter's CPU timings mean nothing) and is skipped without it.

test_group_norm_forward   y = act(GN(x + emb) * gamma + beta) at batch 256 for the U-Net's
                          GroupNorm shapes (below), by provider:
                            fused    kernels.group_norm.group_norm_silu (one Triton kernel)
                            eager    the torch twin: x + emb, F.group_norm, F.silu (three ops)
                            compile  torch.compile of the twin (inductor's own fused kernels)
test_group_norm_backward  dx, dgamma, dbeta, demb from a saved forward at batch 128 (training).
test_step                 one reverse step x_t -> x_{t-1} at [256, 3, 32, 32] (the cifar10 batch)
                          and at [256, 3, 256, 256] (big enough to be bandwidth-bound): the fused
                          step (no pred_x0 output) vs sampling.reference_step vs torch.compile of
                          the step's torch twin.
test_copy                 x.copy_() of the same bytes: the device's measured copy bandwidth.

extra_info: bytes (what one read of every input and one write of every output must move),
gbps (bytes / median time), copy_gbps (the device's copy bandwidth, measured in this run) and
fraction_of_copy = gbps / copy_gbps, plus shape, dtype, layout, provider, first_call_s (the
untimed first call: Triton's jit, inductor's compile), device and commit.

Timing: one timed call runs INNER launches and then synchronizes once, so the synchronize
(~10 us) is amortised; the rate is per launch. Shapes below about 40 MB fit in the H100's
50 MB L2 across repeats, so their GB/s can exceed DRAM bandwidth; the big shapes cannot.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from fastddpm.diffusion import GaussianDiffusion
from fastddpm.kernels import group_norm as gn
from fastddpm.kernels import step as st
from fastddpm.sampling import reference_step
from fastddpm.schedule import make_betas

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

INNER = 10  # launches per timed call (one synchronize each INNER launches)
PROVIDERS = ("fused", "eager", "compile")
# (C, H, emb, silu) of the cifar10 U-Net's GroupNorms (32 groups), from a hooked forward:
GN_SHAPES = [
    pytest.param(128, 32, True, True, id="C128-32x32-emb"),  # ResBlock norm2, level 0 (5 per forward)
    pytest.param(256, 16, True, True, id="C256-16x16-emb"),  # ResBlock norm2, level 1 (5 per forward)
    pytest.param(256, 4, True, True, id="C256-4x4-emb"),  # level 3 (7 per forward): launch-bound
    pytest.param(256, 16, False, False, id="C256-16x16-attn"),  # attention norm: no emb, no SiLU (5)
    pytest.param(384, 32, False, True, id="C384-32x32-chunked"),  # up-path concat: the chunked path (1)
]
LAYOUTS = [  # the reference's precision and layout, and the fast paths' (see bench/conftest.py)
    pytest.param(torch.float32, False, id="fp32-nchw"),
    pytest.param(torch.bfloat16, True, id="bf16-channels-last"),
]


# ------------------------------------------------------------------------------------- helpers
def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _launches(fn, inner: int = INNER):
    """fn run `inner` times, then one synchronize: what one timed call does."""
    def run():
        for _ in range(inner):
            out = fn()
        torch.cuda.synchronize()
        return out
    return run


def _median_ms(fn, repeat: int = 20) -> float:
    """Median time of fn in ms by CUDA events (for the copy baseline fixture, outside pytest-benchmark)."""
    fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@pytest.fixture(scope="module")
def copy_gbps() -> float:
    """The device's copy bandwidth in GB/s (read + write of 1 GiB in all, 512 MiB each way)."""
    src = torch.empty(2**27, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (_median_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9


def _run(benchmark, fn, nbytes: int, copy_gbps: float, **info):
    """Time fn (first call untimed, then INNER launches a round) and record the rates."""
    timed = _launches(fn)
    first = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    first[0].record()
    fn()
    first[1].record()
    torch.cuda.synchronize()
    out = benchmark.pedantic(timed, rounds=20, warmup_rounds=2, iterations=1)
    extra = benchmark.extra_info
    extra.update(info, bytes=nbytes, copy_gbps=copy_gbps, first_call_s=first[0].elapsed_time(first[1]) / 1e3,
                 device=torch.cuda.get_device_name(), commit=_commit(), inner_launches=INNER)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        extra["gbps"] = nbytes * INNER / stats.stats.median / 1e9
        extra["fraction_of_copy"] = extra["gbps"] / copy_gbps
    return out


def _compiled(fn):
    """torch.compile(fn) from a clean dynamo state: each case compiles for its own shapes (its
    first call, untimed), and no case falls back to eager by hitting the recompile limit."""
    torch._dynamo.reset()
    return torch.compile(fn)


def _gn_inputs(batch, C, H, emb, dtype, channels_last, grad=False):
    g = torch.Generator("cuda").manual_seed(0)
    x = (-2.3 + 0.5 * torch.randn(batch, C, H, H, generator=g, device="cuda")).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = (1.0 + 0.3 * torch.randn(C, generator=g, device="cuda")).to(dtype)
    b = (0.2 * torch.randn(C, generator=g, device="cuda")).to(dtype)
    e = torch.randn(batch, C, generator=g, device="cuda").to(dtype) if emb else None
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
def test_copy(benchmark, copy_gbps):
    """The baseline every rate is compared with, as its own row."""
    src = torch.empty(2**27, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    _run(benchmark, lambda: dst.copy_(src), 2 * src.numel() * 4, copy_gbps, provider="copy")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype, channels_last", LAYOUTS)
@pytest.mark.parametrize("C, H, emb, silu", GN_SHAPES)
def test_group_norm_forward(benchmark, copy_gbps, C, H, emb, silu, dtype, channels_last, provider):
    batch = 256
    x, w, b, e = _gn_inputs(batch, C, H, emb, dtype, channels_last)
    fn = _gn_fn(provider)
    with torch.no_grad():
        y = _run(benchmark, lambda: fn(x, 32, w, b, e, silu), 2 * x.numel() * x.element_size(), copy_gbps,
                 provider=provider, shape=list(x.shape), dtype=str(dtype), channels_last=channels_last,
                 emb=emb, silu=silu)
        ref = gn.group_norm_silu_reference(x.float(), 32, w.float(), b.float(), e.float() if emb else None, silu)
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype, channels_last", LAYOUTS)
@pytest.mark.parametrize("C, H, emb, silu", GN_SHAPES[:2])
def test_group_norm_backward(benchmark, copy_gbps, C, H, emb, silu, dtype, channels_last, provider):
    """The backward alone (autograd.grad of a saved forward): reads x and dy, writes dx (3 passes)."""
    batch = 128
    x, w, b, e = _gn_inputs(batch, C, H, emb, dtype, channels_last, grad=True)
    y = _gn_fn(provider)(x, 32, w, b, e, silu)
    dy = torch.randn_like(y)
    inputs = [t for t in (x, w, b, e) if t is not None]
    grads = _run(benchmark, lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True),
                 3 * x.numel() * x.element_size(), copy_gbps, provider=provider, shape=list(x.shape),
                 dtype=str(dtype), channels_last=channels_last, emb=emb, silu=silu)
    assert all(torch.isfinite(g.float()).all() for g in grads)


STEP_VARIANTS = [
    pytest.param("ancestral", "fixedlarge", id="ancestral-fixedlarge"),
    pytest.param("ancestral", "learned_range", id="ancestral-learned_range"),
    pytest.param("ddim", "fixedlarge", id="ddim-eta1"),
]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", [32, 256], ids=["cifar10-256x3x32x32", "256x3x256x256"])
@pytest.mark.parametrize("sampler, var_type", STEP_VARIANTS)
def test_step(benchmark, copy_gbps, sampler, var_type, size, provider):
    """One middle step of a 1000-step process (noise drawn); state float32, clip_denoised on."""
    diffusion = GaussianDiffusion(make_betas("linear", 1000), var_type=var_type)
    eta = 1.0 if sampler == "ddim" else 0.0
    k, seed = 500, 0
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(256, 3, size, size, generator=g, device="cuda")
    channels = 6 if diffusion.learned_variance else 3
    out = torch.randn(256, channels, size, size, generator=g, device="cuda")
    if diffusion.learned_variance:
        out[:, 3:].uniform_(-1.0, 1.0)
    tables = st.step_tables(diffusion, "cuda", sampler, eta)
    if provider == "fused":
        k_dev, key, buf = tables.steps[k], tables.key(seed, 0), torch.empty_like(x)

        def fn():
            return st.fused_step(tables, x, out, k_dev, key, out=buf)
    elif provider == "eager":
        def fn():
            return reference_step(diffusion, x, k, out, seed=seed, sampler=sampler, eta=eta)[0]
    else:
        twin = _compiled(st.step_twin)

        def fn():
            return twin(tables, x, out, k, seed=seed)[0]
    nbytes = (x.numel() + out.numel() + x.numel()) * 4  # read x_t and the model output, write x_{t-1}
    x_prev = _run(benchmark, fn, nbytes, copy_gbps, provider=provider, shape=list(x.shape), sampler=sampler,
                  var_type=var_type)
    ref = reference_step(diffusion, x, k, out, seed=seed, sampler=sampler, eta=eta)[0]
    assert ((x_prev - ref).norm() / ref.norm()).item() < 1e-5
