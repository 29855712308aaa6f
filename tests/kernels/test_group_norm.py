"""The fused GroupNorm(+emb)(+SiLU) Triton kernels against the torch twin and float64.

On a CPU-only host the kernels run under Triton's interpreter (tests/conftest.py), so shapes are
small; with CUDA the same tests run compiled. Errors are relative, ||out - ref|| / ||ref||,
against (a) the op evaluated in float64 from the same (rounded) inputs and (b) the torch twin
`group_norm_silu_reference` in float32 on the same inputs. The twin is not run in bf16/fp16 as
a reference: it rounds x + emb and every intermediate to the low precision, and its own error
(up to 3e-2 on demb in bf16) exceeds the kernel's.
"""
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

from fastddpm.errors import FastDDPMError  # noqa: E402
from fastddpm.kernels import group_norm as gn  # noqa: E402
from fastddpm.kernels import group_norm_cl as gcl  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# SiLU's exp(-p) overflows to inf for very negative p (then p / (1 + inf) = -0, correct); numpy
# under the interpreter warns about it, a GPU does not.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Each dtype with its tolerance: the unit roundoff of the output format (bf16 2^-8, fp16 2^-11)
# sets the floor (about u / sqrt(3) relative); measured here: fp32 <= 6e-7, bf16 <= 3.5e-3,
# fp16 <= 3e-4. The fp32 bound is the project's (DESIGN.md, Testing).
DTYPES = [
    pytest.param(torch.float32, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-2, id="bf16"),
    pytest.param(torch.float16, 1e-3, id="fp16"),
]

SHAPES = [
    pytest.param((2, 4, 1, 3, 2), id="minimal"),  # 2 channels x 3 positions a group
    pytest.param((2, 6, 5, 7, 3), id="non-pow2-spatial"),  # 5x7: masked spatial tail
    pytest.param((2, 12, 5, 7, 4), id="non-pow2-group"),  # 3 channels a group: masked channel rows
    pytest.param((2, 128, 4, 4, 32), id="unet-128"),  # the cifar10 U-Net's first level, 32 groups
    pytest.param((2, 256, 3, 5, 32), id="unet-256"),  # its deeper levels, 8 channels a group
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def make_inputs(shape, dtype, emb=True, channels_last=False, seed=0):
    """Off-centre x (-2.3 + 0.5 randn), random affine (never 1 / 0), emb and dy, all in `dtype`."""
    N, C, H, W, G = shape
    g = torch.Generator().manual_seed(seed)
    x = -2.3 + 0.5 * torch.randn(N, C, H, W, generator=g)
    w = 1.0 + 0.3 * torch.randn(C, generator=g)
    b = 0.2 * torch.randn(C, generator=g)
    e = torch.randn(N, C, generator=g) if emb else None
    dy = torch.randn(N, C, H, W, generator=g)
    to = dict(device=DEVICE, dtype=dtype)
    x, w, b, dy = x.to(**to), w.to(**to), b.to(**to), dy.to(**to)
    e = e.to(**to) if e is not None else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    return x, G, w, b, e, dy


def run_with_grads(fn, x, G, w, b, e, dy, silu, dtype=None):
    """fn's output and the gradients of <fn(...), dy> in x, w, b, emb, with inputs cast to `dtype`."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in (x, w, b, e)]
    y = fn(leaves[0], G, leaves[1], leaves[2], leaves[3], silu)
    y.backward(dy.to(y.dtype))
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def check_against_references(x, G, w, b, e, dy, silu, tol, refs=(torch.float64, torch.float32)):
    y, grads = run_with_grads(gn.group_norm_silu, x, G, w, b, e, dy, silu)
    assert y.dtype == x.dtype and y.shape == x.shape
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        assert y.stride() == x.stride()  # the layout is kept
    for ref_dtype in refs:  # float64 truth, then the float32 twin
        y_ref, grads_ref = run_with_grads(gn.group_norm_silu_reference, x, G, w, b, e, dy, silu, ref_dtype)
        assert rel_err(y, y_ref) < tol, ref_dtype
        for name, got, want in zip(("dx", "dgamma", "dbeta", "demb"), grads, grads_ref):
            if want is None:
                assert got is None
                continue
            assert got.dtype == x.dtype
            assert rel_err(got, want) < tol, (name, ref_dtype, rel_err(got, want))


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward(shape, dtype, tol):
    """The ResBlock case (emb added, SiLU) over shapes and dtypes: y, dx, dgamma, dbeta, demb."""
    x, G, w, b, e, dy = make_inputs(shape, dtype)
    check_against_references(x, G, w, b, e, dy, True, tol)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "identity"])
@pytest.mark.parametrize("emb", [True, False], ids=["emb", "no-emb"])
def test_variants(emb, silu, channels_last):
    """Without the embedding (first norm of a block), without SiLU (attention norm), channels-last."""
    x, G, w, b, e, dy = make_inputs((2, 12, 5, 7, 4), torch.float32, emb=emb, channels_last=channels_last)
    check_against_references(x, G, w, b, e, dy, silu, 1e-5)


@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_channels_last_low_precision(dtype, tol):
    x, G, w, b, e, dy = make_inputs((2, 6, 5, 7, 3), dtype, channels_last=True)
    check_against_references(x, G, w, b, e, dy, True, tol)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_chunked_path(monkeypatch, channels_last):
    """Groups larger than one register tile: merged per-chunk statistics, x read twice.

    The tile limits are lowered so a small group needs 5 chunks (the last one partial); on a
    GPU the same path serves groups over FWD_MAX_TILE / BWD_MAX_TILE values (e.g. 384 channels
    at 32x32). The input sits at 32 +- 0.5: float32 E[x^2] - E[x]^2 statistics miss the tolerance
    by 17x there (measured: 1.7e-4), the merged two-pass statistics meet it 5x over (1.8e-6).
    Only float64 is the reference: torch's own float32 CPU group_norm errs 1.6e-5 on this input.
    """
    monkeypatch.setattr(gn, "FWD_MAX_TILE", 16)
    monkeypatch.setattr(gn, "BWD_MAX_TILE", 16)
    monkeypatch.setattr(gn, "CHUNK_TILE", 16)
    assert gn._tiles(3, 35, gn.FWD_MAX_TILE)[2] is False
    x, G, w, b, e, dy = make_inputs((2, 12, 5, 7, 4), torch.float32, channels_last=channels_last)
    check_against_references(x + 34.3, G, w, b, e, dy, True, 1e-5, refs=(torch.float64,))


# The channels-last kernels (kernels/group_norm_cl.py) at each cifar10 channel count, 32 groups, at
# small spatial sizes: C = 128, 256, 384 (12 channels a group, C not a power of two), 512.
CL_SHAPES = [
    pytest.param((2, 128, 3, 5, 32), id="C128"),
    pytest.param((2, 256, 2, 3, 32), id="C256"),
    pytest.param((1, 384, 3, 3, 32), id="C384-batch1"),
    pytest.param((2, 512, 3, 3, 32), id="C512"),
]
# How the rows of a sample are shared out: one program (every phase in one launch), one program
# whose tile loop runs several times with a masked tail, or split over several programs (three
# launches: stats, finalize, apply) with a partial last split.
CL_PATHS = [
    pytest.param((1, None), id="fused"),  # the default tiles
    pytest.param((1, 1024), id="fused-looped"),
    pytest.param((132, 1024), id="split"),
]


@pytest.fixture
def cl_path(request, monkeypatch):
    """Force a channels-last plan: (SM count the planner assumes off CUDA, tile size or None)."""
    sms, tile = request.param
    monkeypatch.setattr(gcl, "CPU_SM_COUNT", sms)
    if tile is not None:
        monkeypatch.setattr(gcl, "FWD_TILE", tile)
        monkeypatch.setattr(gcl, "BWD_TILE", tile)
    return sms, tile


@pytest.mark.parametrize("dtype, tol", DTYPES[:2])
@pytest.mark.parametrize("cl_path", CL_PATHS, indirect=True)
@pytest.mark.parametrize("shape", CL_SHAPES)
def test_channels_last_rows(shape, cl_path, dtype, tol):
    """The whole-row kernels against float64 and the float32 twin: y and every gradient, emb + SiLU."""
    if not torch.cuda.is_available():
        N, C, H, W, G = shape
        for tile in (gcl.FWD_TILE, gcl.BWD_TILE):
            cfg = gcl.plan(N, C, H * W, G, torch.device("cpu"), tile, 16)
            assert (cfg["SPLIT"] > 1) == (cl_path[0] > 1), cfg
            if cl_path[1] is not None:  # the small tile: the loop (or the split) covers several tiles
                assert H * W > cfg["BLOCK_S"], cfg
    x, G, w, b, e, dy = make_inputs(shape, dtype, channels_last=True)
    check_against_references(x, G, w, b, e, dy, True, tol)


@pytest.mark.parametrize("cl_path", CL_PATHS, indirect=True)
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "identity"])
@pytest.mark.parametrize("emb", [True, False], ids=["emb", "no-emb"])
def test_channels_last_rows_variants(emb, silu, cl_path):
    """Off-centre input (x at 32 +- 0.5: the merged Welford statistics must not lose digits),
    with and without the embedding and SiLU; float64 is the reference (module docstring of
    test_chunked_path: torch's own float32 group_norm errs 1.6e-5 at this offset)."""
    x, G, w, b, e, dy = make_inputs((2, 384, 3, 5, 32), torch.float32, emb=emb, channels_last=True, seed=1)
    check_against_references(x + 34.3, G, w, b, e, dy, silu, 1e-5, refs=(torch.float64,))


def test_other_layouts_and_ranks():
    """A non-flattenable layout (a transposed view) is copied first; 3-D [N, C, L] inputs work."""
    x, G, w, b, e, dy = make_inputs((2, 6, 5, 7, 3), torch.float32)
    check_against_references(x.transpose(2, 3), G, w, b, e, dy.transpose(2, 3), True, 1e-5)
    check_against_references(x.flatten(2), G, w, b, e, dy.flatten(2), False, 1e-5)


@pytest.mark.parametrize("which", range(4), ids=["x", "gamma", "beta", "emb"])
def test_one_input_needs_grad(which):
    """Only one input requires grad (e.g. a frozen block): its gradient is right, the rest are None."""
    x, G, w, b, e, dy = make_inputs((2, 6, 5, 7, 3), torch.float32)
    inputs = [x, w, b, e]
    inputs[which] = inputs[which].clone().requires_grad_()
    gn.group_norm_silu(inputs[0], G, *inputs[1:3], inputs[3]).backward(dy)
    ref = [t.double().requires_grad_(i == which) for i, t in enumerate((x, w, b, e))]
    gn.group_norm_silu_reference(ref[0], G, *ref[1:3], ref[3]).backward(dy.double())
    assert rel_err(inputs[which].grad, ref[which].grad) < 1e-5


def test_broadcast_upstream_gradient():
    """y.sum().backward() hands the backward an expanded dy (every stride 0), read through its strides."""
    x, G, w, b, e, _ = make_inputs((2, 6, 5, 7, 3), torch.float32)
    grads = []
    for fn, dtype in ((gn.group_norm_silu, torch.float32), (gn.group_norm_silu_reference, torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w, b, e)]
        fn(leaves[0], G, *leaves[1:]).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_fwd_bwd_entry_points(channels_last):
    """group_norm_fwd / group_norm_bwd (the kernels without autograd, for a custom op) give what
    the autograd path gives, and mean / rstd are the group statistics of x + emb in float64."""
    x, G, w, b, e, dy = make_inputs((2, 12, 5, 7, 4), torch.float32, channels_last=channels_last)
    y, mean, rstd = gn.group_norm_fwd(x, G, w, b, e, silu=True, eps=1e-5)
    assert mean.shape == rstd.shape == (2, G) and mean.dtype == rstd.dtype == torch.float32
    h = (x.double() + e.double()[:, :, None, None]).reshape(2, G, -1)
    assert rel_err(mean, h.mean(-1)) < 1e-6
    assert rel_err(rstd, (h.var(-1, unbiased=False) + 1e-5).rsqrt()) < 1e-5
    dx, dgamma, dbeta, demb = gn.group_norm_bwd(dy, x, G, w, b, mean, rstd, e, silu=True)
    y_ref, grads = run_with_grads(gn.group_norm_silu, x, G, w, b, e, dy, True)
    assert torch.equal(y, y_ref) and dx.stride() == x.stride()
    for got, want in zip((dx, dgamma, dbeta, demb), grads):
        assert torch.equal(got, want)


def test_no_grad_matches():
    """Under no_grad the forward launches without autograd bookkeeping and gives the same y."""
    x, G, w, b, e, _ = make_inputs((2, 6, 5, 7, 3), torch.float32)
    with torch.no_grad():
        y = gn.group_norm_silu(x, G, w.requires_grad_(), b, e)
    assert not y.requires_grad
    ref = gn.group_norm_silu_reference(x.double(), G, w.detach().double(), b.double(), e.double())
    assert rel_err(y, ref) < 1e-5


def test_bad_input_errors():
    x, G, w, b, e, _ = make_inputs((2, 6, 5, 7, 3), torch.float32)
    with pytest.raises(FastDDPMError, match="num_groups 4 does not divide the 6 channels"):
        gn.group_norm_silu(x, 4, w, b, e)
    with pytest.raises(FastDDPMError, match="float32, bfloat16 or float16"):
        gn.group_norm_silu(x.double(), G, w, b, e)
    with pytest.raises(FastDDPMError, match=r"emb must have shape \[2, 6\]"):
        gn.group_norm_silu(x, G, w, b, e[:1])


def test_import_does_not_load_triton():
    """`import fastddpm` (whose U-Net imports this module for the twin) never imports Triton."""
    code = ("import sys, fastddpm, fastddpm.kernels as k; from fastddpm.kernels import group_norm_silu; "
            "assert k.triton_step and 'triton' not in sys.modules, sorted(m for m in sys.modules if 'triton' in m)")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("C, HW", [(128, 32), (256, 16), (384, 32), (512, 8)])
def test_cifar10_shapes_gpu(C, HW, dtype, tol):
    """The cifar10 preset's real activation shapes (batch 8), compiled: one-tile and chunked paths."""
    x, G, w, b, e, dy = make_inputs((8, C, HW, HW, 32), dtype)
    check_against_references(x, G, w, b, e, dy, True, tol)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype, tol", DTYPES[:2])
@pytest.mark.parametrize("batch", [8, 256], ids=["batch8-split", "batch256-fused"])
@pytest.mark.parametrize("C, HW", [(128, 32), (256, 4), (384, 32), (512, 8)])
def test_cifar10_channels_last_gpu(C, HW, batch, dtype, tol):
    """The whole-row kernels at the preset's shapes, compiled: batch 8 splits a sample's rows over
    programs (three launches), batch 256 runs one fused launch a sample (a GPU has < 256 SMs)."""
    cfg = gcl.plan(batch, C, HW * HW, 32, torch.device("cuda"), gcl.FWD_TILE, gcl.FWD_WARPS)
    assert (cfg["SPLIT"] == 1) == (batch == 256) or HW * HW <= cfg["BLOCK_S"], cfg
    x, G, w, b, e, dy = make_inputs((batch, C, HW, HW, 32), dtype, channels_last=True)
    check_against_references(x, G, w, b, e, dy, True, tol)


# ------------------------------------------------------------------ compiled for a GPU, without one
def compile_for_sm90() -> None:
    """Compile the kernels' variants to sm_90 (H100) cubins with Triton's bundled ptxas, no GPU needed.

    The interpreter runs Python, so it accepts constructs the real compiler rejects (non-constexpr
    globals, type-unstable loop variables, ...); this compiles what CUDA would run.
    """
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    gn._triton()  # binds `tl` in the kernel module
    for dtype in ("fp32", "bf16"):
        for cpg, spatial in ((4, 1024), (12, 1024), (8, 64)):  # one tile, chunked, small
            for kernel, max_tile, io, fp32_ptrs in (
                    (gn._group_norm_fwd_kernel, gn.FWD_MAX_TILE, "X Y", "W B EMB MEAN RSTD"),
                    (gn._group_norm_bwd_kernel, gn.BWD_MAX_TILE, "X DY DX", "W B EMB MEAN RSTD DW DB DEMB")):
                fn = JITFunction(kernel)
                block_c, block_s, one_tile, warps = gn._tiles(cpg, spatial, max_tile)
                constexprs = dict(HAS_EMB=True, SILU=True, BLOCK_C=block_c, BLOCK_S=block_s, ONE_TILE=one_tile)
                sig = {name: "fp32" if name == "eps" else "i32" for name in fn.arg_names}  # scalars
                sig.update({name: "*" + dtype for name in io.split()}, **{name: "*fp32" for name in fp32_ptrs.split()})
                sig.update({k: "constexpr" for k in constexprs})
                compiled = triton.compile(triton.compiler.ASTSource(fn, sig, constexprs),
                                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
                assert compiled.asm["cubin"], (kernel.__name__, dtype, cpg, spatial)


def test_compiles_for_sm90():
    """The kernels compile for a real GPU (see compile_for_sm90), in a process without the interpreter."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, set to silence its warning
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]


if __name__ == "__main__":
    compile_for_sm90()
