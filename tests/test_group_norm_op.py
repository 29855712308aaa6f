"""The fused GroupNorm+SiLU as a custom op (kernels/group_norm_op.py): same function as the twin,
fake implementation and autograd registered correctly, no graph break in the U-Net under Dynamo."""
import subprocess
import sys

import pytest
import torch

from fastddpm.kernels.group_norm import group_norm_silu, group_norm_silu_reference
from fastddpm.kernels.group_norm_op import group_norm_silu_op, register
from fastddpm.unet import GroupNormAct, group_norm_impl
from helpers import randomized_unet, rel_err

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _inputs(shape, groups, dtype=torch.float32, emb=True, channels_last=False, device="cpu", seed=0):
    """Off-centre x (-2.3 + 0.5 randn, as Triton's layer-norm test), random affine and embedding."""
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = (-2.3 + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(device, dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = (1.0 + 0.2 * torch.randn(C, generator=g, dtype=torch.float64)).to(device, dtype)
    b = (0.2 * torch.randn(C, generator=g, dtype=torch.float64)).to(device, dtype)
    e = torch.randn(shape[0], C, generator=g, dtype=torch.float64).to(device, dtype) if emb else None
    return x, groups, w, b, e


def test_import_does_not_register_the_op():
    """Registration is lazy: importing fastddpm (and this module) leaves torch.ops.fastddpm empty."""
    code = ("import fastddpm, fastddpm.backends, fastddpm.kernels.group_norm_op, torch\n"
            "assert not hasattr(torch.ops.fastddpm, 'group_norm_silu')\n"
            "fastddpm.kernels.group_norm_op.register()\n"
            "assert hasattr(torch.ops.fastddpm, 'group_norm_silu')\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("shape, groups, emb, silu, channels_last", [
    ((2, 8, 5, 6), 4, True, True, False),  # minimal, odd spatial size, embedding + SiLU
    ((3, 6, 7, 3), 3, False, False, True),  # channels-last, plain GroupNorm (attention's norm)
    ((2, 16, 4), 8, True, True, False),  # 1-D spatial
])
def test_op_is_the_twin_in_float64(shape, groups, emb, silu, channels_last):
    x, G, w, b, e = _inputs(shape, groups, torch.float64, emb, channels_last)
    out = group_norm_silu_op(x, G, w, b, e, silu, 1e-5)
    ref = group_norm_silu_reference(x, G, w, b, e, silu, 1e-5)
    assert rel_err(out, ref) < 1e-12
    assert out.dtype == x.dtype and out.shape == x.shape
    # the layout is pinned to what the fake implementation promises
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


def test_op_gradients_match_the_twin():
    """gradcheck in float64 against finite differences, with and without the embedding."""
    x, G, w, b, e = _inputs((2, 8, 3, 5), 4, torch.float64)
    args = [t.clone().requires_grad_() for t in (x, w, b, e)]
    assert torch.autograd.gradcheck(lambda x_, w_, b_, e_: group_norm_silu_op(x_, G, w_, b_, e_), args)
    assert torch.autograd.gradcheck(lambda x_, w_, b_: group_norm_silu_op(x_, G, w_, b_, None, False), args[:3])


@pytest.mark.parametrize("emb, silu, channels_last", [
    (True, True, False),  # the residual block's norm: embedding + SiLU, NCHW
    (False, False, True),  # attention's plain norm, channels-last
])
def test_triton_backward_of_the_op_matches_the_twin(emb, silu, channels_last):
    """The op's CUDA backward (group_norm_fwd recomputes mean/rstd, group_norm_bwd applies the
    formula), run here on CPU tensors through Triton's interpreter, against the twin's vjp in
    float32 (1e-5 relative) on fresh off-centre input and a random upstream gradient."""
    from fastddpm.kernels import group_norm_op

    x, G, w, b, e = _inputs((2, 8, 5, 4), 4, torch.float32, emb, channels_last, seed=3)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    got = group_norm_op._backward_cuda(dy, x, G, w, b, e, silu, 1e-5)
    ref = group_norm_op._backward_twin(dy, x, G, w, b, e, silu, 1e-5)
    for name, a, r in zip(("dx", "dweight", "dbias", "demb"), got, ref):
        assert a.shape == r.shape and a.stride() == r.stride(), name
        if r.numel():
            assert rel_err(a, r) < 1e-5, name


def test_op_registration_passes_torch_opcheck():
    """torch.library.opcheck: schema, fake tensor, autograd registration and AOT dispatch agree."""
    register()
    op = torch.ops.fastddpm.group_norm_silu.default
    x, G, w, b, e = _inputs((2, 8, 4, 4), 4)
    torch.library.opcheck(op, (x, G, w.requires_grad_(), b, e, True, 1e-5))
    x, G, w, b, _ = _inputs((2, 8, 4, 4), 2, channels_last=True, seed=1)
    torch.library.opcheck(op, (x.requires_grad_(), G, w, b, None, False, 1e-6))


def test_unet_with_the_op_traces_without_a_graph_break():
    """Dynamo sees the whole tiny U-Net as one graph with the op in it (8x8, batch 2), and no
    native group_norm left over."""
    register()
    model = randomized_unet("tiny", seed=1, image_size=8)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad(), group_norm_impl(model, group_norm_silu_op):
        explanation = torch._dynamo.explain(model)(x, t)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    packet = torch.ops.fastddpm.group_norm_silu
    targets = [n.target for n in explanation.graphs[0].graph.nodes if n.op == "call_function"]
    n_norms = sum(isinstance(m, GroupNormAct) for m in model.modules())
    assert sum(t in (packet, packet.default) for t in targets) == n_norms
    assert not any("group_norm" in str(t) and t not in (packet, packet.default) for t in targets)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_op_is_the_triton_launcher(dtype, tol, channels_last):
    """On CUDA the op runs the Triton kernel: equal to the launcher, close to the float64 twin."""
    x, G, w, b, e = _inputs((4, 64, 16, 16), 32, dtype, channels_last=channels_last, device="cuda")
    out = group_norm_silu_op(x, G, w, b, e)
    torch.testing.assert_close(out, group_norm_silu(x, G, w, b, e), rtol=0, atol=0)
    ref = group_norm_silu_reference(x.double(), G, w.double(), b.double(), e.double())
    assert rel_err(out, ref) < tol
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.gpu
@cuda
def test_cuda_op_gradients_match_the_twin():
    x, G, w, b, e = _inputs((2, 64, 8, 8), 32, device="cuda")
    args = [t.clone().requires_grad_() for t in (x, w, b, e)]
    group_norm_silu_op(args[0], G, *args[1:]).square().sum().backward()
    ref_args = [t.double().clone().requires_grad_() for t in (x, w, b, e)]
    group_norm_silu_reference(ref_args[0], G, *ref_args[1:]).square().sum().backward()
    for a, r in zip(args, ref_args):
        assert rel_err(a.grad, r.grad) < 1e-4
