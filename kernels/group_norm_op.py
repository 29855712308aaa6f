"""The fused GroupNorm(+emb)(+SiLU) as a PyTorch custom op: `torch.ops.fastddpm.group_norm_silu`.

torch.compile cannot trace into our Triton launcher (Python-side tiling, lazily jitted kernels),
and a plain call would be a graph break. Registered as a custom op with a fake (shape-only)
implementation, it is one opaque node that Dynamo records and Inductor schedules: the model
compiles with fullgraph=True, our kernel stays, and Inductor fuses what surrounds it (bias adds,
residual adds, the attention scale, layout conversions). It is the same function as
`group_norm_silu_reference` (kernels/group_norm.py, which gives the equation):

    y = act(GroupNorm(x + emb[n, c]) * weight + bias),  act = SiLU if silu else identity

    x [N, C, *spatial], weight and bias [C], emb [N, C] or None  ->  y of x's shape and dtype

Implementations, by the device of x:
    CUDA     the Triton launcher `group_norm_silu` (one kernel; statistics in float32)
    other    the torch twin `group_norm_silu_reference` (how CPU tests and CI run it)
    fake     an empty tensor of x's shape, dtype and layout (what Dynamo and Inductor trace)
The output layout is pinned (channels-last for a channels-last 4-D x, else contiguous) so the
real outputs have exactly the fake's strides, as Inductor assumes.

Autograd (`register_autograd`): the backward is a second custom op,
`fastddpm::group_norm_silu_backward`, that returns (dx, dweight, dbias, demb). On CUDA it runs the
Triton kernels: `group_norm_fwd` recomputes the group statistics (mean, rstd; the op saves only
its inputs, so its schema stays one tensor out) and `group_norm_bwd` applies the backward
formula of kernels/group_norm.py. Elsewhere it is the vector-Jacobian product of the torch twin
(`torch.func.vjp`, recomputing the forward). So training through the op is exact and compiles.

Registration happens on first use (`register()`), never at import: `import fastddpm` stays
free of side effects. It works with torch >= 2.4 (`torch.library.custom_op`); tested on 2.13
(CPU). The CUDA implementation is UNVERIFIED here (no GPU was lent to the session that wrote
it); tests/test_group_norm_op.py has gpu-marked cases for the first lent GPU.
"""
from __future__ import annotations

import torch

from .group_norm import group_norm_bwd, group_norm_fwd, group_norm_silu, group_norm_silu_reference

NAMESPACE = "fastddpm"
FORWARD = "group_norm_silu"
BACKWARD = "group_norm_silu_backward"
_FORWARD_SCHEMA = "(Tensor x, int num_groups, Tensor weight, Tensor bias, Tensor? emb, bool silu, float eps) -> Tensor"
# demb is an empty tensor when emb is None (a custom op cannot return an optional tensor).
_BACKWARD_SCHEMA = ("(Tensor dy, Tensor x, int num_groups, Tensor weight, Tensor bias, Tensor? emb, bool silu, "
                    "float eps) -> (Tensor, Tensor, Tensor, Tensor)")

_registered = False


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    """The output layout for input x: channels-last when x is (and not also contiguous), else contiguous."""
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _empty_like(ref: torch.Tensor, fmt: torch.memory_format | None = None) -> torch.Tensor:
    return torch.empty_like(ref, memory_format=fmt if fmt is not None else _layout_of(ref))


def _pinned(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """t with the strides `_empty_like(ref)` has (the fake's), copied only when they differ."""
    want = torch.empty_like(ref, device="meta", memory_format=_layout_of(ref)).stride()
    if t.stride() == want:
        return t
    out = torch.empty_strided(t.shape, want, dtype=t.dtype, device=t.device)
    return out.copy_(t)


# ------------------------------------------------------------------------------ implementations
def _forward_twin(x, num_groups, weight, bias, emb, silu, eps):
    return _pinned(group_norm_silu_reference(x, num_groups, weight, bias, emb, silu, eps), x)


def _forward_cuda(x, num_groups, weight, bias, emb, silu, eps):
    with torch.no_grad():  # the launcher's own autograd is not wanted here: register_autograd owns it
        return _pinned(group_norm_silu(x, num_groups, weight, bias, emb, silu, eps), x)


def _forward_fake(x, num_groups, weight, bias, emb, silu, eps):
    return _empty_like(x)


def _backward_twin(dy, x, num_groups, weight, bias, emb, silu, eps):
    if emb is None:
        _, vjp = torch.func.vjp(lambda x_, w_, b_: group_norm_silu_reference(x_, num_groups, w_, b_, None, silu, eps),
                                x, weight, bias)
        dx, dw, db = vjp(dy)
        demb = x.new_empty(0)
    else:
        _, vjp = torch.func.vjp(lambda x_, w_, b_, e_: group_norm_silu_reference(x_, num_groups, w_, b_, e_, silu, eps),
                                x, weight, bias, emb)
        dx, dw, db, demb = vjp(dy)
        demb = _pinned(demb, emb)
    return _pinned(dx, x), _pinned(dw, weight), _pinned(db, bias), demb


def _backward_cuda(dy, x, num_groups, weight, bias, emb, silu, eps):
    """The Triton backward: statistics recomputed by the forward kernel, then the backward kernel."""
    with torch.no_grad():
        _, mean, rstd = group_norm_fwd(x, num_groups, weight, bias, emb, silu, eps)
        dx, dw, db, demb = group_norm_bwd(dy, x, num_groups, weight, bias, mean, rstd, emb, silu)
    demb = _pinned(demb, emb) if emb is not None else x.new_empty(0)
    return _pinned(dx, x), _pinned(dw, weight), _pinned(db, bias), demb


def _backward_fake(dy, x, num_groups, weight, bias, emb, silu, eps):
    demb = _empty_like(emb) if emb is not None else x.new_empty(0)
    return _empty_like(x), _empty_like(weight), _empty_like(bias), demb


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, emb, silu, eps = inputs
    ctx.save_for_backward(x, weight, bias, emb)
    ctx.num_groups, ctx.silu, ctx.eps = num_groups, silu, eps


def _backward(ctx, dy):
    x, weight, bias, emb = ctx.saved_tensors
    dx, dw, db, demb = torch.ops.fastddpm.group_norm_silu_backward(dy, x, ctx.num_groups, weight, bias, emb,
                                                                   ctx.silu, ctx.eps)
    return dx, None, dw, db, (demb if emb is not None else None), None, None


def register() -> None:
    """Register `fastddpm::group_norm_silu` and its backward with PyTorch (once per process)."""
    global _registered
    if _registered:
        return
    ops = torch.ops.fastddpm
    if not hasattr(ops, FORWARD):  # a second copy of this module (reload) finds them registered
        bwd = torch.library.custom_op(f"{NAMESPACE}::{BACKWARD}", _backward_twin, mutates_args=(),
                                      schema=_BACKWARD_SCHEMA)
        bwd.register_kernel("cuda", _backward_cuda)
        bwd.register_fake(_backward_fake)
        fwd = torch.library.custom_op(f"{NAMESPACE}::{FORWARD}", _forward_twin, mutates_args=(),
                                      schema=_FORWARD_SCHEMA)
        fwd.register_kernel("cuda", _forward_cuda)
        fwd.register_fake(_forward_fake)
        fwd.register_autograd(_backward, setup_context=_setup_context)
    _registered = True


def group_norm_silu_op(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                       emb: torch.Tensor | None = None, silu: bool = True, eps: float = 1e-5) -> torch.Tensor:
    """y = act(GroupNorm(x + emb) * weight + bias) through the registered custom op (module docstring).

    The signature of `kernels.group_norm_silu`, so it drops into `unet.GroupNormAct.impl`.
    x [N, C, *spatial]; weight, bias [C]; emb [N, C] or None. Returns y of x's shape and dtype,
    channels-last for a channels-last 4-D x, else contiguous. Differentiable in x, weight, bias
    and emb. Call `register()` before torch.compile traces it (the backends do); an eager first
    call registers the op itself.
    """
    if not _registered:
        register()
    return torch.ops.fastddpm.group_norm_silu(x, int(num_groups), weight, bias, emb, bool(silu), float(eps))
