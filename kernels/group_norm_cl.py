"""Channels-last GroupNorm(+emb)(+SiLU): Triton kernels that read whole rows of C channels.

The op and its backward are those of kernels/group_norm.py (its module docstring has the
equations); this file holds the kernels for x in channels-last memory, [N, S, C] with the
channel index fastest. There a group's CPG channels are 8 to 24 bytes out of every C-channel
row, so a program per group (the NCHW kernels' plan) issues 2-byte loads. Here a program reads
tiles of [BLOCK_S positions, all C channels]: each row is one contiguous run of C elements, and
with the channel stride specialised to 1 and C a multiple of 8 Triton proves 16-byte alignment
and issues 16-byte vector loads and stores (checked in the PTX by `python -m fastddpm.kernels.aot`).

Work split. Program (n, j) owns positions [j ROWS, (j + 1) ROWS) of sample n, j < SPLIT. Each
kernel runs in up to three phases, chosen by constexpr flags:

    STATS     per-channel partial sums over the program's rows -> PART[n, j, :, c] (float32)
    FINALIZE  per sample: merge the SPLIT partials, reduce each group's channels -> group
              statistics (forward: MEAN, RSTD [N, G]; backward: c1, c2 [N, G, 2], and the
              per-sample dgamma_n, dbeta_n, demb [N, C])
    APPLY     per-channel scale and shift from the group statistics, then y (or dx) for the rows

With SPLIT = 1 (batch >= the GPU's SM count) one launch runs all three, with a barrier between
phases (global memory written before `tl.debug_barrier()` is visible to the whole program after
it), and the second read of the sample mostly hits L2. With a small batch the rows are split
over SPLIT programs a sample so the GPU fills, and the phases are three launches: STATS, a tiny
FINALIZE (grid N), APPLY. Either way the sums are in a fixed order: deterministic, no atomics.

Statistics (float32). STATS keeps a running mean and M2 per (row slot, channel) of the tile
(Welford's update, elementwise, no reduction inside the loop), then merges the BLOCK_S slots
(Chan et al.); FINALIZE merges the SPLIT partials the same way and then the CPG channels of a
group: mean_g = mean_c(mean_c), M2_g = sum_c (M2_c + S (mean_c - mean_g)^2). No E[x^2] - E[x]^2.
The embedding adds a per-channel constant, so it shifts mean_c and leaves M2_c unchanged.

Group reductions use a [BLOCK_G, BLOCK_CPG] view of the channels (c = g CPG + k, k < CPG), which
covers CPG that are not powers of two (C = 384: 12 channels a group).

Triton is imported on first use, as in kernels/group_norm.py.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .launch import Launch


@dataclass(frozen=True)
class Strided:
    """A tensor [N, C, *spatial] and its (n, c, s) strides, the spatial dims flattened to one."""

    t: torch.Tensor
    strides: tuple[int, int, int]


@dataclass(frozen=True)
class GroupNormCall:
    """One GroupNorm(+emb)(+SiLU) call as the channels-last kernels see it: the input, the affine
    and the options, and its float32 statistics mean, rstd [N * G] (the forward writes them, the
    backward reads them). Built once per call by kernels/group_norm.py."""

    x: Strided
    weight: torch.Tensor
    bias: torch.Tensor
    emb: torch.Tensor | None
    num_groups: int
    silu: bool
    eps: float
    mean: torch.Tensor
    rstd: torch.Tensor

    def emb_strides(self) -> tuple[int, int]:
        return (self.emb.stride(0), self.emb.stride(1)) if self.emb is not None else (0, 0)

    def flags(self) -> dict:
        return dict(HAS_EMB=self.emb is not None, SILU=bool(self.silu))

triton = None  # bound by _triton() on first use
tl = None


def _gn_cl_fwd_kernel(
    X,  # *x [N, S, C] at strides (sxn, sxs, sxc); channels-last has sxc == 1, sxs == C
    Y,  # *y, output, at strides (syn, sys, syc)
    W,  # *gamma [C], contiguous
    B,  # *beta [C], contiguous
    EMB,  # *emb [N, C] at strides (sen, sec); not read unless HAS_EMB
    PART,  # *float32 [N, SPLIT, 2, C] scratch: per-program channel (mean, M2) of x
    MEAN,  # *float32 [N, G]: mean of x + emb over each group, output (the backward reads it)
    RSTD,  # *float32 [N, G]: 1 / sqrt(var + eps), output
    S, ROWS, SPLIT,  # spatial positions, positions per program, programs per sample
    sxn, sxs, sxc, syn, sys, syc, sen, sec,
    eps,
    C: tl.constexpr, CPG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_CPG: tl.constexpr, HAS_EMB: tl.constexpr, SILU: tl.constexpr,
    STATS: tl.constexpr, FINALIZE: tl.constexpr, APPLY: tl.constexpr,
):
    G: tl.constexpr = C // CPG
    pid = tl.program_id(0)
    if STATS or APPLY:  # grid N * SPLIT: program j of sample n
        n = pid // SPLIT
        j = pid % SPLIT
    else:  # the finalize launch alone: grid N
        n = pid
        j = 0
    n64 = n.to(tl.int64)
    s_begin = j * ROWS
    s_end = tl.minimum(s_begin + ROWS, S)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    rows = tl.arange(0, BLOCK_S)
    x_row = X + n64 * sxn + cols[None, :] * sxc

    if STATS:
        # Welford per (row slot, channel), in the form M2 += (n - 1) / n * delta^2 (Welford 1962):
        # x is dead once delta = x - mean is formed, so a thread holds three float32 tiles (mean,
        # M2, delta), not four as with M2 += delta (x - mean_new), which put the 16-warp forward at
        # 74 registers (one program a SM; <= 64 gives two). A slot past s_end gets weights 0 (its
        # mean and M2 stay, its count stays): per-row vectors, no select over the tile.
        cnt = tl.zeros([BLOCK_S], dtype=tl.float32)
        mean = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        m2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)
        for s0 in range(s_begin, s_end, BLOCK_S):
            s = s0 + rows
            valid = s < s_end
            m = valid[:, None] & cmask[None, :]
            cnt += valid.to(tl.float32)
            w_mean = tl.where(valid, 1.0 / tl.maximum(cnt, 1.0), 0.0)  # 1 / n
            w_m2 = tl.where(valid, 1.0 - w_mean, 0.0)  # (n - 1) / n
            delta = tl.load(x_row + s[:, None] * sxs, mask=m, other=0.0).to(tl.float32) - mean
            mean += delta * w_mean[:, None]
            m2 += delta * delta * w_m2[:, None]
        total = tl.sum(cnt, axis=0)
        c_mean = tl.sum(cnt[:, None] * mean, axis=0) / total
        dev = mean - c_mean[None, :]
        c_m2 = tl.sum(m2 + cnt[:, None] * dev * dev, axis=0)
        part = PART + (n64 * SPLIT + j) * 2 * C
        tl.store(part + cols, c_mean, mask=cmask)
        tl.store(part + C + cols, c_m2, mask=cmask)
    if STATS and FINALIZE:
        tl.debug_barrier()  # PART written by every thread of this program is visible to all

    if FINALIZE:
        gi = tl.arange(0, BLOCK_G)
        ki = tl.arange(0, BLOCK_CPG)
        gk = (gi < G)[:, None] & (ki < CPG)[None, :]
        ch = gi[:, None] * CPG + ki[None, :]  # [BLOCK_G, BLOCK_CPG]: channel k of group g
        count = 0.0
        mean_c = tl.zeros([BLOCK_G, BLOCK_CPG], dtype=tl.float32)
        m2_c = tl.zeros([BLOCK_G, BLOCK_CPG], dtype=tl.float32)
        for i in range(0, SPLIT):  # Chan's merge of the programs' partials, in order
            part = PART + (n64 * SPLIT + i) * 2 * C
            n_b = tl.minimum(ROWS, S - i * ROWS).to(tl.float32)
            mean_b = tl.load(part + ch, mask=gk, other=0.0)
            m2_b = tl.load(part + C + ch, mask=gk, other=0.0)
            n_ab = count + n_b
            delta = mean_b - mean_c
            mean_c += delta * (n_b / n_ab)
            m2_c += m2_b + delta * delta * (count * n_b / n_ab)
            count = n_ab
        if HAS_EMB:
            mean_c += tl.load(EMB + n64 * sen + ch * sec, mask=gk, other=0.0).to(tl.float32)
        mean_g = tl.sum(mean_c, axis=1) / CPG
        dev = tl.where(gk, mean_c - mean_g[:, None], 0.0)
        var = tl.sum(m2_c + count * dev * dev, axis=1) / (count * CPG)
        gmask = gi < G
        tl.store(MEAN + n64 * G + gi, mean_g, mask=gmask)
        tl.store(RSTD + n64 * G + gi, 1.0 / tl.sqrt(var + eps), mask=gmask)
    if FINALIZE and APPLY:
        tl.debug_barrier()

    if APPLY:
        grp = cols // CPG
        mu = tl.load(MEAN + n64 * G + grp, mask=cmask, other=0.0)
        rstd = tl.load(RSTD + n64 * G + grp, mask=cmask, other=0.0)
        gamma = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        beta = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_EMB:
            mu -= tl.load(EMB + n64 * sen + cols * sec, mask=cmask, other=0.0).to(tl.float32)
        # y = (x - (mu - emb)) * (rstd gamma) + beta: the shift is subtracted before scaling.
        scale = rstd * gamma
        y_row = Y + n64 * syn + cols[None, :] * syc
        last = s_begin + ((s_end - s_begin - 1) // BLOCK_S) * BLOCK_S
        for i in range(0, s_end - s_begin, BLOCK_S):
            s = (last - i) + rows  # last tile first: STATS read it most recently, so it is likeliest in L2
            m = (s < s_end)[:, None] & cmask[None, :]
            xv = tl.load(x_row + s[:, None] * sxs, mask=m, other=0.0).to(tl.float32)
            p = (xv - mu[None, :]) * scale[None, :] + beta[None, :]
            if SILU:
                p = p / (1.0 + tl.exp(-p))  # p * sigmoid(p)
            tl.store(y_row + s[:, None] * sys, p.to(Y.dtype.element_ty), mask=m)


def _gn_cl_bwd_kernel(
    X,  # *x, the forward's input [N, S, C] at strides (sxn, sxs, sxc)
    DY,  # *dL/dy at strides (sdn, sds, sdc) (any: e.g. all 0 for y.sum().backward())
    DX,  # *dL/dx, output, at strides (sgn, sgs, sgc)
    W,  # *gamma [C], contiguous
    B,  # *beta [C], contiguous (SiLU's derivative needs p)
    EMB,  # *emb [N, C] at strides (sen, sec); not read unless HAS_EMB
    MEAN,  # *float32 [N, G] from the forward
    RSTD,  # *float32 [N, G] from the forward
    PART,  # *float32 [N, SPLIT, 3, C] scratch: per-program channel sums of dp xhat, dp, xhat
    CC,  # *float32 [N, G, 2] scratch: c1, c2 of each group
    DW,  # *float32 [N, C]: per-sample dgamma_n, output
    DB,  # *float32 [N, C]: per-sample dbeta_n, output
    DEMB,  # *float32 [N, C]: demb, output; not written unless HAS_EMB
    S, ROWS, SPLIT,
    sxn, sxs, sxc, sdn, sds, sdc, sgn, sgs, sgc, sen, sec,
    C: tl.constexpr, CPG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_CPG: tl.constexpr, HAS_EMB: tl.constexpr, SILU: tl.constexpr,
    STATS: tl.constexpr, FINALIZE: tl.constexpr, APPLY: tl.constexpr,
):
    G: tl.constexpr = C // CPG
    pid = tl.program_id(0)
    if STATS or APPLY:  # grid N * SPLIT: program j of sample n
        n = pid // SPLIT
        j = pid % SPLIT
    else:  # the finalize launch alone: grid N
        n = pid
        j = 0
    n64 = n.to(tl.int64)
    s_begin = j * ROWS
    s_end = tl.minimum(s_begin + ROWS, S)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    rows = tl.arange(0, BLOCK_S)
    x_row = X + n64 * sxn + cols[None, :] * sxc
    dy_row = DY + n64 * sdn + cols[None, :] * sdc
    if STATS or APPLY:  # per-channel constants of the tiles
        grp = cols // CPG
        rstd = tl.load(RSTD + n64 * G + grp, mask=cmask, other=0.0)
        shift = tl.load(MEAN + n64 * G + grp, mask=cmask, other=0.0)
        if HAS_EMB:
            shift -= tl.load(EMB + n64 * sen + cols * sec, mask=cmask, other=0.0).to(tl.float32)
        gamma = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        beta = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)

    if STATS:
        acc_w = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)  # sum dp * xhat
        acc_b = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)  # sum dp
        acc_x = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)  # sum xhat (for demb)
        for s0 in range(s_begin, s_end, BLOCK_S):
            s = s0 + rows
            m = (s < s_end)[:, None] & cmask[None, :]
            xv = tl.load(x_row + s[:, None] * sxs, mask=m, other=0.0).to(tl.float32)
            xhat = tl.where(m, (xv - shift[None, :]) * rstd[None, :], 0.0)
            dp = tl.load(dy_row + s[:, None] * sds, mask=m, other=0.0).to(tl.float32)
            if SILU:
                p = xhat * gamma[None, :] + beta[None, :]
                sg = 1.0 / (1.0 + tl.exp(-p))
                dp = dp * sg * (1.0 + p * (1.0 - sg))
            acc_w += dp * xhat
            acc_b += dp
            if HAS_EMB:
                acc_x += xhat
        part = PART + (n64 * SPLIT + j) * 3 * C
        tl.store(part + cols, tl.sum(acc_w, axis=0), mask=cmask)
        tl.store(part + C + cols, tl.sum(acc_b, axis=0), mask=cmask)
        if HAS_EMB:
            tl.store(part + 2 * C + cols, tl.sum(acc_x, axis=0), mask=cmask)
    if STATS and FINALIZE:
        tl.debug_barrier()

    if FINALIZE:
        gi = tl.arange(0, BLOCK_G)
        ki = tl.arange(0, BLOCK_CPG)
        gk = (gi < G)[:, None] & (ki < CPG)[None, :]
        ch = gi[:, None] * CPG + ki[None, :]
        dw = tl.zeros([BLOCK_G, BLOCK_CPG], dtype=tl.float32)
        db = tl.zeros([BLOCK_G, BLOCK_CPG], dtype=tl.float32)
        sx = tl.zeros([BLOCK_G, BLOCK_CPG], dtype=tl.float32)
        for i in range(0, SPLIT):  # in order: deterministic
            part = PART + (n64 * SPLIT + i) * 3 * C
            dw += tl.load(part + ch, mask=gk, other=0.0)
            db += tl.load(part + C + ch, mask=gk, other=0.0)
            if HAS_EMB:
                sx += tl.load(part + 2 * C + ch, mask=gk, other=0.0)
        gamma_gk = tl.load(W + ch, mask=gk, other=0.0).to(tl.float32)
        inv_m = 1.0 / (CPG * S)
        c1 = tl.sum(gamma_gk * dw, axis=1) * inv_m
        c2 = tl.sum(gamma_gk * db, axis=1) * inv_m
        gmask = gi < G
        tl.store(CC + (n64 * G + gi) * 2, c1, mask=gmask)
        tl.store(CC + (n64 * G + gi) * 2 + 1, c2, mask=gmask)
        tl.store(DW + n64 * C + ch, dw, mask=gk)
        tl.store(DB + n64 * C + ch, db, mask=gk)
        if HAS_EMB:
            # demb_c = sum_s dx = rstd (gamma_c dbeta_c - c1 sum_s xhat - S c2)
            rstd_g = tl.load(RSTD + n64 * G + gi, mask=gmask, other=0.0)
            demb = rstd_g[:, None] * (gamma_gk * db - c1[:, None] * sx - S * c2[:, None])
            tl.store(DEMB + n64 * C + ch, demb, mask=gk)
    if FINALIZE and APPLY:
        tl.debug_barrier()

    if APPLY:
        c1 = tl.load(CC + (n64 * G + grp) * 2, mask=cmask, other=0.0)
        c2 = tl.load(CC + (n64 * G + grp) * 2 + 1, mask=cmask, other=0.0)
        dx_row = DX + n64 * sgn + cols[None, :] * sgc
        last = s_begin + ((s_end - s_begin - 1) // BLOCK_S) * BLOCK_S
        for i in range(0, s_end - s_begin, BLOCK_S):
            s = (last - i) + rows  # last tile first (L2, as in the forward)
            m = (s < s_end)[:, None] & cmask[None, :]
            xv = tl.load(x_row + s[:, None] * sxs, mask=m, other=0.0).to(tl.float32)
            xhat = (xv - shift[None, :]) * rstd[None, :]
            dp = tl.load(dy_row + s[:, None] * sds, mask=m, other=0.0).to(tl.float32)
            if SILU:
                p = xhat * gamma[None, :] + beta[None, :]
                sg = 1.0 / (1.0 + tl.exp(-p))
                dp = dp * sg * (1.0 + p * (1.0 - sg))
            dx = rstd[None, :] * (dp * gamma[None, :] - xhat * c1[None, :] - c2[None, :])
            tl.store(dx_row + s[:, None] * sgs, dx.to(DX.dtype.element_ty), mask=m)


@functools.cache
def _triton():
    """Import Triton and jit the kernels (once). Under TRITON_INTERPRET=1 they run on CPU tensors."""
    global triton, tl
    import triton as _tr
    import triton.language as _tl

    triton, tl = _tr, _tl
    return _tr.jit(_gn_cl_fwd_kernel), _tr.jit(_gn_cl_bwd_kernel)


# ------------------------------------------------------------------------------------ planning
# FWD_TILE / BWD_TILE: elements of one [BLOCK_S, BLOCK_C] tile. BLOCK_C is C rounded up to a
#   power of two (384 -> 512), so BLOCK_S = TILE / BLOCK_C rows. Both give 16 values a thread
#   (two 16-byte vectors of bf16 per load): the forward 8192 over 16 warps, beside its float32
#   Welford tiles (mean, M2 and the delta of the tile being merged: <= 64 registers), the
#   backward 4096 over 8 warps, as it holds x, dy and three float32 sum tiles (<= 128 registers;
#   16 warps would cap it at 128 and spill). At batch 256 about two programs share a SM, so the
#   forward's 16 warps double the bytes in flight (~32 KB a SM, near what HBM latency x bandwidth
#   / 132 SMs asks). Register counts from `python -m fastddpm.kernels.aot`; the rest are
#   estimates, not tuned on a GPU.
# PROGRAMS_PER_SM: the occupancy the design expects of every launch that reads rows (the fused
#   launch, stats, apply): 2 programs resident a SM. Batch 256 gives 256 / 132 ~ 2 samples a SM
#   and the split plan below makes ~2 programs a SM, so with one resident a SM half of them wait
#   for a second wave. The finalize launch (grid N, 4 warps, a few hundred values a sample)
#   expects 1. Each Launch carries its expectation (`Launch.programs_per_sm`);
#   `python -m fastddpm.kernels.aot` reports the occupancy ptxas's registers, the shared memory
#   and the warp limit allow beside it, and tests/kernels/test_aot.py fails when a variant gets
#   fewer. On sm_90 (65536 registers, 64 warps, 228 KB an SM):
#       launch                      warps (from the tile)   programs/SM   registers a thread at most
#       forward fused/stats/apply   16 / 8 / 4              2             64 / 128 / 255
#       backward fused/stats/apply   8 / 4                  2             128 / 255
#       finalize                     4                      1             255
#   (the tile sets the warps: 16 values a thread, at least 4, at most FWD_WARPS / BWD_WARPS.)
#   The register cap is also passed to ptxas as `maxnreg` (PTX .maxnreg, what CUDA's
#   __launch_bounds__(threads, 2) does), so a compiler that would spend registers on ILP cannot
#   halve the occupancy unseen: unbounded, Triton 3.6's ptxas gave the C = 256 backward with emb
#   155 registers (1 program a SM); bounded it fits 128 with no spills (aot checks spills too).
# CPU_SM_COUNT: the SM count assumed off CUDA (the interpreter, kernels/aot.py): an H100's or
#   H200's 132, so the AOT build picks the plan those GPUs launch.
# A sample gets one program (all phases in one launch) when the batch alone gives each SM at
# least one; otherwise its rows are split so that about 2 programs a SM run, with tiles shrunk
# (down to MIN_TILE = 1024 elements) so a small batch still makes enough programs (batch 1,
# C = 128, 32x32: 128 programs of 8 rows). Never fewer than 4 warps: at 2 warps ptxas held the
# backward's stats kernel (C = 256, no emb) to 96 registers and spilled 20 bytes.
# The second pass over a sample (APPLY) walks its tiles last to first: with one program a sample
# the whole batch's STATS pass (64 MB at C = 128, 32x32, batch 256, bf16) overflows the 50 MB L2,
# and the tiles read last are the ones still there.
FWD_TILE, FWD_WARPS = 8192, 16
BWD_TILE, BWD_WARPS = 4096, 8
CPU_SM_COUNT = 132
MIN_TILE = 1024
PROGRAMS_PER_SM = 2
SM_REGISTERS, MAX_REGISTERS = 65536, 255  # sm_90 (and sm_80): a SM's register file, a thread's most


def register_bound(warps: int, programs: int) -> int:
    """The most registers a thread may use so that `programs` programs of `warps` warps fit one SM's
    65536: 65536 / (programs x 32 warps), in ptxas's unit of 8, at most 255 (64 for 16 warps x 2)."""
    return min(MAX_REGISTERS, SM_REGISTERS // (programs * warps * 32) // 8 * 8)


def _next_pow2(v: int) -> int:
    return 1 << max(int(v) - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_SM_COUNT


def plan(N: int, C: int, S: int, num_groups: int, device: torch.device, tile: int, max_warps: int) -> dict:
    """Block sizes, warps and the split for x [N, C, S] channels-last with tiles of about `tile`
    elements: the kernels' constexprs plus ROWS (positions a program), SPLIT (programs a sample)
    and WARPS (16 values a thread, at least 4 and at most max_warps)."""
    block_c = _next_pow2(C)
    block_s = max(1, min(_next_pow2(S), tile // block_c))
    sms = _sm_count(device)
    rows = S
    if N < sms:  # split: about 2 programs a SM, each a whole number of tiles, tiles >= MIN_TILE
        want = _cdiv(2 * sms, N)
        block_s = min(block_s, max(MIN_TILE // block_c, _next_pow2(_cdiv(S, want) + 1) // 2, 1))
        rows = max(block_s, _cdiv(_cdiv(S, want), block_s) * block_s)
    cpg = C // num_groups
    return dict(ROWS=rows, SPLIT=_cdiv(S, rows), WARPS=max(4, min(max_warps, block_c * block_s // 512)), C=C,
                CPG=cpg, BLOCK_C=block_c, BLOCK_S=block_s, BLOCK_G=_next_pow2(num_groups), BLOCK_CPG=_next_pow2(cpg))


def _phases(kernel: str, fn, N: int, cfg: dict, make_args, flags: dict) -> list[Launch]:
    """The launches of one op: one fused launch (SPLIT = 1), or stats, finalize (grid N), apply.
    make_args(rows, split) gives the positional arguments."""
    consts = {k: v for k, v in cfg.items() if k not in ("ROWS", "SPLIT", "WARPS")}
    args = make_args(cfg["ROWS"], cfg["SPLIT"])

    def launch(stage, grid, stats, finalize, apply):
        # finalize alone is G x CPG values a sample (<= 32 x 16 in cifar10): 4 warps are plenty
        warps = 4 if stage == "finalize" else cfg["WARPS"]
        programs = 1 if stage == "finalize" else PROGRAMS_PER_SM
        bound = register_bound(warps, programs)
        return Launch(kernel, stage, fn, (grid,), args, dict(
            consts, **flags, STATS=stats, FINALIZE=finalize, APPLY=apply, num_warps=warps,
            **({"maxnreg": bound} if bound < MAX_REGISTERS else {})), programs_per_sm=programs)

    if cfg["SPLIT"] == 1:
        return [launch("", N, True, True, True)]
    return [launch("stats", N * cfg["SPLIT"], True, False, False), launch("finalize", N, False, True, False),
            launch("apply", N * cfg["SPLIT"], False, False, True)]


def forward_launches(call: GroupNormCall, y: Strided) -> list[Launch]:
    """The forward's launches for call.x channels-last, writing y (the call's mean and rstd too)."""
    fwd, _ = _triton()
    x, xs, ys = call.x.t, call.x.strides, y.strides
    N, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    cfg = plan(N, C, S, call.num_groups, x.device, FWD_TILE, FWD_WARPS)
    part = torch.empty(N * cfg["SPLIT"] * 2 * C, dtype=torch.float32, device=x.device)
    sen, sec = call.emb_strides()

    def make_args(rows, split):
        return (x, y.t, call.weight.contiguous(), call.bias.contiguous(), call.emb if call.emb is not None else x,
                part, call.mean, call.rstd, S, rows, split, xs[0], xs[2], xs[1], ys[0], ys[2], ys[1], sen, sec,
                float(call.eps))
    return _phases("group_norm_fwd", fwd, N, cfg, make_args, call.flags())


def backward_launches(call: GroupNormCall, dy: Strided, dx: Strided, sums: tuple) -> list[Launch]:
    """The backward's launches: dx from dy, and the per-sample float32 sums (dw, db, demb) [N, C]."""
    _, bwd = _triton()
    x, xs, ds, gs = call.x.t, call.x.strides, dy.strides, dx.strides
    dw, db, demb = sums
    N, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    cfg = plan(N, C, S, call.num_groups, x.device, BWD_TILE, BWD_WARPS)
    part = torch.empty(N * cfg["SPLIT"] * 3 * C, dtype=torch.float32, device=x.device)
    cc = torch.empty(N * call.num_groups * 2, dtype=torch.float32, device=x.device)
    sen, sec = call.emb_strides()

    def make_args(rows, split):
        return (x, dy.t, dx.t, call.weight.contiguous(), call.bias.contiguous(),
                call.emb if call.emb is not None else x, call.mean, call.rstd, part, cc, dw, db, demb, S, rows,
                split, xs[0], xs[2], xs[1], ds[0], ds[2], ds[1], gs[0], gs[2], gs[1], sen, sec)
    return _phases("group_norm_bwd", bwd, N, cfg, make_args, call.flags())
