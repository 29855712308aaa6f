"""The fused reverse-diffusion step: one read of x_t and the model output (and, for the multistep
solvers, of the previous x0 prediction), one write of x_{t-1} (and of the new x0 prediction).

It computes exactly what `fastddpm.sampling.reference_step` computes for an eps-predicting
model (mean_type "eps"), for step index k of a (possibly respaced) process with original
timestep t = timesteps[k], ab = alphabar_k, ab_prev = alphabar_{k-1} (1 at k = 0). Every step of
every sampler is one linear form, with per-step float64 scalars cast to float32 device tables:

    x0'    = A_k x_t - B_k eps                   A = 1 / sqrt(ab), B = sqrt(1 / ab - 1)   (DDPM eq. 4 for x_0)
    clip_denoised:  x0' = clamp(x0', -1, 1),  eps' = (A_k x_t - x0') / B_k   (the eps the clipped x0 implies)
    x_{t-1} = cx_k x_t + c0_k x0' + ce_k eps' + cp_k prev_x0 + sigma_k z

    ancestral (DDPM Algorithm 2; the posterior mean, DDPM eq. 7):
        cx = posterior c2, c0 = posterior c1, ce = cp = 0
        sigma: fixedlarge sqrt(beta) (beta~_1 at k = 0), fixedsmall exp(log beta~ (clipped) / 2),
               analytic sqrt(sigma*^2) (Analytic-DDPM, Bao et al. 2022, Theorem 1; fastddpm/analytic.py),
               learned exp(v / 2) with v the model's second C channels (IDDPM sec. 3.1),
               learned_range exp((f log beta_k + (1 - f) log beta~_k) / 2), f = (v + 1) / 2 (IDDPM eq. 15)
    ddim (Song et al. 2021, eq. 12):
        cx = cp = 0, c0 = sqrt(ab_prev), ce = sqrt(max(1 - ab_prev - s^2, 0)),
        s = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev);
        sigma = s, or sqrt(sigma*^2) of Analytic-DDIM for this eta (var_type "analytic")
    dpm++2m (DPM-Solver++(2M), Lu et al. 2022, Algorithm 2; the midpoint rule) and
    dpm++2m-sde (SDE-DPM-Solver++(2M), ibid. sec. 5): (cx, c0, cp, sigma) are the rows (x, x0,
        prev_x0, noise) of `fastddpm.solvers.dpm_coefficients`, ce = 0; prev_x0 is the previous
        step's (clipped) x0' (the sampler's state), cp = 0 at the first step walked (k = K-1) and
        at k = 0 (first order, x_0 = x0'). The kernel reads PREV and writes X0 in the same launch;
        they may be one buffer (each element is read before it is written, by the same thread).

    z = 0 at k = 0 and wherever sigma_k = 0 (DRAW_k = 0: Philox is skipped altogether); otherwise
    z is drawn inside the kernel with tl.randn from the key layout of fastddpm/noise.py: step key
    t (the ORIGINAL timestep), sample index sample_offset + b, element = flat NCHW index within
    the sample whatever the memory layout, so the Triton and reference backends draw the same numbers.

Which terms a launch computes are `tl.constexpr` flags (X_TERM: cx x_t, EPS_TERM: ce eps', PREV:
cp prev_x0), so each sampler's variant loads only the tensors it uses: ancestral x_t and eps
(and v), ddim the same, the solvers also prev_x0; and eps' is recomputed only for ddim.

The per-step scalars live in one float32 device table [K, NUM_COEFS] (`StepTables`, built once in
float64 from `diffusion` and cast; a step's coefficients share one 64-byte line), read by the
kernel at a *device* step index: a CUDA graph can capture the launch once and replay it for every
k by updating that index (and the device noise key) in place, with no host sync.

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

# Columns of the per-step coefficient table (float32 [K, NUM_COEFS]: one row a step). The four
# every variant reads come first, then the optional terms', then the noise scale's.
COEF_A, COEF_B, COEF_X0, COEF_DRAW, COEF_X, COEF_EPS, COEF_PREV, COEF_SIGMA, COEF_LOG_BETA, COEF_LOG_POST = range(10)
NUM_COEFS = 16  # padded: row k starts 64-byte aligned, one cache line a step
# How the kernel gets sigma (a string constexpr): from the SIGMA column, from the raw
# log-variance v the model outputs, or from v in [-1, 1] (IDDPM's interpolation).
VAR_MODES = ("table", "learned", "learned_range")
SAMPLERS = ("ancestral", "ddim", "dpm++2m", "dpm++2m-sde")
MULTISTEP_SAMPLERS = ("dpm++2m", "dpm++2m-sde")  # fastddpm.options.MULTISTEP_SAMPLERS
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MASK32 = 0xFFFFFFFF


def _step_kernel(
    X,  # *x_t [B, C, S] at strides (sxb, sxc, sxs)
    OUT,  # *model output [B, C or 2C, S] at strides (sob, soc, sos): eps in channels [0, C), v in [C, 2C)
    XP,  # *x_{t-1}, output [B, C, S] at strides (spb, spc, sps); may be X itself (same strides)
    X0,  # *x0', output at XP's strides (spb, spc, sps); written only if WRITE_X0
    PREV_X0,  # *the previous step's x0' at XP's strides, read only if PREV; may be X0 itself
    COEF,  # *[K, NUM_COEFS] float32: row k holds step k's scalars at the COEF_* columns
    TSTEP,  # *[K] int64: original timesteps, the noise's step key
    KIDX,  # *the step index k, one int64 on the device
    KEY,  # *(seed mod 2^32, sample_offset), two int64 on the device
    C, S, blocks_per_sample,
    sxb, sxc, sxs, sob, soc, sos, spb, spc, sps,
    X_TERM: tl.constexpr, EPS_TERM: tl.constexpr, PREV: tl.constexpr, VAR: tl.constexpr,
    CLIP: tl.constexpr, WRITE_X0: tl.constexpr, CHANNELS_LAST: tl.constexpr, NCOEF: tl.constexpr,
    BLOCK: tl.constexpr,
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
    row = COEF + k * NCOEF  # the column offsets below are COEF_A .. COEF_LOG_POST
    coef_a = tl.load(row + 0)
    coef_b = tl.load(row + 1)
    coef_x0 = tl.load(row + 2)
    draw = tl.load(row + 3)

    b64 = b.to(tl.int64)
    dst = b64 * spb + c * spc + s * sps
    if PREV:  # read before anything is stored: PREV_X0 may be X0 (or XP) itself
        prev = tl.load(PREV_X0 + dst, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + b64 * sxb + c * sxc + s * sxs, mask=mask, other=0.0).to(tl.float32)
    out_row = OUT + b64 * sob + s * sos
    eps = tl.load(out_row + c * soc, mask=mask, other=0.0).to(tl.float32)
    x0 = coef_a * x - coef_b * eps
    if CLIP:
        x0 = tl.minimum(tl.maximum(x0, -1.0), 1.0)
        if EPS_TERM:
            eps = (coef_a * x - x0) / coef_b
    xp = coef_x0 * x0
    if X_TERM:
        xp = xp + tl.load(row + 4) * x
    if EPS_TERM:
        xp = xp + tl.load(row + 5) * eps
    if PREV:
        xp = xp + tl.load(row + 6) * prev
    if draw != 0.0:  # no noise at k = 0 nor where sigma = 0: skip Philox altogether
        if VAR == "learned":
            v = tl.load(out_row + (c + C) * soc, mask=mask, other=0.0).to(tl.float32)
            sigma = tl.exp(0.5 * v)
        elif VAR == "learned_range":
            v = tl.load(out_row + (c + C) * soc, mask=mask, other=0.0).to(tl.float32)
            frac = (v + 1.0) / 2.0
            sigma = tl.exp(0.5 * (frac * tl.load(row + 8) + (1.0 - frac) * tl.load(row + 9)))
        else:
            sigma = tl.load(row + 7)
        # fastddpm.noise key layout: Philox key (seed, t), counter (e, i, 0, 0) = tl.randn(seed | t << 32, e | i << 32)
        seed = tl.load(KEY) | (tl.load(TSTEP + k) << 32)
        sample = tl.load(KEY + 1) + b64
        e = (c * S + s).to(tl.int64)  # flat NCHW index of the element in its sample
        z = tl.randn(seed, e | (sample << 32))
        xp = xp + sigma * z
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

    coefs      [K, NUM_COEFS] float32, columns COEF_*: A, B, c0, draw, cx, ce, cp, sigma, log beta,
               log beta~ (the module docstring's linear form; unused columns 0)
    timesteps  [K] int64 original timesteps (the noise step key)
    steps      arange(K) int64: steps[k] is a 0-d device view to pass as the step index
    x_term, eps_term, prev_term   which terms the sampler's form has (the kernel's constexpr flags)
    var_mode   one of VAR_MODES
    needs_prev host tuple [K]: whether step k reads prev_x0 (cp_k != 0); checked by `triton_step`
    """

    coefs: torch.Tensor
    timesteps: torch.Tensor
    steps: torch.Tensor
    x_term: bool
    eps_term: bool
    prev_term: bool
    var_mode: str
    needs_prev: tuple = ()
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


def _check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise FastDDPMError(f"unknown sampler {sampler!r}; choose one of {', '.join(map(repr, SAMPLERS))}")


def coefficient_columns(diffusion, sampler: str = "ancestral", eta: float = 0.0) -> tuple[torch.Tensor, str]:
    """The float64 table [K, NUM_COEFS] of `diffusion` for `sampler` (module docstring) and its var_mode."""
    _check_sampler(sampler)
    s = diffusion.schedule
    K = s.num_steps
    cols = torch.zeros(K, NUM_COEFS, dtype=torch.float64)
    cols[:, COEF_A] = s.sqrt_recip_alphas_cumprod
    cols[:, COEF_B] = s.sqrt_recipm1_alphas_cumprod
    cols[:, COEF_LOG_BETA] = torch.log(s.betas)
    cols[:, COEF_LOG_POST] = s.posterior_log_variance_clipped
    not_first = torch.arange(K) > 0
    analytic = diffusion.var_type == "analytic"
    var_mode = "table"
    if sampler == "ddim":
        ab, ab_prev = s.alphas_cumprod, s.alphas_cumprod_prev
        lam = eta * torch.sqrt((1.0 - ab_prev) / (1.0 - ab)) * torch.sqrt(1.0 - ab / ab_prev)
        cols[:, COEF_X0] = ab_prev.sqrt()
        cols[:, COEF_EPS] = (1.0 - ab_prev - lam**2).clamp(min=0.0).sqrt()
        sigma = diffusion.analytic_variance("ddim", eta).sqrt() if analytic else lam
    elif sampler == "ancestral":
        cols[:, COEF_X0] = s.posterior_mean_coef1
        cols[:, COEF_X] = s.posterior_mean_coef2
        if diffusion.var_type in ("learned", "learned_range"):
            var_mode, sigma = diffusion.var_type, torch.ones(K, dtype=torch.float64)  # from the model's v
        elif analytic:
            sigma = diffusion.analytic_variance("ancestral").sqrt()
        elif diffusion.var_type == "fixedlarge":
            sigma = s.fixedlarge_variance.sqrt()
        else:
            sigma = torch.exp(0.5 * s.posterior_log_variance_clipped)
    else:  # the DPM-Solver++ family; the variance channels of a learned-variance model are ignored
        from fastddpm.solvers import dpm_coefficients

        rows = dpm_coefficients(s, sampler)
        cols[:, COEF_X], cols[:, COEF_X0], cols[:, COEF_PREV] = rows["x"], rows["x0"], rows["prev_x0"]
        sigma = rows["noise"]
    cols[:, COEF_SIGMA] = sigma if var_mode == "table" else 0.0
    cols[:, COEF_DRAW] = (not_first & (sigma > 0)).to(torch.float64)
    return cols, var_mode


def step_tables(diffusion, device, sampler: str = "ancestral", eta: float = 0.0) -> StepTables:
    """The float32 device tables of `diffusion` for `sampler` (and eta), built in float64 once and cached.

    sampler "ancestral", "ddim" (eta its noise scale), "dpm++2m" or "dpm++2m-sde"; the variance is
    the process's var_type (fixed, learned, or "analytic": Analytic-DPM's, for ancestral and ddim).
    """
    _check_sampler(sampler)
    device = torch.device(device)
    cache = _TABLES.setdefault(diffusion, {})
    ck = (device, sampler, float(eta) if sampler == "ddim" else 0.0)
    if ck in cache:
        return cache[ck]
    cols, var_mode = coefficient_columns(diffusion, sampler, eta)
    tables = StepTables(
        coefs=cols.to(device=device, dtype=torch.float32),
        timesteps=torch.as_tensor(diffusion.timesteps, dtype=torch.int64).to(device),
        steps=torch.arange(cols.shape[0], dtype=torch.int64, device=device),
        x_term=sampler != "ddim", eps_term=sampler == "ddim", prev_term=sampler in MULTISTEP_SAMPLERS,
        var_mode=var_mode, needs_prev=tuple(bool(v) for v in (cols[:, COEF_PREV] != 0).tolist()),
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
                  pred_x0: torch.Tensor | None = None,
                  prev_x0: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Launch]]:
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
    for name, buf in (("pred_x0", pred_x0), ("prev_x0", prev_x0)):
        if buf is not None and (buf.shape != x.shape or buf.dtype != x.dtype or _bcs_strides(buf) != out_strides):
            raise FastDDPMError(f"the {name} buffer must have the shape, dtype and memory layout of the x_{{t-1}} buffer")
    prev = prev_x0 is not None and tables.prev_term
    B, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    if C * S >= 2**31:
        raise FastDDPMError(f"a sample of {C * S} elements is too large for the step kernel's 32-bit indices")
    channels_last = sxc == 1 and C > 1 and S > 1  # iterate in memory order: channel fastest
    blocks = triton.cdiv(C * S, BLOCK)
    launches = []
    if B * blocks:
        launches.append(Launch("step", "", kernel, (B * blocks,), (
            x, model_output, out, pred_x0 if pred_x0 is not None else out, prev_x0 if prev else out,
            tables.coefs, tables.timesteps, k, key,
            C, S, blocks, sxb, sxc, sxs, sob, soc, sos, *out_strides), dict(
            X_TERM=tables.x_term, EPS_TERM=tables.eps_term, PREV=prev, VAR=tables.var_mode,
            CLIP=bool(clip_denoised), WRITE_X0=pred_x0 is not None, CHANNELS_LAST=channels_last,
            NCOEF=NUM_COEFS, BLOCK=BLOCK, num_warps=NUM_WARPS)))
    return out, launches


def fused_step(tables: StepTables, x: torch.Tensor, model_output: torch.Tensor, k: torch.Tensor,
               key: torch.Tensor, *, clip_denoised: bool = True, out: torch.Tensor | None = None,
               pred_x0: torch.Tensor | None = None, prev_x0: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the fused step: x_{t-1} from x_t at the device step index k (module docstring).

    tables        `step_tables(diffusion, device, sampler, eta)`
    x             x_t [B, C, *spatial], float32 / bfloat16 / float16, NCHW or channels-last
    model_output  [B, C, *spatial] eps, or [B, 2C, *spatial] (eps, v): v is read for learned
                  variances and ignored otherwise
    k             0-d int64 device tensor, the step index (e.g. `tables.steps[k]`, or a buffer a
                  CUDA graph updates in place)
    key           `tables.key(seed, sample_offset)` / `noise_key(...)`: int64 [2] on the device
    out           x_{t-1} buffer of x's shape and layout (may be x itself); allocated if None
    pred_x0       if given, a buffer of out's shape and layout that receives the (clipped) x0
    prev_x0       the multistep solvers' previous x0 prediction, in out's layout; may be pred_x0
                  itself (read before written). Ignored by the other samplers. None drops the
                  term, which is right only where cp_k = 0 (k = K-1 and k = 0; `tables.needs_prev`).
    Returns x_{t-1}. No host sync: nothing here reads a device value.
    """
    out, launches = step_launches(tables, x, model_output, k, key, clip_denoised=clip_denoised, out=out,
                                  pred_x0=pred_x0, prev_x0=prev_x0)
    for launch in launches:
        launch()
    return out


def _check_step(diffusion, x: torch.Tensor, sampler: str, sample_offset: int) -> None:
    if diffusion.mean_type != "eps":
        raise BackendUnavailableError(
            f"the triton backend's fused step implements mean_type 'eps' only, not {diffusion.mean_type!r}; "
            "use backend 'reference' for this model")
    _check_sampler(sampler)
    if x.ndim < 2:
        raise FastDDPMError(f"x_t must have shape [B, C, ...], got {list(x.shape)}")
    if not (0 <= sample_offset and sample_offset + x.shape[0] <= 2**32):
        raise FastDDPMError(f"sample indices {sample_offset}..{sample_offset + x.shape[0] - 1} do not fit 32 bits")


def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise FastDDPMError(f"the triton step computes in float32 and takes float32, bfloat16 or float16 "
                            f"x_t, got {x.dtype}")


def _prev_for(tables: StepTables, k: int, prev_x0: torch.Tensor | None, like: torch.Tensor, sampler: str):
    """The previous x0 prediction as the kernel reads it (like's layout and dtype), or None where
    step k does not read it; FastDDPMError where it must and none was given."""
    if not tables.prev_term or not tables.needs_prev[k]:
        return None
    if prev_x0 is None:
        raise FastDDPMError(f"step {k} of the {sampler} sampler is second order: it needs the previous step's "
                            "x0 prediction (prev_x0)")
    if tuple(prev_x0.shape) != tuple(like.shape):
        raise FastDDPMError(f"prev_x0 has shape {list(prev_x0.shape)}, x_t has {list(like.shape)}")
    if prev_x0.dtype == like.dtype and prev_x0.device == like.device and _bcs_strides(prev_x0) == _bcs_strides(like):
        return prev_x0
    return torch.empty_like(like).copy_(prev_x0)


def triton_step(diffusion, x: torch.Tensor, k: int, model_output: torch.Tensor, *, seed: int,
                sample_offset: int = 0, sampler: str = "ancestral", eta: float = 0.0, clip_denoised: bool = True,
                return_pred_x0: bool = True,
                prev_x0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sampling.reference_step` computed by the fused kernel: (x_{t-1}, pred_x0), both [B, C, ...].

    The signature is reference_step's, so it is the `triton` backend's step function. k is the
    Python step index of `diffusion` (the kernel reads it through `tables.steps[k]`, a device
    view, so nothing is copied per step). pred_x0 is written by the kernel as a second output
    (one extra write of x's size); pass return_pred_x0=False to skip it and get None. prev_x0:
    the previous step's pred_x0 for the multistep samplers (None at the first step walked).
    The model output has 2C channels when `diffusion.learn_sigma` (the variance channels are read
    only for var_type learned / learned_range), else C.
    Raises BackendUnavailableError for mean_type "x0" / "xprev" (not fused).
    """
    _check_step(diffusion, x, sampler, sample_offset)
    _check_dtype(x)
    C = x.shape[1]
    _check_output(x, model_output, (2 * C,) if diffusion.learn_sigma else (C,))
    tables = step_tables(diffusion, x.device, sampler, eta)
    x_prev = torch.empty_like(x)
    if _bcs_strides(x_prev) is None:  # x has an odd layout: both outputs contiguous
        x_prev = torch.empty_like(x, memory_format=torch.contiguous_format)
    prev = _prev_for(tables, k, prev_x0, x_prev, sampler)
    x0 = torch.empty_like(x_prev) if return_pred_x0 else None
    fused_step(tables, x, model_output, tables.steps[k], tables.key(seed, sample_offset),
               clip_denoised=clip_denoised, out=x_prev, pred_x0=x0, prev_x0=prev)
    return x_prev, x0


# ------------------------------------------------------------------------------------- twin
def step_twin(tables: StepTables, x: torch.Tensor, model_output: torch.Tensor, k: int, *, seed: int,
              sample_offset: int = 0, clip_denoised: bool = True,
              prev_x0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's formula in torch, from the same float32 table: (x_{t-1}, pred_x0), float32.

    Same arguments as `fused_step` but k a Python int and the key as (seed, sample_offset); z
    comes from `fastddpm.noise.noise` (the stream the kernel draws).
    """
    C = x.shape[1]
    _check_output(x, model_output, _output_channels(tables, C))
    col = tables.coefs[k].to(x.device)
    a, b_ = col[COEF_A], col[COEF_B]
    xf = x.float()
    eps = model_output[:, :C].float()
    x0 = a * xf - b_ * eps
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
        if tables.eps_term:
            eps = (a * xf - x0) / b_
    xp = col[COEF_X0] * x0
    if tables.x_term:
        xp = xp + col[COEF_X] * xf
    if tables.eps_term:
        xp = xp + col[COEF_EPS] * eps
    if tables.prev_term and prev_x0 is not None:
        xp = xp + col[COEF_PREV] * prev_x0.float()
    if float(col[COEF_DRAW]) != 0.0:
        if tables.var_mode == "learned":
            sigma = torch.exp(0.5 * model_output[:, C:].float())
        elif tables.var_mode == "learned_range":
            frac = (model_output[:, C:].float() + 1.0) / 2.0
            sigma = torch.exp(0.5 * (frac * col[COEF_LOG_BETA] + (1.0 - frac) * col[COEF_LOG_POST]))
        else:
            sigma = col[COEF_SIGMA]
        z = noise(seed, int(tables.timesteps[k]), x.shape, sample_offset, device=x.device)
        xp = xp + sigma * z
    return xp, x0
