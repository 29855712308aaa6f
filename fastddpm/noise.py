"""Counter-based Gaussian noise shared by every backend.

Every Gaussian the samplers use is a fixed function of four numbers: the run's `seed`, the
`step` it is drawn for, the sample index `i` and the element index `e` inside that sample.
So a sample depends only on its seed and its index, never on the batch size, the backend, the
device or how a batch is split over GPUs, and trajectories can be compared across backends.

Key layout (the Triton step kernel and export/ort_sample.py reproduce it: the Philox words and
uniforms bit for bit, the normals to a few float32 ulp, since each library's float32 log and
cos round differently; at most ~1e-6 absolute):

    Philox-4x32-10 with
        key     (k0, k1) = (seed, step), each in 0 .. 2^32 - 1
        counter (c0, c1, c2, c3) = (e, i, 0, 0)
    -> 32-bit words (r0, r1, r2, r3); r0 and r1 give one normal by Box-Muller:
        u(r) = float32(int32(r) if int32(r) >= 0 else ~int32(r)) * 4.6566127342e-10   (in [0, 1))
        z    = sqrt(-2 log(max(u(r0), 1e-7))) * cos(2 pi u(r1))       (float32 arithmetic)

This is exactly `tl.randn(seed64, offset64)` in Triton 3.x with
    seed64   = seed | (step << 32)          (Triton splits it into key (lo, hi))
    offset64 = e | (i << 32)                (Triton splits it into counter (lo, hi, 0, 0))
so a Triton kernel draws the stream with one `tl.randn` call per element.

    e    flat index of the element in the sample's logical [C, H, W] order (NCHW), whatever the
         memory layout; 0 <= e < 2^32.
    i    sample index within the run: `sample_offset + b` for row b of the batch.
    step the original timestep t whose update the noise z enters (x_{t-1} = mean + sigma_t z),
         or XT_STEP for the starting point x_T.

Seeds: 0 .. 2^32 - 1 (SEED_MAX), the range of the 32-bit key word. `noise()` refuses anything
else with a FastDDPMError rather than wrap it (earlier versions used seed mod 2^32, so seeds
2^32 and 0 drew the same noise); the stream of every valid seed is unchanged. The command line
refuses out-of-range --seed values the same way.

Philox 4x32-10: Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC 2011).
"""
from __future__ import annotations

import math
import operator

import torch

from .errors import FastDDPMError

SEED_MAX = 0xFFFFFFFF  # the largest seed: the key word is 32 bits

# The step key of the starting noise x_T (outside any timestep range).
XT_STEP = 0xFFFFFFFF

_MASK32 = 0xFFFFFFFF
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_UNIFORM_SCALE = 4.6566127342e-10  # largest float32 s with (2^31 - 1) * s < 1
_PHILOX_ROUNDS = 10


def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = _PHILOX_ROUNDS):
    """Philox-4x32 on uint32 counters held in int64 tensors (any broadcastable shapes), key (k0, k1) ints.

    Round function, as Triton's `philox_impl`:
        c0' = hi(B * c2) ^ c1 ^ k0,  c2' = hi(A * c0) ^ c3 ^ k1,  c1' = lo(B * c2),  c3' = lo(A * c0)
        k0 += 0x9E3779B9, k1 += 0xBB67AE85  (mod 2^32)
    The 64-bit products wrap modulo 2^64 in int64, which keeps their low 64 bits exact; the
    masks recover the two 32-bit halves.
    """
    k0, k1 = int(k0) & _MASK32, int(k1) & _MASK32
    for _ in range(rounds):
        pb = c2 * _PHILOX_ROUND_B
        pa = c0 * _PHILOX_ROUND_A
        c0, c1, c2, c3 = ((pb >> 32) & _MASK32) ^ c1 ^ k0, pb & _MASK32, ((pa >> 32) & _MASK32) ^ c3 ^ k1, pa & _MASK32
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uniform(r: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: a uint32 word (in int64) to float32 in [0, 1)."""
    x = torch.where(r >= 2**31, r - 2**32, r)  # reinterpret as int32
    x = torch.where(x < 0, ~x, x)
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def check_seed(seed, flag: str = "seed") -> int:
    """Return `seed` if it is an integer in 0 .. SEED_MAX (2^32 - 1); FastDDPMError naming `flag` otherwise."""
    value = _as_int(seed)
    if value is None or not 0 <= value <= SEED_MAX:
        raise FastDDPMError(f"{flag} must be an integer from 0 to {SEED_MAX} (2^32 - 1), got {seed!r}")
    return value


def _as_int(value) -> int | None:
    """An integer-like value (int, numpy or 0-d torch integer; not bool) as an int, else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def noise(
    seed: int,
    step: int,
    shape,
    sample_offset: int = 0,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Standard normal noise of `shape` = [B, ...] for samples sample_offset .. sample_offset+B-1.

    Row b is sample i = sample_offset + b; element e is its flat index in the remaining
    dimensions. The values are drawn in float32 (see the module docstring for the exact key
    layout) and then cast to `dtype`. `seed` and `step` must be integers in 0 .. SEED_MAX
    (FastDDPMError otherwise, never a silent wrap).
    """
    seed = check_seed(seed)
    if _as_int(step) is None or not 0 <= _as_int(step) <= SEED_MAX:
        raise FastDDPMError(f"the noise step key must be an integer in 0..{SEED_MAX}, got {step!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1:
        raise ValueError("noise needs a shape with a leading batch dimension")
    batch, per_sample = shape[0], math.prod(shape[1:])
    if per_sample >= 2**32:
        raise ValueError(f"a sample of {per_sample} elements does not fit the 32-bit element counter")
    if sample_offset < 0 or sample_offset + batch > 2**32:
        raise ValueError(f"sample indices {sample_offset}..{sample_offset + batch - 1} do not fit 32 bits")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    e = torch.arange(per_sample, dtype=torch.int64, device=dev).unsqueeze(0)
    i = torch.arange(sample_offset, sample_offset + batch, dtype=torch.int64, device=dev).unsqueeze(1)
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    r0, r1, _, _ = philox4x32(e, i, zero, zero, seed, step)
    u1 = torch.clamp(_uniform(r0), min=1e-7)
    u2 = _uniform(r1)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)
    return z.reshape(shape).to(dtype)
