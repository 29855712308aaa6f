"""The fused reverse-diffusion step: one read of x_t and the model output, one write of x_{t-1}.

It computes exactly what `fastddpm.sampling.reference_step` computes for an eps-predicting
model (mean_type "eps"), for step index k of a (possibly respaced) process with original
timestep t = timesteps[k]:

    x0   = A_k x_t - B_k eps                    A = 1 / sqrt(alphabar), B = sqrt(1 / alphabar - 1)
    clip_denoised:  x0 = clamp(x0, -1, 1),  eps = (A_k x_t - x0) / B_k
    ancestral (DDPM Algorithm 2; mean from the posterior, DDPM eq. 7):
        x_{t-1} = c1_k x0 + c2_k x_t + sigma z,   sigma = exp(log Sigma / 2)
        log Sigma: fixedlarge log beta~ (beta, beta~_1 at k = 0), fixedsmall log beta~ (clipped),
                   learned  v (the model's second C channels, raw),
                   learned_range  f log beta_k + (1 - f) log beta~_k, f = (v + 1) / 2 (IDDPM eq. 15)
    ddim (Song et al. 2021, eq. 12):
        x_{t-1} = sqrt(alphabar_prev) x0 + sqrt(max(1 - alphabar_prev - s^2, 0)) eps + s z,
        s = eta sqrt((1 - alphabar_prev) / (1 - alphabar)) sqrt(1 - alphabar / alphabar_prev)
    z = 0 at k = 0 (and for ddim when s = 0); otherwise z is drawn inside the kernel with
    tl.randn from the key layout of fastddpm/noise.py: step key t (the ORIGINAL timestep),
    sample index sample_offset + b, element = flat NCHW index within the sample whatever the
    memory layout, so the Triton and reference backends draw the same numbers.

The per-step scalars live in float32 device tables [K] (`StepTables`, built once in float64
from `diffusion.schedule` and cast), read by the kernel at a *device* step index: a
CUDA graph can capture the launch once and replay it for every k by updating that index (and
the device noise key) in place, with no host sync.

mean_type "x0" and "xprev" are not fused: `triton_step` raises BackendUnavailableError for them
rather than run something else under the triton name.

The torch twin (`step_twin`) evaluates the same formula from the same float32 table in torch;
tests/kernels/test_step.py compares kernel, twin and `reference_step`.
"""
from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, field

import torch

from fastddpm.errors import BackendUnavailableError, FastDDPMError
from fastddpm.noise import noise

from .launch import Launch

triton = None  # bound by _triton() on first use
tl = None

# Rows of the per-step coefficient table (float32 [NUM_ROWS, K], one row a coefficient).
ROW_A, ROW_B, ROW_C1, ROW_C2, ROW_SIGMA, ROW_LOG_BETA, ROW_LOG_POST, ROW_DRAW = range(8)
NUM_ROWS = 8
# How the kernel gets sigma (a string constexpr): from the SIGMA table, from the raw
# log-variance v the model outputs, or from v in [-1, 1] (IDDPM's interpolation).
VAR_MODES = ("table", "learned", "learned_range")
SAMPLERS = ("ancestral", "ddim")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MASK32 = 0xFFFFFFFF


def _step_kernel(
    X,  # *x_t [B, C, S] at strides (sxb, sxc, sxs)
    OUT,  # *model output [B, C or 2C, S] at strides (sob, soc, sos): eps in channels [0, C), v in [C, 2C)
    XP,  # *x_{t-1}, output [B, C, S] at strides (spb, spc, sps); may be X itself (same strides)
    X0,  # *pred_x0, output at XP's strides (spb, spc, sps); written only if WRITE_X0
    A,  # *[K] float32: 1 / sqrt(alphabar)
    B_,  # *[K] float32: sqrt(1 / alphabar - 1)
    C1,  # *[K] float32: posterior c1 (ancestral) or sqrt(alphabar_prev) (ddim), multiplies x0
    C2,  # *[K] float32: posterior c2, multiplies x_t (ancestral); or sqrt(1 - alphabar_prev - s^2),
    #      multiplies eps (ddim)
    SIGMA,  # *[K] float32: the noise scale when VAR == "table"
    LOG_BETA,  # *[K] float32: log beta, learned_range's upper end
    LOG_POST,  # *[K] float32: log beta~ (clipped), learned_range's lower end
    DRAW,  # *[K] float32: 1 where the step adds noise, 0 where it does not (k = 0; ddim with s = 0)
    TSTEP,  # *[K] int64: original timesteps, the noise's step key
    KIDX,  # *the step index k, one int64 on the device
    KEY,  # *(seed mod 2^32, sample_offset), two int64 on the device
    C, S, blocks_per_sample,
    sxb, sxc, sxs, sob, soc, sos, spb, spc, sps,
    DDIM: tl.constexpr, VAR: tl.constexpr, CLIP: tl.constexpr, WRITE_X0: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // blocks_per_sample
    j = (pid % blocks_per_sample) * BLOCK + tl.arange(0, BLOCK)  # position in the sample, memory order
    mask = j < C * S
    if CHANNELS_LAST:  # walk memory order so that loads coalesce
        s = j // C
        c = j - s * C
    else:
        c = j // S
        s = j % S
    k = tl.load(KIDX)
    coef_a = tl.load(A + k)
    coef_b = tl.load(B_ + k)
    c1 = tl.load(C1 + k)
    c2 = tl.load(C2 + k)
    draw = tl.load(DRAW + k)

    b64 = b.to(tl.int64)
    x = tl.load(X + b64 * sxb + c * sxc + s * sxs, mask=mask, other=0.0).to(tl.float32)
    out_row = OUT + b64 * sob + s * sos
    eps = tl.load(out_row + c * soc, mask=mask, other=0.0).to(tl.float32)
    x0 = coef_a * x - coef_b * eps
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
        eps = (coef_a * x - x0) / coef_b
    if DDIM:
        xp = c1 * x0 + c2 * eps
    else:
        xp = c1 * x0 + c2 * x
    if draw != 0.0:  # no noise at k = 0 (nor for ddim with s = 0): skip Philox altogether
        if VAR == "learned":
            v = tl.load(out_row + (c + C) * soc, mask=mask, other=0.0).to(tl.float32)
            sigma = tl.exp(0.5 * v)
        elif VAR == "learned_range":
            v = tl.load(out_row + (c + C) * soc, mask=mask, other=0.0).to(tl.float32)
            frac = (v + 1.0) / 2.0
            sigma = tl.exp(0.5 * (frac * tl.load(LOG_BETA + k) + (1.0 - frac) * tl.load(LOG_POST + k)))
        else:
            sigma = tl.load(SIGMA + k)
        # fastddpm.noise key layout: Philox key (seed, t), counter (e, i, 0, 0) = tl.randn(seed | t << 32, e | i << 32)
        seed = tl.load(KEY) | (tl.load(TSTEP + k) << 32)
        sample = tl.load(KEY + 1) + b64
        e = (c * S + s).to(tl.int64)  # flat NCHW index of the element in its sample
        z = tl.randn(seed, e | (sample << 32))
        xp = xp + sigma * z
    dst = b64 * spb + c * spc + s * sps
    tl.store(XP + dst, xp.to(XP.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(X0 + dst, x0.to(X0.dtype.element_ty), mask=mask)


@functools.cache
def _triton():
    """Import Triton and jit the kernel (once). Under TRITON_INTERPRET=1 it runs on CPU tensors."""
    global triton, tl
    import triton as _tr
    import triton.language as _tl

    triton, tl = _tr, _tl
    return _tr.jit(_step_kernel)


# BLOCK = 1024 elements a program at 4 warps (8 a thread): the elementwise size of Triton's
# vector-add tutorial; the step is memory-bound (plus ~60 integer ops a element for Philox).
# Not tuned on a GPU.
BLOCK = 1024
NUM_WARPS = 4


# ------------------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class StepTables:
    """Device tables of one process for one sampler: what the kernel reads at step index k.

    coefs      [NUM_ROWS, K] float32, rows ROW_*: A, B, c1, c2, sigma, log beta, log beta~, draw
               (for ddim c1 = sqrt(alphabar_prev), c2 = sqrt(max(1 - alphabar_prev - s^2, 0)), sigma = s)
    timesteps  [K] int64 original timesteps (the noise step key)
    steps      arange(K) int64: steps[k] is a 0-d device view to pass as the step index
    """

    coefs: torch.Tensor
    timesteps: torch.Tensor
    steps: torch.Tensor
    ddim: bool
    var_mode: str  # one of VAR_MODES
    keys: dict = field(default_factory=dict, compare=False, repr=False)

    def key(self, seed: int, sample_offset: int) -> torch.Tensor:
        """The device noise key (seed mod 2^32, sample_offset), int64 [2]; cached so a step never copies."""
        k = (int(seed) & _MASK32, int(sample_offset))
        if k not in self.keys:
            if len(self.keys) >= 16:
                self.keys.pop(next(iter(self.keys)))
            self.keys[k] = noise_key(seed, sample_offset, self.coefs.device)
        return self.keys[k]


def noise_key(seed: int, sample_offset: int, device) -> torch.Tensor:
    """(seed mod 2^32, sample_offset) as an int64 [2] tensor on `device`, the kernel's noise key.

    A CUDA graph replays with a new seed or offset after `key.copy_(noise_key(...))`.
    """
    if not 0 <= int(sample_offset) < 2**32:
        raise FastDDPMError(f"sample_offset {sample_offset} does not fit the 32-bit sample counter")
    return torch.tensor([int(seed) & _MASK32, int(sample_offset)], dtype=torch.int64, device=device)


_TABLES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def step_tables(diffusion, device, sampler: str = "ancestral", eta: float = 0.0) -> StepTables:
    """The float32 device tables of `diffusion` for `sampler` (and eta), built in float64 once and cached."""
    if sampler not in SAMPLERS:
        raise FastDDPMError(f"unknown sampler {sampler!r}; choose one of {', '.join(map(repr, SAMPLERS))}")
    device = torch.device(device)
    ddim = sampler == "ddim"
    cache = _TABLES.setdefault(diffusion, {})
    ck = (device, ddim, float(eta) if ddim else 0.0)
    if ck in cache:
        return cache[ck]
    s = diffusion.schedule
    K = s.num_steps
    rows = torch.zeros(NUM_ROWS, K, dtype=torch.float64)
    rows[ROW_A] = s.sqrt_recip_alphas_cumprod
    rows[ROW_B] = s.sqrt_recipm1_alphas_cumprod
    rows[ROW_LOG_BETA] = torch.log(s.betas)
    rows[ROW_LOG_POST] = s.posterior_log_variance_clipped
    not_first = torch.arange(K) > 0
    if ddim:
        ab, ab_prev = s.alphas_cumprod, s.alphas_cumprod_prev
        sigma = eta * torch.sqrt((1.0 - ab_prev) / (1.0 - ab)) * torch.sqrt(1.0 - ab / ab_prev)
        rows[ROW_C1] = ab_prev.sqrt()
        rows[ROW_C2] = (1.0 - ab_prev - sigma**2).clamp(min=0.0).sqrt()
        rows[ROW_SIGMA] = sigma
        rows[ROW_DRAW] = (not_first & (sigma > 0)).to(torch.float64)
        var_mode = "table"
    else:
        rows[ROW_C1] = s.posterior_mean_coef1
        rows[ROW_C2] = s.posterior_mean_coef2
        if diffusion.var_type == "fixedlarge":
            rows[ROW_SIGMA] = s.fixedlarge_variance.sqrt()
        elif diffusion.var_type == "fixedsmall":
            rows[ROW_SIGMA] = torch.exp(0.5 * s.posterior_log_variance_clipped)
        rows[ROW_DRAW] = not_first.to(torch.float64)
        var_mode = diffusion.var_type if diffusion.var_type in ("learned", "learned_range") else "table"
    tables = StepTables(
        coefs=rows.to(device=device, dtype=torch.float32),
        timesteps=torch.as_tensor(diffusion.timesteps, dtype=torch.int64).to(device),
        steps=torch.arange(K, dtype=torch.int64, device=device),
        ddim=ddim,
        var_mode=var_mode,
    )
    cache[ck] = tables
    return tables


# ------------------------------------------------------------------------------------- launchers
def _bcs_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """Strides (b, c, s) addressing t [B, C, *spatial] as [B, C, S]; None if the spatial dims do not
    flatten to one stride."""
    dims = [(size, stride) for size, stride in zip(t.shape[2:], t.stride()[2:]) if size != 1]
    for (size, stride), (next_size, next_stride) in zip(dims, dims[1:]):
        if stride != next_stride * next_size:
            return None
    return t.stride(0), t.stride(1), (dims[-1][1] if dims else 1)


def _as_bcs(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    strides = _bcs_strides(t)
    if strides is None:
        t = t.contiguous()
        strides = _bcs_strides(t)
    return t, strides


def _check_output(x: torch.Tensor, model_output: torch.Tensor, channels: tuple[int, ...]) -> None:
    if (model_output.shape[0] != x.shape[0] or model_output.shape[1] not in channels
            or model_output.shape[2:] != x.shape[2:]):
        want = " or ".join(map(str, channels))
        raise FastDDPMError(f"a model output of shape {list(model_output.shape)} does not fit x_t of shape "
                            f"{list(x.shape)}: expected {want} channels")


def _output_channels(tables: StepTables, C: int) -> tuple[int, ...]:
    """Model-output channel counts the kernel can read: 2C when it needs v, else C or 2C (v ignored)."""
    return (2 * C,) if tables.var_mode != "table" else (C, 2 * C)


def step_launches(tables: StepTables, x: torch.Tensor, model_output: torch.Tensor, k: torch.Tensor,
                  key: torch.Tensor, *, clip_denoised: bool = True, out: torch.Tensor | None = None,
                  pred_x0: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Launch]]:
    """Plan `fused_step` without running it: (x_{t-1} buffer, launches); same arguments."""
    _check_dtype(x)
    _check_output(x, model_output, _output_channels(tables, x.shape[1]))
    kernel = _triton()
    x, (sxb, sxc, sxs) = _as_bcs(x)
    model_output, (sob, soc, sos) = _as_bcs(model_output)
    if out is None:
        out = torch.empty_like(x)
    out_strides = _bcs_strides(out)
    if out.shape != x.shape or out.dtype != x.dtype or out_strides is None:
        raise FastDDPMError("the x_{t-1} buffer must have x_t's shape and dtype and an NCHW or channels-last layout")
    if pred_x0 is not None and (pred_x0.shape != x.shape or pred_x0.dtype != x.dtype
                                or _bcs_strides(pred_x0) != out_strides):
        raise FastDDPMError("the pred_x0 buffer must have the shape, dtype and memory layout of the x_{t-1} buffer")
    B, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    if C * S >= 2**31:
        raise FastDDPMError(f"a sample of {C * S} elements is too large for the step kernel's 32-bit indices")
    channels_last = sxc == 1 and C > 1 and S > 1  # iterate in memory order: channel fastest
    blocks = triton.cdiv(C * S, BLOCK)
    launches = []
    if B * blocks:
        launches.append(Launch("step", "", kernel, (B * blocks,), (
            x, model_output, out, pred_x0 if pred_x0 is not None else out,
            *tables.coefs.unbind(0), tables.timesteps, k, key,
            C, S, blocks, sxb, sxc, sxs, sob, soc, sos, *out_strides), dict(
            DDIM=tables.ddim, VAR=tables.var_mode, CLIP=bool(clip_denoised), WRITE_X0=pred_x0 is not None,
            CHANNELS_LAST=channels_last, BLOCK=BLOCK, num_warps=NUM_WARPS)))
    return out, launches


def fused_step(tables: StepTables, x: torch.Tensor, model_output: torch.Tensor, k: torch.Tensor,
               key: torch.Tensor, *, clip_denoised: bool = True, out: torch.Tensor | None = None,
               pred_x0: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the fused step: x_{t-1} from x_t at the device step index k (module docstring).

    tables        `step_tables(diffusion, device, sampler, eta)`
    x             x_t [B, C, *spatial], float32 / bfloat16 / float16, NCHW or channels-last
    model_output  [B, C, *spatial] eps, or [B, 2C, *spatial] (eps, v) for learned variances
    k             0-d int64 device tensor, the step index (e.g. `tables.steps[k]`, or a buffer a
                  CUDA graph updates in place)
    key           `tables.key(seed, sample_offset)` / `noise_key(...)`: int64 [2] on the device
    out           x_{t-1} buffer of x's shape and layout (may be x itself); allocated if None
    pred_x0       if given, a buffer of x's shape and layout that receives the (clipped) x0
    Returns x_{t-1}. No host sync: nothing here reads a device value.
    """
    out, launches = step_launches(tables, x, model_output, k, key, clip_denoised=clip_denoised, out=out,
                                  pred_x0=pred_x0)
    for launch in launches:
        launch()
    return out


def _check_step(diffusion, x: torch.Tensor, sampler: str, sample_offset: int) -> None:
    if diffusion.mean_type != "eps":
        raise BackendUnavailableError(
            f"the triton backend's fused step implements mean_type 'eps' only, not {diffusion.mean_type!r}; "
            "use backend 'reference' for this model")
    if sampler not in SAMPLERS:
        raise FastDDPMError(f"unknown sampler {sampler!r}; choose one of {', '.join(map(repr, SAMPLERS))}")
    if x.ndim < 2:
        raise FastDDPMError(f"x_t must have shape [B, C, ...], got {list(x.shape)}")
    if not (0 <= sample_offset and sample_offset + x.shape[0] <= 2**32):
        raise FastDDPMError(f"sample indices {sample_offset}..{sample_offset + x.shape[0] - 1} do not fit 32 bits")


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise FastDDPMError(f"the triton step computes in float32 and takes float32, bfloat16 or float16 "
                            f"x_t, got {x.dtype}")


def triton_step(diffusion, x: torch.Tensor, k: int, model_output: torch.Tensor, *, seed: int,
                sample_offset: int = 0, sampler: str = "ancestral", eta: float = 0.0, clip_denoised: bool = True,
                return_pred_x0: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sampling.reference_step` computed by the fused kernel: (x_{t-1}, pred_x0), both [B, C, ...].

    The signature is reference_step's, so it is the `triton` backend's step function. k is the
    Python step index of `diffusion` (the kernel reads it through `tables.steps[k]`, a device
    view, so nothing is copied per step). pred_x0 is written by the kernel as a second output
    (one extra write of x's size); pass return_pred_x0=False to skip it and get None.
    Raises BackendUnavailableError for mean_type "x0" / "xprev" (not fused).
    """
    _check_step(diffusion, x, sampler, sample_offset)
    C = x.shape[1]
    _check_output(x, model_output, (2 * C,) if diffusion.var_type in ("learned", "learned_range") else (C,))
    tables = step_tables(diffusion, x.device, sampler, eta)
    x_prev = torch.empty_like(x)
    if _bcs_strides(x_prev) is None:  # x has an odd layout: both outputs contiguous
        x_prev = torch.empty_like(x, memory_format=torch.contiguous_format)
    x0 = torch.empty_like(x_prev) if return_pred_x0 else None
    fused_step(tables, x, model_output, tables.steps[k], tables.key(seed, sample_offset),
               clip_denoised=clip_denoised, out=x_prev, pred_x0=x0)
    return x_prev, x0


# ------------------------------------------------------------------------------------- twin
def step_twin(tables: StepTables, x: torch.Tensor, model_output: torch.Tensor, k: int, *, seed: int,
              sample_offset: int = 0, clip_denoised: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's formula in torch, from the same float32 table: (x_{t-1}, pred_x0), float32.

    Same arguments as `fused_step` but k a Python int and the key as (seed, sample_offset); z
    comes from `fastddpm.noise.noise` (the stream the kernel draws).
    """
    C = x.shape[1]
    _check_output(x, model_output, _output_channels(tables, C))
    a, b_, c1, c2, sig, log_beta, log_post, draw = tables.coefs[:, k].to(x.device).unbind()
    xf = x.float()
    eps = model_output[:, :C].float()
    x0 = a * xf - b_ * eps
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (a * xf - x0) / b_
    xp = c1 * x0 + c2 * (eps if tables.ddim else xf)
    if float(draw) != 0.0:
        if tables.var_mode == "learned":
            sigma = torch.exp(0.5 * model_output[:, C:].float())
        elif tables.var_mode == "learned_range":
            frac = (model_output[:, C:].float() + 1.0) / 2.0
            sigma = torch.exp(0.5 * (frac * log_beta + (1.0 - frac) * log_post))
        else:
            sigma = sig
        z = noise(seed, int(tables.timesteps[k]), x.shape, sample_offset, device=x.device)
        xp = xp + sigma * z
    return xp, x0
