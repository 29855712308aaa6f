"""Fused GroupNorm (+ time-embedding add) (+ SiLU): the torch reference twin and the Triton kernels.

    y[n, c, ...] = act( (x[n, c, ...] + emb[n, c] - mu[n, g]) / sqrt(var[n, g] + eps) * gamma[c] + beta[c] )

with g = c // (C / G) the group of channel c, mu and var the mean and (biased) variance of
x + emb over the group's channels and all spatial positions, and act = SiLU or the identity.

The embedding is added *before* the normalisation: that is where the DDPM residual block puts
it (h = conv1(...) + dense(temb); h = SiLU(GroupNorm(h))), so a converted DDPM or diffusers
checkpoint gives the same output. The Triton kernels (forward and backward) live beside this
twin and are compared with it in tests/kernels/.

Backward (h = x + emb, xhat = (h - mu) * rstd, p = xhat * gamma + beta, y = act(p), and the
count M = (C / G) * spatial elements of a group), with dp = dy * act'(p),
act'(p) = s (1 + p (1 - s)) for SiLU (s = sigmoid(p)) and 1 for the identity:

    dgamma[c] = sum_{n, s} dp * xhat          dbeta[c] = sum_{n, s} dp
    dxhat     = dp * gamma
    c1[n, g]  = (1/M) sum_group dxhat * xhat  = (1/M) sum_{c in g} gamma[c] * dgamma_n[c]
    c2[n, g]  = (1/M) sum_group dxhat         = (1/M) sum_{c in g} gamma[c] * dbeta_n[c]
    dx        = rstd * (dxhat - xhat * c1 - c2)
    demb[n, c] = sum_s dx[n, c, s]            (emb is broadcast over space)

where dgamma_n, dbeta_n are one sample's per-channel sums. The kernels write those per-sample
sums to [N, C] float32 buffers and torch sums them over n: deterministic, no atomics.

Memory layout: x is addressed as [N, C, S] through three strides (S = the spatial positions
flattened). Channels-last x (stride_c = 1, stride_s = C) goes to the whole-row kernels of
kernels/group_norm_cl.py (16-byte vector access; a sample's rows split over programs at small
batch); every other layout to the per-group kernels below (NCHW-contiguous: stride_s = 1 and
16-byte access along the spatial run). A layout whose spatial dims do not flatten to one stride
is made contiguous first.

Triton is imported on first use (`_triton()`), not when this module is imported: the U-Net
imports the twin from here, and `import fastddpm` must work, fast, without Triton. The kernel
bodies are plain functions at module level that `_triton()` wraps with `triton.jit`.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F

from . import group_norm_cl
from .launch import Launch

triton = None  # bound by _triton() on first use
tl = None


def group_norm_silu_reference(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                              emb: torch.Tensor | None = None, silu: bool = True, eps: float = 1e-5) -> torch.Tensor:
    """Plain-torch GroupNorm(x + emb) * weight + bias, then SiLU if `silu`.

    x [N, C, *spatial] (any memory layout), weight and bias [C], emb [N, C] or None.
    Returns a tensor of x's shape and dtype.
    """
    if emb is not None:
        x = x + emb.reshape(emb.shape + (1,) * (x.ndim - 2)).to(x.dtype)
    y = F.group_norm(x, num_groups, weight.to(x.dtype), bias.to(x.dtype), eps)
    return F.silu(y) if silu else y


# ------------------------------------------------------------------------------------- kernels
# Both kernels run one program per (sample n, group g) and see the group as a tile of
# [BLOCK_C channels, BLOCK_S spatial positions]; per-channel values (gamma, beta, emb) are
# vectors over the rows. With ONE_TILE the whole group is one tile: it is loaded once and kept
# in registers (one read of x, one write of y). Otherwise the group is walked in chunks of
# BLOCK_S positions: the forward merges per-chunk statistics (Chan et al.'s parallel Welford
# update) and reads x a second time to write y; the backward reads x and dy twice.


def _group_norm_fwd_kernel(
    X,  # *x, input [N, C, S] at strides (sxn, sxc, sxs)
    Y,  # *y, output [N, C, S] at strides (syn, syc, sys)
    W,  # *gamma [C], contiguous
    B,  # *beta [C], contiguous
    EMB,  # *emb [N, C] at strides (sen, sec); not read unless HAS_EMB
    MEAN,  # *mu [N * G] float32, written for the backward
    RSTD,  # *rstd = 1 / sqrt(var + eps) [N * G] float32, written for the backward
    S, CPG, G,  # spatial positions, channels per group, groups
    sxn, sxc, sxs, syn, syc, sys, sen, sec,
    eps,
    HAS_EMB: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ONE_TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    rows = tl.arange(0, BLOCK_C)
    cmask = rows < CPG
    ch = g * CPG + rows  # the group's channels
    x_base = X + n.to(tl.int64) * sxn + ch[:, None] * sxc  # [BLOCK_C, 1] row starts
    y_base = Y + n.to(tl.int64) * syn + ch[:, None] * syc
    if HAS_EMB:
        e = tl.load(EMB + n.to(tl.int64) * sen + ch * sec, mask=cmask, other=0.0).to(tl.float32)
    else:
        e = tl.zeros([BLOCK_C], dtype=tl.float32)
    gamma = tl.load(W + ch, mask=cmask, other=0.0).to(tl.float32)
    beta = tl.load(B + ch, mask=cmask, other=0.0).to(tl.float32)
    cols = tl.arange(0, BLOCK_S)

    if ONE_TILE:
        # Two-pass statistics on the register tile: the mean, then the mean squared deviation.
        m = cmask[:, None] & (cols < S)[None, :]
        h = tl.load(x_base + cols[None, :] * sxs, mask=m, other=0.0).to(tl.float32) + e[:, None]
        h = tl.where(m, h, 0.0)
        mean = tl.sum(h) / (CPG * S)
        d = tl.where(m, h - mean, 0.0)
        var = tl.sum(d * d) / (CPG * S)
        rstd = 1.0 / tl.sqrt(var + eps)
        p = d * (rstd * gamma)[:, None] + beta[:, None]
        if SILU:
            p = p / (1.0 + tl.exp(-p))  # p * sigmoid(p)
        tl.store(y_base + cols[None, :] * sys, p.to(Y.dtype.element_ty), mask=m)
    else:
        # Chunked: exact two-pass statistics per chunk, merged as
        #   delta = mean_b - mean_a,  mean = mean_a + delta n_b / n,  M2 = M2_a + M2_b + delta^2 n_a n_b / n.
        count = 0.0
        mean = 0.0
        m2 = 0.0
        for s0 in range(0, S, BLOCK_S):
            s = s0 + cols
            m = cmask[:, None] & (s < S)[None, :]
            h = tl.load(x_base + s[None, :] * sxs, mask=m, other=0.0).to(tl.float32) + e[:, None]
            h = tl.where(m, h, 0.0)
            n_b = (CPG * tl.minimum(S - s0, BLOCK_S)).to(tl.float32)
            mean_b = tl.sum(h) / n_b
            d = tl.where(m, h - mean_b, 0.0)
            m2_b = tl.sum(d * d)
            n_ab = count + n_b
            delta = mean_b - mean
            mean = mean + delta * (n_b / n_ab)
            m2 = m2 + m2_b + delta * delta * (count * n_b / n_ab)
            count = n_ab
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
        # y = (x - (mu - emb)) * (rstd gamma) + beta: the shift is subtracted before scaling, so a
        # large common offset of x cancels exactly instead of in a*x + b.
        shift = mean - e
        scale = rstd * gamma
        for s0 in range(0, S, BLOCK_S):
            s = s0 + cols
            m = cmask[:, None] & (s < S)[None, :]
            xv = tl.load(x_base + s[None, :] * sxs, mask=m, other=0.0).to(tl.float32)
            p = (xv - shift[:, None]) * scale[:, None] + beta[:, None]
            if SILU:
                p = p / (1.0 + tl.exp(-p))  # p * sigmoid(p)
            tl.store(y_base + s[None, :] * sys, p.to(Y.dtype.element_ty), mask=m)
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, rstd)


def _group_norm_bwd_kernel(
    X,  # *x, the forward's input [N, C, S] at strides (sxn, sxc, sxs)
    DY,  # *dL/dy [N, C, S] at strides (sdn, sdc, sds)
    DX,  # *dL/dx, output [N, C, S] at strides (sgn, sgc, sgs)
    W,  # *gamma [C], contiguous
    B,  # *beta [C], contiguous (SiLU's derivative needs p)
    EMB,  # *emb [N, C] at strides (sen, sec); not read unless HAS_EMB
    MEAN,  # *mu [N * G] float32 from the forward
    RSTD,  # *rstd [N * G] float32 from the forward
    DW,  # *per-sample dgamma_n [N, C] float32, contiguous, output
    DB,  # *per-sample dbeta_n [N, C] float32, contiguous, output
    DEMB,  # *demb [N, C] float32, contiguous, output; not written unless HAS_EMB
    S, CPG, G,
    sxn, sxc, sxs, sdn, sdc, sds, sgn, sgc, sgs, sen, sec,
    HAS_EMB: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, ONE_TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    C = G * CPG
    rows = tl.arange(0, BLOCK_C)
    cmask = rows < CPG
    ch = g * CPG + rows
    x_base = X + n.to(tl.int64) * sxn + ch[:, None] * sxc
    dy_base = DY + n.to(tl.int64) * sdn + ch[:, None] * sdc
    dx_base = DX + n.to(tl.int64) * sgn + ch[:, None] * sgc
    if HAS_EMB:
        e = tl.load(EMB + n.to(tl.int64) * sen + ch * sec, mask=cmask, other=0.0).to(tl.float32)
    else:
        e = tl.zeros([BLOCK_C], dtype=tl.float32)
    gamma = tl.load(W + ch, mask=cmask, other=0.0).to(tl.float32)
    beta = tl.load(B + ch, mask=cmask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + pid)
    rstd = tl.load(RSTD + pid)
    shift = mean - e
    inv_m = 1.0 / (CPG * S)
    cols = tl.arange(0, BLOCK_S)

    if ONE_TILE:
        m = cmask[:, None] & (cols < S)[None, :]
        xhat = tl.where(m, (tl.load(x_base + cols[None, :] * sxs, mask=m, other=0.0).to(tl.float32)
                            - shift[:, None]) * rstd, 0.0)
        dp = tl.load(dy_base + cols[None, :] * sds, mask=m, other=0.0).to(tl.float32)
        if SILU:
            p = xhat * gamma[:, None] + beta[:, None]
            sg = 1.0 / (1.0 + tl.exp(-p))
            dp = dp * sg * (1.0 + p * (1.0 - sg))
        dw = tl.sum(dp * xhat, axis=1)
        db = tl.sum(dp, axis=1)
        c1 = tl.sum(gamma * dw, axis=0) * inv_m
        c2 = tl.sum(gamma * db, axis=0) * inv_m
        dx = tl.where(m, rstd * (dp * gamma[:, None] - xhat * c1 - c2), 0.0)
        tl.store(dx_base + cols[None, :] * sgs, dx.to(DX.dtype.element_ty), mask=m)
        if HAS_EMB:
            tl.store(DEMB + n * C + ch, tl.sum(dx, axis=1), mask=cmask)
    else:
        dw = tl.zeros([BLOCK_C], dtype=tl.float32)
        db = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + cols
            m = cmask[:, None] & (s < S)[None, :]
            xhat = tl.where(m, (tl.load(x_base + s[None, :] * sxs, mask=m, other=0.0).to(tl.float32)
                                - shift[:, None]) * rstd, 0.0)
            dp = tl.load(dy_base + s[None, :] * sds, mask=m, other=0.0).to(tl.float32)
            if SILU:
                p = xhat * gamma[:, None] + beta[:, None]
                sg = 1.0 / (1.0 + tl.exp(-p))
                dp = dp * sg * (1.0 + p * (1.0 - sg))
            dw += tl.sum(dp * xhat, axis=1)
            db += tl.sum(dp, axis=1)
        c1 = tl.sum(gamma * dw, axis=0) * inv_m
        c2 = tl.sum(gamma * db, axis=0) * inv_m
        de = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + cols
            m = cmask[:, None] & (s < S)[None, :]
            xhat = tl.where(m, (tl.load(x_base + s[None, :] * sxs, mask=m, other=0.0).to(tl.float32)
                                - shift[:, None]) * rstd, 0.0)
            dp = tl.load(dy_base + s[None, :] * sds, mask=m, other=0.0).to(tl.float32)
            if SILU:
                p = xhat * gamma[:, None] + beta[:, None]
                sg = 1.0 / (1.0 + tl.exp(-p))
                dp = dp * sg * (1.0 + p * (1.0 - sg))
            dx = tl.where(m, rstd * (dp * gamma[:, None] - xhat * c1 - c2), 0.0)
            tl.store(dx_base + s[None, :] * sgs, dx.to(DX.dtype.element_ty), mask=m)
            de += tl.sum(dx, axis=1)
        if HAS_EMB:
            tl.store(DEMB + n * C + ch, de, mask=cmask)
    tl.store(DW + n * C + ch, dw, mask=cmask)
    tl.store(DB + n * C + ch, db, mask=cmask)


@functools.cache
def _triton():
    """Import Triton and jit the kernels (once). Under TRITON_INTERPRET=1 they run on CPU tensors."""
    global triton, tl
    import triton as _tr
    import triton.language as _tl

    triton, tl = _tr, _tl
    return _tr.jit(_group_norm_fwd_kernel), _tr.jit(_group_norm_bwd_kernel)


# ------------------------------------------------------------------------------------ launchers
# Tile sizes, in elements of one group ([BLOCK_C channels x BLOCK_S positions], powers of two).
# FWD_MAX_TILE: 8192 float32 values over 8 warps (256 threads) is 32 registers a thread for the
#   tile, so the forward keeps every cifar10-preset group with <= 8 channels per group at 32x32
#   (4096 or 8192 values) in registers and reads x once. The backward holds x, dy and their
#   products at once, so it gets half: BWD_MAX_TILE = 4096.
# CHUNK_TILE: the chunk of the looped path (groups larger than the limit, e.g. 384 channels at
#   32x32): 2048 values = 8 a thread at 8 warps. ptxas for sm_90 (compiled here without a GPU)
#   reports no spills for the cifar10 tiles (at most 120 registers forward, 165 backward).
#   All three are first guesses from register budgets, not tuned on a GPU.
FWD_MAX_TILE = 8192
BWD_MAX_TILE = 4096
CHUNK_TILE = 2048
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _next_pow2(v: int) -> int:
    return 1 << max(int(v) - 1, 0).bit_length()


def _tiles(cpg: int, spatial: int, max_tile: int) -> tuple[int, int, bool, int]:
    """(BLOCK_C, BLOCK_S, ONE_TILE, num_warps) for a group of cpg channels x `spatial` positions."""
    block_c = _next_pow2(cpg)
    block_s = _next_pow2(spatial)
    one_tile = block_c * block_s <= max_tile
    if not one_tile:
        block_s = max(CHUNK_TILE // block_c, 1)
    # One warp per 256 values, 1 to 8 warps: the heuristic of Triton's layer-norm tutorial.
    return block_c, block_s, one_tile, min(max(block_c * block_s // 256, 1), 8)


def _ncs_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """Strides (n, c, s) addressing t [N, C, *spatial] as [N, C, S], or None if the spatial dims
    do not flatten to one stride (then the caller makes t contiguous)."""
    dims = [(size, stride) for size, stride in zip(t.shape[2:], t.stride()[2:]) if size != 1]
    stride_s = dims[-1][1] if dims else 1
    for (size, stride), (next_size, next_stride) in zip(dims, dims[1:]):
        if stride != next_stride * next_size:
            return None
    return t.stride(0), t.stride(1), stride_s


def _as_ncs(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    strides = _ncs_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = _ncs_strides(t)
    return t, strides


def _channels_last(C: int, S: int, strides: tuple[int, int, int]) -> bool:
    """Whether (n, c, s) strides are channels-last (channel fastest, rows of C): the whole-row kernels."""
    return C > 1 and S > 1 and strides[1] == 1 and strides[2] == C


def _check(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, emb) -> None:
    from fastddpm.errors import BackendUnavailableError, FastDDPMError

    if x.ndim < 2:
        raise FastDDPMError(f"group_norm_silu needs x of shape [N, C, ...], got {list(x.shape)}")
    C = x.shape[1]
    if num_groups < 1 or C % num_groups:
        raise FastDDPMError(f"num_groups {num_groups} does not divide the {C} channels")
    if x.dtype not in SUPPORTED_DTYPES:
        raise FastDDPMError(f"the Triton group_norm_silu takes float32, bfloat16 or float16 input, got {x.dtype}")
    if weight.shape != (C,) or bias.shape != (C,):
        raise FastDDPMError(f"weight and bias must have shape [{C}], got {list(weight.shape)} and {list(bias.shape)}")
    if emb is not None and tuple(emb.shape) != tuple(x.shape[:2]):
        raise FastDDPMError(f"emb must have shape {list(x.shape[:2])}, got {list(emb.shape)}")
    if x.device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
            raise BackendUnavailableError(
                f"the Triton group_norm_silu runs on CUDA tensors, or on {x.device.type} tensors only under "
                "Triton's interpreter (TRITON_INTERPRET=1)")


def forward_launches(x, num_groups, weight, bias, emb, silu, eps):
    """Plan the forward without running it: (y, x as the kernels read it, mean [N*G], rstd [N*G],
    launches). Outputs are allocated here; running the `Launch` records in order fills them.
    x [N, C, *spatial] (already checked), weight, bias [C], emb [N, C] or None."""
    fwd, _ = _triton()
    x, (sxn, sxc, sxs) = _as_ncs(x)
    N, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    y = torch.empty_like(x)
    syn, syc, sys = _ncs_strides(y)  # empty_like keeps a dense layout, else gives a contiguous one
    mean = torch.empty(N * num_groups, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    cpg = C // num_groups
    block_c, block_s, one_tile, warps = _tiles(cpg, S, FWD_MAX_TILE)
    sen, sec = (emb.stride(0), emb.stride(1)) if emb is not None else (0, 0)
    launches = []
    if N * num_groups and _channels_last(C, S, (sxn, sxc, sxs)) and _channels_last(C, S, (syn, syc, sys)):
        call = group_norm_cl.GroupNormCall(group_norm_cl.Strided(x, (sxn, sxc, sxs)), weight, bias, emb, num_groups,
                                           silu, eps, mean, rstd)
        launches = group_norm_cl.forward_launches(call, group_norm_cl.Strided(y, (syn, syc, sys)))
    elif N * num_groups:
        launches.append(Launch("group_norm_fwd", "", fwd, (N * num_groups,), (
            x, y, weight.contiguous(), bias.contiguous(), emb if emb is not None else x, mean, rstd,
            S, cpg, num_groups, sxn, sxc, sxs, syn, syc, sys, sen, sec, float(eps)), dict(
            HAS_EMB=emb is not None, SILU=bool(silu), BLOCK_C=block_c, BLOCK_S=block_s, ONE_TILE=one_tile,
            num_warps=warps)))
    return y, x, mean, rstd, launches


def _forward(x, num_groups, weight, bias, emb, silu, eps):
    """Run the forward: (y, x as the kernel read it, mean [N*G], rstd [N*G])."""
    y, x, mean, rstd, launches = forward_launches(x, num_groups, weight, bias, emb, silu, eps)
    for launch in launches:
        launch()
    return y, x, mean, rstd


def backward_launches(dy, x, num_groups, weight, bias, emb, silu, mean, rstd):
    """Plan the backward without running it: (dx, dgamma_n [N, C], dbeta_n [N, C], demb [N, C] or
    None, launches); the per-sample sums are float32, summed over n by `_backward`."""
    _, bwd = _triton()
    N, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    sxn, sxc, sxs = _ncs_strides(x)
    dy, (sdn, sdc, sds) = _as_ncs(dy)
    dx = torch.empty_like(x)
    sgn, sgc, sgs = _ncs_strides(dx)
    dw = torch.empty(N, C, dtype=torch.float32, device=x.device)
    db = torch.empty_like(dw)
    demb = torch.empty_like(dw) if emb is not None else dw
    cpg = C // num_groups
    block_c, block_s, one_tile, warps = _tiles(cpg, S, BWD_MAX_TILE)
    sen, sec = (emb.stride(0), emb.stride(1)) if emb is not None else (0, 0)
    launches = []
    if N * num_groups and _channels_last(C, S, (sxn, sxc, sxs)) and _channels_last(C, S, (sgn, sgc, sgs)):
        call = group_norm_cl.GroupNormCall(group_norm_cl.Strided(x, (sxn, sxc, sxs)), weight, bias, emb, num_groups,
                                           silu, 0.0, mean, rstd)  # eps: the forward's statistics are given
        launches = group_norm_cl.backward_launches(call, group_norm_cl.Strided(dy, (sdn, sdc, sds)),
                                                   group_norm_cl.Strided(dx, (sgn, sgc, sgs)), (dw, db, demb))
    elif N * num_groups:
        launches.append(Launch("group_norm_bwd", "", bwd, (N * num_groups,), (
            x, dy, dx, weight.contiguous(), bias.contiguous(), emb if emb is not None else x, mean, rstd,
            dw, db, demb, S, cpg, num_groups,
            sxn, sxc, sxs, sdn, sdc, sds, sgn, sgc, sgs, sen, sec), dict(
            HAS_EMB=emb is not None, SILU=bool(silu), BLOCK_C=block_c, BLOCK_S=block_s, ONE_TILE=one_tile,
            num_warps=warps)))
    return dx, dw, db, (demb if emb is not None else None), launches


def _backward(dy, x, num_groups, weight, bias, emb, silu, mean, rstd):
    """Run the backward: (dx, dgamma, dbeta, demb or None), in the inputs' dtypes."""
    dx, dw, db, demb, launches = backward_launches(dy, x, num_groups, weight, bias, emb, silu, mean, rstd)
    for launch in launches:
        launch()
    dgamma = dw.sum(0).to(weight.dtype)
    dbeta = db.sum(0).to(bias.dtype)
    return dx, dgamma, dbeta, (demb.to(emb.dtype) if emb is not None else None)


class GroupNormSiLU(torch.autograd.Function):
    """autograd for the fused op: forward and backward are one Triton kernel each (see module doc)."""

    @staticmethod
    def forward(ctx, x, weight, bias, emb, num_groups, silu, eps):
        y, x_read, mean, rstd = _forward(x, num_groups, weight, bias, emb, silu, eps)
        ctx.save_for_backward(x_read, weight, bias, emb, mean, rstd)
        ctx.num_groups, ctx.silu = num_groups, silu
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, bias, emb, mean, rstd = ctx.saved_tensors
        dx, dgamma, dbeta, demb = _backward(dy, x, ctx.num_groups, weight, bias, emb, ctx.silu, mean, rstd)
        need = ctx.needs_input_grad
        return (dx if need[0] else None, dgamma if need[1] else None, dbeta if need[2] else None,
                demb if need[3] else None, None, None, None)


def group_norm_fwd(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                   emb: torch.Tensor | None = None, silu: bool = True,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward kernel alone, outside autograd: (y, mean, rstd).

    Arguments as `group_norm_silu`. y has x's shape, dtype and layout; mean and rstd are float32
    [N, G]: the mean of h = x + emb over each group and 1 / sqrt(var + eps), what
    `group_norm_bwd` needs (with the same x, weight, bias, emb). For a wrapper with its own
    autograd formula (e.g. a torch.library custom op).
    """
    _check(x, num_groups, weight, bias, emb)
    y, _, mean, rstd = _forward(x, num_groups, weight, bias, emb, silu, eps)
    return y, mean.view(x.shape[0], num_groups), rstd.view(x.shape[0], num_groups)


def group_norm_bwd(dy: torch.Tensor, x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                   mean: torch.Tensor, rstd: torch.Tensor, emb: torch.Tensor | None = None,
                   silu: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The backward kernel alone: (dx, dgamma, dbeta, demb or None) from dy = dL/dy [N, C, *spatial].

    x, weight, bias, emb, silu as given to `group_norm_fwd`, and its mean, rstd [N, G]. dx has x's
    shape, dtype and layout; dgamma, dbeta [C] in weight's and bias's dtypes; demb [N, C] in emb's.
    The per-sample sums are reduced over n in a fixed order: deterministic (module docstring).
    """
    _check(x, num_groups, weight, bias, emb)
    x, _ = _as_ncs(x)  # the layout the forward read
    return _backward(dy, x, num_groups, weight, bias, emb, silu, mean.reshape(-1), rstd.reshape(-1))


def group_norm_silu(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor,
                    emb: torch.Tensor | None = None, silu: bool = True, eps: float = 1e-5) -> torch.Tensor:
    """Fused Triton y = act(GroupNorm(x + emb[n, c]) * weight + bias), act = SiLU if `silu` else identity.

    The same function as `group_norm_silu_reference` (module docstring for the equations), with
    the same signature, so it drops into `unet.GroupNormAct.impl`. x [N, C, *spatial] in float32,
    bfloat16 or float16, NCHW-contiguous or channels-last (other layouts are copied first);
    num_groups divides C; weight, bias [C]; emb [N, C] or None. Statistics are computed in
    float32 (two-pass per tile); y has x's shape, dtype and layout. Differentiable in x, weight,
    bias and emb (once) through the backward kernel.
    """
    _check(x, num_groups, weight, bias, emb)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, emb)):
        return GroupNormSiLU.apply(x, weight, bias, emb, num_groups, silu, eps)
    return _forward(x, num_groups, weight, bias, emb, silu, eps)[0]
