"""Sample from a `fastddpm export` model with numpy and ONNX Runtime only: no PyTorch. Copy this one file
alone to a host with numpy and onnxruntime (or onnxruntime-gpu; Pillow optional, for grid.png) and run
    python ort_sample.py --onnx model.onnx --steps 50 --batch 64 --seed 0 --out DIR [--sampler S ...]
It publishes what `fastddpm sample` writes, all or nothing, with the same samples for the same seed up to
float32 rounding: it redoes the reference's tables and timestep rules (fastddpm/schedule.py), Analytic-DPM's
variance from the file's Gamma (analytic.py), the counter-based noise (noise.py; Philox words and uniforms exact,
numpy's and torch's float32 log and cos up to 4 ulp apart: z agrees to 1e-6) and the step (sampling.py, solvers.py)
as one float32 linear form (COEF_NAMES), for an eps-model graph or a whole step (`--step-graph`; on CUDA its state
stays on the GPU). Exit: 0 done, 2 bad input (one line on stderr), 130 interrupted.
"""
from __future__ import annotations

import argparse
import errno
import io
import json
import math
import os
import platform
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

if __name__ != "__main__":  # imported (fastddpm.export); as a script main() imports it: Ctrl-C there is one line
    import numpy as np

FORMAT, FORMAT_VERSION = "fastddpm-onnx", "2"  # 2: step graphs take prev_x0 and 14 coefficients; 1's eps graphs run
META_KEY, XT_STEP = "fastddpm", 0xFFFFFFFF  # the metadata key of the JSON description; x_T's noise step key
SAMPLERS, SPACINGS = ("ancestral", "ddim", "dpm++2m", "dpm++2m-sde"), ("iddpm", "linspace", "leading", "trailing")
SOLVERS = SAMPLERS[2:]  # DPM-Solver++(2M) and its SDE variant: multistep, they read the previous x0 prediction
LEARNED_VAR_TYPES, VAR_TYPES = ("learned", "learned_range"), ("fixedlarge", "fixedsmall", "learned", "learned_range")
VARIANCES_OF = {"ancestral": ("fixedlarge", "fixedsmall", "learned", "analytic"), "ddim": ("analytic",), "dpm++2m": (),
                "dpm++2m-sde": ()}  # --variance per sampler, as fastddpm/generate.py's
MAX_IMAGE_SIZE, MAX_TIMESTEPS, MAX_THREADS = 1024, 100_000, 1024  # as fastddpm/validate.py and schedule.py
TMP_PREFIX, NO_SPACE = ".ort_sample-tmp.", (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

# The per-step coefficients (a step graph's "coef" [14]): x0 = sqrt_recip_ab x - sqrt_recipm1_ab eps (DDPM eq. 4),
# clipped; mean = coef1 x0 + coef2 x (eq. 7); eps' = (sqrt_recip_ab x - x0) / sqrt_recipm1_ab; log_var = the model's
# if use_learned (learned_range: IDDPM eq. 15 from log_beta, posterior_log_variance) else log_variance; then
#   x_prev = w_mean mean + w_x0 x0 + w_eps eps' + w_x x + w_prev prev_x0 + noise_scale exp(log_var / 2) z
# ancestral: w_mean = 1; DDIM (Song et al. 2021, eq. 12): w_x0, w_eps; DPM-Solver++(2M): w_x, w_x0, w_prev (prev_x0:
# the previous step's x0), fastddpm/solvers.py's linear form. Zero weights add exact zeros.
COEF_NAMES = ("sqrt_recip_ab", "sqrt_recipm1_ab", "coef1", "coef2", "w_mean", "w_x0", "w_eps", "w_x", "w_prev",
              "log_variance", "log_beta", "posterior_log_variance", "use_learned", "noise_scale")
_COEF, _MASK32 = {name: i for i, name in enumerate(COEF_NAMES)}, 0xFFFFFFFF


class SampleError(ValueError):
    """Bad input a user can fix: a missing, truncated or foreign .onnx file, a bad flag value."""


# ------------------------------------------------------------------------------------------ noise
def philox4x32(c0, c1, c2, c3, k0: int, k1: int, rounds: int = 10):
    """Philox-4x32 on uint32 arrays (broadcastable), keys as Python ints: fastddpm/noise.py's rounds."""
    mul_a, mul_b, shift = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57), np.uint64(32)
    for _ in range(rounds):
        pb, pa = c2.astype(np.uint64) * mul_b, c0.astype(np.uint64) * mul_a
        c0, c1, c2, c3 = ((pb >> shift).astype(np.uint32) ^ c1 ^ np.uint32(k0), pb.astype(np.uint32),
                          (pa >> shift).astype(np.uint32) ^ c3 ^ np.uint32(k1), pa.astype(np.uint32))
        k0, k1 = (k0 + 0x9E3779B9) & _MASK32, (k1 + 0xBB67AE85) & _MASK32
    return c0, c1, c2, c3


def _uniform(r: np.ndarray) -> np.ndarray:
    """Triton's uint_to_uniform_float: uint32 -> float32 in [0, 1)."""
    x = r.view(np.int32)
    return np.where(x < 0, ~x, x).astype(np.float32) * np.float32(4.6566127342e-10)


def noise(seed: int, step: int, shape, sample_offset: int = 0, pool=None) -> np.ndarray:
    """Standard normal float32 noise of `shape` = [B, ...] for samples sample_offset .. +B-1, the numpy twin of
    fastddpm.noise.noise (key (seed, step) mod 2^32); `pool`, an executor, draws blocks of rows in parallel."""
    shape = tuple(int(s) for s in shape)
    batch, per_sample = shape[0], math.prod(shape[1:])
    if per_sample >= 2**32 or sample_offset < 0 or sample_offset + batch > 2**32:
        raise SampleError(f"{batch} samples of {per_sample} elements from index {sample_offset} do not fit "
                          "the 32-bit counters")
    out = np.empty((batch, per_sample), dtype=np.float32)
    # blocks of about 65536 elements: numpy's temporaries stay in the cache (4-5x faster measured on [256, 3072])
    rows = max(1, 65536 // max(per_sample, 1))

    def fill(start):  # rows start .. stop - 1: Box-Muller of the Philox words r0, r1
        stop, e, zero = min(start + rows, batch), np.arange(per_sample, dtype=np.uint32)[None, :], np.uint32(0)
        i = np.arange(sample_offset + start, sample_offset + stop, dtype=np.uint64).astype(np.uint32)[:, None]
        r0, r1, _, _ = philox4x32(e, i, zero, zero, int(seed) & _MASK32, int(step) & _MASK32)
        u1 = np.maximum(_uniform(r0), np.float32(1e-7))
        out[start:stop] = np.sqrt(np.float32(-2.0) * np.log(u1)) * np.cos(np.float32(6.283185307179586) * _uniform(r1))

    list((pool.map if pool is not None else map)(fill, range(0, batch, rows)))
    return out.reshape(shape)


# ------------------------------------------------------------------------------------------ schedule
def sampling_timesteps(T: int, steps: int | None, sampler: str = "ancestral", spacing: str = "iddpm") -> list[int]:
    """The original timesteps a run of `steps` steps (None: T) visits, ascending: fastddpm/schedule.py's
    `sampling_timesteps` and `diffusers_timesteps`, which give the rules (iddpm's, diffusers' DDPM/DDIM and
    DPMSolverMultistep families, the trailing rule's dropped -1)."""
    if spacing not in SPACINGS:
        raise SampleError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if steps is not None and not 1 <= steps <= T:
        raise SampleError(f"--steps must be between 1 and the model's T = {T}, got {steps}")
    if spacing == "iddpm":
        stride = next((s for s in range(1, T + 1) if len(range(0, T, s)) == steps), None) if sampler == "ddim" else None
        if steps is None or steps == T or stride is not None:
            return list(range(0, T, stride or 1))
        step = 1.0 if steps <= 1 else (T - 1) / (steps - 1)
        return sorted({round(j * step) for j in range(steps)})
    n, extra = T if steps is None else steps, int(sampler in SOLVERS and spacing != "trailing")
    if not 1 <= n <= T - extra:
        raise SampleError(f"{spacing} spacing takes 1 to {T - extra} steps of T={T}, got {n!r}")
    t = {"linspace": lambda: np.linspace(0, T - 1, n + extra).round(),
         "leading": lambda: np.arange(0, n + extra) * (T // (n + extra)),
         "trailing": lambda: np.round(np.arange(T, 0, -T / n))[:n] - 1}[spacing]()
    kept = sorted(int(v) for v in t)[extra:]
    if len(set(kept)) != n or kept[0] < 0 or kept[-1] > T - 1:  # cannot happen for the ranges above
        raise SampleError(f"{spacing} spacing of {n} steps over T={T} does not give {n} distinct timesteps")
    return kept


def schedule_problem(betas, timesteps=None) -> str | None:
    """Why float64 betas [K] (at original `timesteps`) cannot be sampled, or None: each finite, in (0, 1) and
    with 1 - beta < 1 (1e-300 leaves alphabar at 1: 1 - alphabar = 0 divides), alphabar above 0."""
    b = np.asarray(betas, dtype=np.float64)
    t = np.arange(len(b)) if timesteps is None else np.asarray(timesteps)
    with np.errstate(all="ignore"):
        masks = (~(np.isfinite(b) & (b >= 0) & (b < 1)), 1.0 - b == 1.0)
    for mask, text in zip(masks, ("every beta must be finite and in (0, 1); beta = {} at t={}", "beta = {} at t={} is "
                                  "too small for float64 (1 - beta rounds to 1: 1 - alphabar can be 0)")):
        if mask.any():
            return text.format(float(b[np.argmax(mask)]), int(t[np.argmax(mask)]))
    if len(b) == 0 or np.cumprod(1.0 - b)[-1] <= 0:
        return "every beta must be finite and in (0, 1), and alphabar must stay above 0"
    return None


class Process:
    """fastddpm/schedule.py's float64 tables of a process over `timesteps` [K] with its own betas [K] (IDDPM sec. 4);
    var_type: the one to sample with; learn_sigma: 2C output channels; gamma: Analytic-DPM's [T], per original t."""

    def __init__(self, betas, timesteps, mean_type: str = "eps", var_type: str = "fixedlarge",
                 learn_sigma: bool | None = None, gamma=None):
        b = np.asarray(betas, dtype=np.float64)
        self.betas, self.timesteps, self.num_steps = b, np.asarray(timesteps, dtype=np.int64), len(b)
        self.mean_type, self.var_type = mean_type, var_type
        self.learn_sigma = var_type in LEARNED_VAR_TYPES if learn_sigma is None else bool(learn_sigma)
        if schedule_problem(b, self.timesteps):
            raise SampleError(f"cannot sample this schedule: {schedule_problem(b, self.timesteps)}")
        a = 1.0 - b
        self.alphas_cumprod = ab = np.cumprod(a)
        self.alphas_cumprod_prev = ab_prev = np.concatenate([[1.0], ab[:-1]])
        self.posterior_variance = post_var = b * (1.0 - ab_prev) / (1.0 - ab)
        first = post_var[1] if len(b) > 1 else b[0]
        self.sqrt_recip_alphas_cumprod, self.sqrt_recipm1_alphas_cumprod = 1.0 / np.sqrt(ab), np.sqrt(1.0 / ab - 1.0)
        self.posterior_mean_coef1 = b * np.sqrt(ab_prev) / (1.0 - ab)
        self.posterior_mean_coef2 = (1.0 - ab_prev) * np.sqrt(a) / (1.0 - ab)
        with np.errstate(divide="ignore"):  # a log of 0 is caught as a non-finite coefficient
            self.posterior_log_variance_clipped = np.log(np.concatenate([[first], post_var[1:]]))
            self.log_fixedlarge_variance, self.log_betas = np.log(np.concatenate([[first], b[1:]])), np.log(b)
        self.gamma = None if gamma is None else np.asarray(gamma, dtype=np.float64)[self.timesteps]

    @classmethod
    def from_full(cls, betas, steps: int | None, sampler: str, mean_type: str, var_type: str, *,
                  spacing: str = "iddpm", variance: str | None = None, gamma=None) -> "Process":
        """The process of a run over the full betas [T] (fastddpm/generate.py `respaced_for`); var_type is the trained
        one, `variance` --variance (None: the model's own; GaussianDiffusion.with_variance's rules)."""
        usable = VARIANCES_OF.get(sampler, ())
        if variance is not None and variance not in usable:
            raise SampleError(f"--variance {variance} does not apply to the {sampler} sampler " + (
                f"(it takes only {', '.join(usable)})" if usable else "(it has no reverse variance)"))
        if variance == "learned" and var_type not in LEARNED_VAR_TYPES:
            raise SampleError(f"--variance learned needs a model trained with learned variances; this one was "
                              f"trained with {var_type!r} (use fixedlarge, fixedsmall or analytic)")
        if variance == "analytic" and gamma is None:
            raise SampleError("--variance analytic needs Analytic-DPM's table Gamma_t, which this file does not "
                              "carry; export a calibrated checkpoint (`fastddpm calibrate`, then `fastddpm export`)")
        full = np.asarray(betas, dtype=np.float64)
        kept = sampling_timesteps(len(full), steps, sampler, spacing)
        ab = np.cumprod(1.0 - full)[kept]
        b = full if len(kept) == len(full) else 1.0 - ab / np.concatenate([[1.0], ab[:-1]])
        return cls(b, kept, mean_type, var_type if variance in (None, "learned") else variance,
                   learn_sigma=var_type in LEARNED_VAR_TYPES, gamma=gamma)

    def analytic_variance(self, sampler: str = "ancestral", eta: float = 0.0) -> np.ndarray:
        """Analytic-DPM's optimal variance sigma*_k^2, float64 [K], ancestral or DDIM with eta: the numpy twin
        of fastddpm/analytic.py `optimal_variance` (Bao et al. 2022, Theorem 1; the formulas are there)."""
        if self.gamma is None:
            raise SampleError("the analytic variance needs Analytic-DPM's table Gamma_t (a calibrated export)")
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        if sampler == "ancestral":
            lam2, c = self.posterior_variance, self.posterior_mean_coef1
        else:
            lam2 = float(eta) ** 2 * self.posterior_variance
            c = np.sqrt(ab_prev) - np.sqrt(np.maximum(1.0 - ab_prev - lam2, 0.0)) * np.sqrt(ab / (1.0 - ab))
        sigma2 = lam2 + c**2 * np.clip((1.0 - ab) / ab * (1.0 - self.gamma), 0.0, 1.0)
        sigma2[0] = np.exp(self.posterior_log_variance_clipped[0])  # the fixed decoder (never used to sample)
        return sigma2

    def dpm_coefficients(self, sde: bool) -> dict:
        """DPM-Solver++(2M) (sde: SDE-DPM-Solver++(2M)) as x_t = w_x x_s + w_x0 D0 + w_prev m1 + noise_scale z, float64
        [K] each: the numpy twin of fastddpm/solvers.py `step_scalars`, where the paper's formulas are."""
        K, ab_s, ab_t = self.num_steps, self.alphas_cumprod, self.alphas_cumprod_prev
        sigma_s, alpha_t, sigma_t = np.sqrt(1.0 - ab_s), np.sqrt(ab_t), np.sqrt(np.maximum(1.0 - ab_t, 0.0))
        e = np.sqrt(ab_s) * sigma_t / (sigma_s * alpha_t)  # e^-h; 0 at k = 0
        with np.errstate(divide="ignore", invalid="ignore"):
            lam = 0.5 * (np.log(ab_s) - np.log1p(-ab_s))  # lambda_s; lambda_t of step k is lam[k - 1]
            r0 = (lam - np.append(lam[1:], np.nan)) / (np.append(np.inf, lam[:-1]) - lam)
            half_d1 = np.where((np.arange(K) > 0) & (np.arange(K) < K - 1), 0.5 / r0, 0.0)
        weight = alpha_t * (1.0 - e**2 if sde else 1.0 - e)
        return {"w_x": sigma_t / sigma_s * e if sde else sigma_t / sigma_s, "w_x0": weight * (1.0 + half_d1),
                "w_prev": -weight * half_d1, "noise_scale": sigma_t * np.sqrt(np.maximum(1.0 - e**2, 0.0)) * sde}

    def coefficient_table(self, sampler: str = "ancestral", eta: float = 0.0) -> np.ndarray:
        """The float32 coefficients [K, 14] of all steps (COEF_NAMES); SampleError if one overflows or divides by 0."""
        K, ab, ab_prev, var = self.num_steps, self.alphas_cumprod, self.alphas_cumprod_prev, self.var_type
        later = (np.arange(K) > 0).astype(np.float64)  # no noise at the last step (k = 0)
        c = dict.fromkeys(COEF_NAMES, 0.0)
        c.update(sqrt_recip_ab=self.sqrt_recip_alphas_cumprod, sqrt_recipm1_ab=self.sqrt_recipm1_alphas_cumprod,
                 coef1=self.posterior_mean_coef1, coef2=self.posterior_mean_coef2, log_beta=self.log_betas,
                 posterior_log_variance=self.posterior_log_variance_clipped)
        if sampler == "ancestral":
            log_var = np.log(self.analytic_variance()) if var == "analytic" else (
                self.log_fixedlarge_variance if var == "fixedlarge" else self.posterior_log_variance_clipped)
            c.update(w_mean=1.0, log_variance=log_var, use_learned=float(var in LEARNED_VAR_TYPES), noise_scale=later)
        elif sampler == "ddim":  # Song et al. 2021, eq. 12 and 16; Analytic-DDIM replaces only the noise's sigma
            lam = eta * np.sqrt((1.0 - ab_prev) / (1.0 - ab)) * np.sqrt(1.0 - ab / ab_prev)
            sigma = np.sqrt(self.analytic_variance("ddim", eta)) if var == "analytic" else lam
            c.update(w_x0=np.sqrt(ab_prev), w_eps=np.sqrt(np.maximum(1.0 - ab_prev - lam**2, 0.0)),
                     noise_scale=later * sigma)
        elif sampler in SOLVERS:
            c.update(self.dpm_coefficients(sampler == "dpm++2m-sde"))
        else:
            raise SampleError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        with np.errstate(over="ignore", invalid="ignore"):
            table = np.stack([np.broadcast_to(np.asarray(c[n], float), (K,)) for n in COEF_NAMES], 1).astype(np.float32)
        bad = ~np.isfinite(table).all(axis=1) | (table[:, _COEF["sqrt_recipm1_ab"]] == 0) | (
            (table[:, _COEF["coef1"]] == 0) & (self.mean_type == "xprev"))
        if bad.any():
            k = int(np.argmax(bad))
            raise SampleError(f"the step at t={self.timesteps[k]} cannot be computed in float32 (alphabar = "
                              f"{ab[k]:.6g}, beta = {self.betas[k]:.6g}): a coefficient overflows or a divisor is 0")
        return table

    def coefficients(self, k: int, sampler: str = "ancestral", eta: float = 0.0) -> np.ndarray:
        """The float32 coefficient vector [len(COEF_NAMES)] of step index k (coefficient_table's row k)."""
        return self.coefficient_table(sampler, eta)[k]


def update(process: Process, x: np.ndarray, out: np.ndarray, coef: np.ndarray, z: np.ndarray | None,
           clip_denoised: bool = True, prev_x0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x_prev, pred_x0) float32 [B, C, H, W] from x_t and the model output [B, C or 2C, H, W]: reference_step as the
    step graph computes it (COEF_NAMES); z may be None where noise_scale is 0, prev_x0 (the last x0) where w_prev is."""
    sra, srm1, c1, c2, w_mean, w_x0, w_eps, w_x, w_prev, log_var, log_beta, post_log, learned, scale = coef
    C = x.shape[1]
    if out.shape[1] != (2 * C if process.learn_sigma else C):
        raise SampleError(f"the model returned {out.shape[1]} channels, expected {2 * C if process.learn_sigma else C}")
    mean_part, raw, one = out[:, :C], not clip_denoised, np.float32(1.0)
    x0 = {"eps": lambda: sra * x - srm1 * mean_part, "x0": lambda: mean_part,
          "xprev": lambda: (mean_part - c2 * x) / c1}[process.mean_type]()
    x0 = x0 if raw else np.clip(x0, -one, one)
    mean = mean_part if process.mean_type == "xprev" and raw else c1 * x0 + c2 * x
    eps = mean_part if process.mean_type == "eps" and raw else (sra * x - x0) / srm1
    prev = x0 if prev_x0 is None and w_prev == 0 else prev_x0  # (the first step walked has none, and weight 0)
    x_prev = w_mean * mean + w_x0 * x0 + w_eps * eps + w_x * x + w_prev * prev
    if scale != 0:  # (a huge learned log variance at a step without noise must not give 0 * inf)
        v = out[:, C:] if learned != 0 else log_var
        if learned != 0 and process.var_type == "learned_range":  # IDDPM eq. 15
            v = (v + one) / np.float32(2.0) * log_beta + (one - (v + one) / np.float32(2.0)) * post_log
        x_prev = x_prev + scale * np.exp(np.float32(0.5) * v) * z
    return x_prev.astype(np.float32, copy=False), x0


# ------------------------------------------------------------------------------------------ the model file
def _finite_nonnegative(v) -> bool:
    """A JSON number (not a bool), finite and >= 0 (Python compares a huge integer with a float exactly)."""
    return type(v) in (int, float) and 0 <= v <= sys.float_info.max


class OnnxModel:
    """A `fastddpm export` (path or bytes) in an ONNX Runtime session on `provider` ("auto", "cpu", "cuda"), described
    by its checked metadata (or `description`: in-memory). kind: "eps" (x [B, C, H, W], t [B] int64 -> out) or "step"
    (x, t, coef [14], z, prev_x0 -> x_prev, pred_x0); betas, gamma: float64 [T]; batches: a batch the graph fixes."""

    def __init__(self, source, provider: str = "auto", threads: int = 0, description: dict | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise SampleError("this sampler needs onnxruntime (pip install onnxruntime, or onnxruntime-gpu)") from None
        self.ort, from_bytes = ort, isinstance(source, (bytes, bytearray))
        self.path = "<in-memory model>" if from_bytes else os.fspath(source)
        if not from_bytes and not os.path.isfile(self.path):
            raise SampleError(f"ONNX model {self.path!r} does not exist or is not a file")
        if provider not in ("auto", "cpu", "cuda"):
            raise SampleError(f"unknown provider {provider!r}; choose one of 'auto', 'cpu', 'cuda'")
        if type(threads) is not int or not 0 <= threads <= MAX_THREADS:
            raise SampleError(f"threads must be an integer in 0..{MAX_THREADS} (0: ORT's default), not {threads!r}")
        available = ort.get_available_providers()
        if provider == "cuda" and "CUDAExecutionProvider" not in available:
            raise SampleError(f"--provider cuda needs onnxruntime-gpu (this onnxruntime offers {', '.join(available)})")
        use_cuda = provider == "cuda" or (provider == "auto" and "CUDAExecutionProvider" in available)
        if use_cuda and hasattr(ort, "preload_dlls"):
            try:  # CUDA and cuDNN from torch or the nvidia-* wheels (onnxruntime-gpu[cuda,cudnn]), ORT >= 1.21
                ort.preload_dlls()
            except Exception:  # noqa: BLE001 - best effort: without them the session reports the provider it got
                pass
        options = ort.SessionOptions()
        options.log_severity_level, options.intra_op_num_threads = 3, threads  # errors only; 0: ORT's default
        try:
            self.session = ort.InferenceSession(bytes(source) if from_bytes else self.path, options, providers=[
                "CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own pybind exception types for unreadable files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SampleError(f"{self.path!r} is not a readable ONNX model ({first})") from None
        self.provider = self.session.get_providers()[0]
        self.on_cuda = self.provider == "CUDAExecutionProvider"
        if provider == "cuda" and self.provider != "CUDAExecutionProvider":
            raise SampleError("--provider cuda was asked for, but ONNX Runtime could not start CUDA here")
        meta = description
        if description is None:
            props = self.session.get_modelmeta().custom_metadata_map
            if META_KEY not in props:
                raise SampleError(f"{self.path!r} is an ONNX model but not a fastddpm export (no {META_KEY!r} "
                                  "metadata); make one with `fastddpm export`")
            try:
                meta = json.loads(props[META_KEY])
            except ValueError as e:
                raise SampleError(f"{self.path!r} has corrupt fastddpm metadata ({e})") from None
        self._describe(meta, check_betas=description is None)

    def _describe(self, meta: dict, check_betas: bool) -> None:
        """Read the description, checking every field a hostile file could get wrong, then the graph's inputs."""
        def bad(what):
            return SampleError(f"{self.path!r} has bad fastddpm metadata: {what}")

        try:
            if not isinstance(meta, dict):
                raise bad(f"a JSON {type(meta).__name__}, not an object")
            if meta.get("format") != FORMAT:
                raise SampleError(f"{self.path!r} has metadata of format {meta.get('format')!r}, not {FORMAT!r}")
            version = str(meta.get("version"))
            if version not in ("1", FORMAT_VERSION):
                raise SampleError(f"{self.path!r} is export format version {meta.get('version')!r}; this sampler "
                                  f"reads versions 1 (eps graphs) and {FORMAT_VERSION}")
            self.meta, self.kind, self.dtype = meta, meta["graph"], meta["dtype"]
            self.unet, self.diffusion = dict(meta["unet"]), dict(meta["diffusion"])
            raw = meta.get("betas")
            if raw is not None and (type(raw) is not list or not all(type(v) in (int, float) for v in raw)):
                raise bad("betas must be a list of numbers")  # np.asarray would parse "0.1" and take bools
            self.betas = None if raw is None else np.asarray(raw, dtype=np.float64)
            self.clip_denoised = meta.get("clip_denoised", True)
            self.channels, self.image_size = self.unet["in_channels"], self.unet["image_size"]
            T, gamma, gflop = self.diffusion["num_timesteps"], meta.get("gamma"), meta.get("gflop_per_image_forward", 0)
        except SampleError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SampleError(f"{self.path!r} has corrupt fastddpm metadata ({e!r})") from None
        for name, value, high in (("in_channels", self.channels, 64), ("image_size", self.image_size, MAX_IMAGE_SIZE),
                                  ("num_timesteps", T, MAX_TIMESTEPS)):
            if type(value) is not int or not 1 <= value <= high:  # noqa: E721 - bool is not a count
                raise bad(f"{name}={value!r} is not an integer in [1, {high}]")
        for name, value, choices in (("graph", self.kind, ("eps", "step")), ("dtype", self.dtype, ("fp32", "fp16")),
                                     ("mean_type", self.diffusion.get("mean_type"), ("eps", "x0", "xprev")),
                                     ("var_type", self.diffusion.get("var_type"), VAR_TYPES),
                                     ("clip_denoised", self.clip_denoised, (True, False))):
            if not isinstance(value, (str, bool)) or value not in choices:
                raise bad(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")
        if version == "1" and self.kind == "step":
            raise SampleError(f"{self.path!r} is a version-1 step graph, whose step lacks the inputs this sampler "
                              "feeds (prev_x0, 14 coefficients); export it again with `fastddpm export --step-graph`")
        if not _finite_nonnegative(gflop):
            raise bad(f"gflop_per_image_forward={gflop!r} is not a finite number >= 0")
        if gamma is not None and not (type(gamma) is list and len(gamma) == T and all(map(_finite_nonnegative, gamma))):
            raise bad(f"gamma (Analytic-DPM's table) must be a list of T={T} finite numbers >= 0")
        self.gflop, self.gamma = float(gflop), None if gamma is None else np.asarray(gamma, dtype=np.float64)
        if (check_betas or self.betas is not None) and (self.betas is None or len(self.betas) != T):
            raise bad(f"it says T={T} but holds {0 if self.betas is None else self.betas.size} betas")
        if self.betas is not None and schedule_problem(self.betas):
            raise bad(schedule_problem(self.betas))
        # the graph's inputs must be the ones promised: names, element types, x's (z's, prev_x0's) [C, H, W]
        image = [None, self.channels, self.image_size, self.image_size]  # None: the batch
        want = {"x": ("tensor(float)", image), "t": ("tensor(int64)", [None])}
        if self.kind == "step":
            want.update(coef=("tensor(float)", [len(COEF_NAMES)]), z=want["x"], prev_x0=want["x"])
        got = {i.name: (i.type, list(i.shape)) for i in self.session.get_inputs()}
        if set(got) != set(want):
            raise SampleError(f"{self.path!r}: the graph takes inputs {sorted(got)}, but its metadata promises "
                              f"a {self.kind} graph with inputs {sorted(want)}")
        for name, (dtype, shape) in want.items():
            gtype, gshape = got[name]
            if gtype != dtype or len(gshape) != len(shape) or any(w not in (None, d) for d, w in zip(gshape, shape)):
                raise SampleError(f"{self.path!r}: graph input {name!r} is {gtype} {gshape}, but the metadata promises "
                                  f"{dtype} {['batch' if w is None else w for w in shape]}")
        self.batches = {got[n][1][0] for n, (_, dims) in want.items() if dims[0] is None and type(got[n][1][0]) is int}

    def check_shape(self, shape) -> tuple:
        """`shape` as a tuple if this graph can run it: [B, C, H, W] of the model, B its fixed batch if it has one."""
        shape, want = tuple(int(s) for s in shape), (self.channels, self.image_size, self.image_size)
        if len(shape) != 4 or shape[1:] != want or shape[0] < 1:
            raise SampleError(f"this model samples shape [B, {', '.join(map(str, want))}], not {list(shape)}")
        if self.batches - {shape[0]}:
            raise SampleError(f"{self.path!r} is a graph for batch {min(self.batches)} only; run it with --batch "
                              f"{min(self.batches)}, not {shape[0]}")
        return shape

    def eps(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The model output for x [B, C, H, W] float32 at original timesteps t [B] int64 (eps graph)."""
        if self.kind != "eps":
            raise SampleError(f"{self.path!r} is a whole-step graph; it has no separate eps-model output")
        return self.session.run(None, {"x": np.ascontiguousarray(x, np.float32),
                                       "t": np.ascontiguousarray(t, np.int64)})[0]

    def step(self, x: np.ndarray, t: np.ndarray, coef: np.ndarray, z: np.ndarray, prev_x0: np.ndarray):
        """(x_prev, pred_x0) of one whole step on host arrays (step graph; arguments as `update`)."""
        feed = {"x": x, "t": t, "coef": coef, "z": z, "prev_x0": prev_x0}
        return self.session.run(None, {k: np.ascontiguousarray(v, np.int64 if k == "t" else np.float32)
                                       for k, v in feed.items()})


class _DeviceLoop:
    """A step graph's state on the device (I/O binding): x and the previous x0 in device OrtValue pairs swapped after
    every run, so only t, coef and z go up per step. device "cpu": the same code on the CPU provider (the tests)."""

    def __init__(self, model: OnnxModel, x: np.ndarray, device: str = "cuda"):
        value, self.session, self.binding = model.ort.OrtValue, model.session, model.session.io_binding()
        self.x, self.prev = (value.ortvalue_from_numpy(v, device, 0) for v in (x, np.zeros_like(x)))
        self.x_next, self.pred = (value.ortvalue_from_shape_and_type([*x.shape], np.float32, device, 0) for _ in "xp")

    def step(self, t: np.ndarray, coef: np.ndarray, z: np.ndarray, fetch: bool):
        """Run one step; returns host copies [x_prev, pred_x0] when `fetch`, else None."""
        b = self.binding
        for bind, name, value in ((b.bind_ortvalue_input, "x", self.x), (b.bind_ortvalue_input, "prev_x0", self.prev),
                                  (b.bind_cpu_input, "t", t), (b.bind_cpu_input, "coef", coef),
                                  (b.bind_cpu_input, "z", z), (b.bind_ortvalue_output, "x_prev", self.x_next),
                                  (b.bind_ortvalue_output, "pred_x0", self.pred)):
            bind(name, value)
        self.session.run_with_iobinding(b)
        fetched = b.copy_outputs_to_cpu() if fetch else None
        self.x, self.x_next, self.prev, self.pred = self.x_next, self.x, self.pred, self.prev
        return fetched


def sample_loop(model: OnnxModel, process: Process, shape, seed: int = 0, sampler: str = "ancestral",
                eta: float = 0.0, sample_offset: int = 0, clip_denoised: bool = True, callback=None,
                progress=None, device_loop: bool | None = None, x_T: np.ndarray | None = None) -> np.ndarray:
    """Samples x_0 float32 [B, C, H, W] of `shape` (clipped when clip_denoised), the numpy twin of fastddpm's sample:
    from x_T (noise(seed, XT_STEP) unless given), for k = K-1 .. 0 the model at t = process.timesteps[k], the update
    with z = noise(seed, t) (and the previous x0 for dpm++2m*). callback gets dict(index, k, t, x, pred_x0) after
    each step, progress the index; device_loop: the step graph's state in device OrtValues (None: on CUDA)."""
    if sampler not in SAMPLERS:
        raise SampleError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not 0.0 <= eta <= 1.0:
        raise SampleError(f"eta must be in [0, 1], got {eta}")
    if eta != 0.0 and sampler != "ddim":
        raise SampleError(f"--eta is DDIM's noise scale; the {sampler} sampler has none")
    shape, graph, step = model.check_shape(shape), model.diffusion["var_type"], model.kind == "step"
    if step and clip_denoised != model.clip_denoised:
        raise SampleError(f"this step graph was exported with clip_denoised={model.clip_denoised}")
    if step and (process.mean_type != model.diffusion["mean_type"] or process.learn_sigma != (
            graph in LEARNED_VAR_TYPES) or process.var_type in LEARNED_VAR_TYPES and process.var_type != graph):
        raise SampleError(f"a step graph computes the update of the process it was exported with "
                          f"({model.diffusion['mean_type']}, {graph})")
    if x_T is not None and (np.shape(x_T) != shape or np.asarray(x_T).dtype.kind != "f" or not np.isfinite(x_T).all()):
        raise SampleError(f"x_T must be finite floats of shape {list(shape)}, got {np.asarray(x_T).dtype} "
                          f"{list(np.shape(x_T))}")
    if device_loop and not step:
        raise SampleError("the device loop needs a whole-step graph (fastddpm export --step-graph)")
    steps, table = list(range(process.num_steps - 1, -1, -1)), process.coefficient_table(sampler, eta)
    noise_at = [int(process.timesteps[k]) if table[k, _COEF["noise_scale"]] != 0 else None for k in steps]
    # On a GPU the host draws the noise one step ahead, in parallel blocks (on a CPU the cores are ORT's).
    workers = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) if model.on_cuda else None
    ahead = ThreadPoolExecutor(max_workers=1) if model.on_cuda else None

    def draw(i):
        at = noise_at[i] if i < len(steps) else None
        return None if at is None else noise(seed, at, shape, sample_offset, pool=workers)

    try:
        x = noise(seed, XT_STEP, shape, sample_offset, pool=workers) if x_T is None else np.array(x_T, np.float32)
        on_device = step and model.on_cuda if device_loop is None else device_loop
        device = _DeviceLoop(model, x, "cuda" if model.on_cuda else "cpu") if on_device else None
        spare = np.zeros(shape, np.float32)  # a step graph needs some z (and prev_x0) even where its weight is 0
        pred_x0, pending = spare, ahead.submit(draw, 0) if ahead else None
        for index, k in enumerate(steps):
            z = pending.result() if ahead else draw(index)
            pending = ahead.submit(draw, index + 1) if ahead else None
            t, coef = np.full((shape[0],), process.timesteps[k], dtype=np.int64), table[k]
            if device is not None:
                fetched = device.step(t, coef, spare if z is None else z, callback is not None or k == 0)
                x, pred_x0 = fetched if fetched is not None else (x, pred_x0)
            elif step:
                x, pred_x0 = model.step(x, t, coef, spare if z is None else z, pred_x0)
            else:
                x, pred_x0 = update(process, x, model.eps(x, t), coef, z, clip_denoised, pred_x0)
            if callback is not None:
                callback({"index": index, "k": k, "t": int(process.timesteps[k]), "x": x, "pred_x0": pred_x0})
            if progress is not None:
                progress(index)
    finally:
        for pool in filter(None, (ahead, workers)):
            pool.shutdown(wait=True, cancel_futures=True)
    return np.clip(x, np.float32(-1.0), np.float32(1.0)) if clip_denoised else x


# ------------------------------------------------------------------------------------------ outputs
def to_uint8(x: np.ndarray) -> np.ndarray:
    """[B, C, H, W] floats in [-1, 1] -> uint8 [B, H, W, C], (x + 1) * 127.5 rounded half to even."""
    x = np.round((np.clip(x.astype(np.float32), -1.0, 1.0) + np.float32(1.0)) * np.float32(127.5))
    return x.astype(np.uint8).transpose(0, 2, 3, 1)


def grid(images: np.ndarray, min_tile: int = 32, pad: int = 2) -> np.ndarray:
    """Tile uint8 NHWC images into one near-square uint8 HWC image (fastddpm/images.py `grid`)."""
    n, h, w, c = images.shape
    scale = max(1, math.ceil(min_tile / max(h, w)))
    images, h, w, cols = images.repeat(scale, 1).repeat(scale, 2), h * scale, w * scale, math.ceil(math.sqrt(n))
    out = np.full((math.ceil(n / cols) * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return out


class _FS:
    """The file system calls tests replace: a temporary name's random part, a whole write, a rename (atomic on
    POSIX; it replaces a link at its destination, never follows it). quietly: a call whose OSError is ignored (None)."""
    token, rename = staticmethod(lambda: os.urandom(6).hex()), staticmethod(os.replace)

    @staticmethod
    def write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    @staticmethod
    def quietly(fn, *args):
        try:
            return fn(*args)
        except OSError:
            return None


def new_file(folder: str, name: str, data: bytes) -> str:
    """A new file in `folder` holding `data`, flushed (fsync), under a fresh temporary name opened O_CREAT | O_EXCL |
    O_NOFOLLOW: what is planted at a name is never followed or overwritten. Returns its path (none on an error)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for path in (os.path.join(folder, f"{TMP_PREFIX}{name}.{_FS.token()}") for _ in range(16)):
        try:
            fd = os.open(path, flags, 0o666)  # the usual mode, less the umask
        except FileExistsError:
            continue
        try:
            _FS.write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return path
    raise FileExistsError(errno.EEXIST, "no free temporary name", folder)


def publish_together(folder: str, files: dict) -> list[str]:
    """Publish {name: bytes (None: remove an old one)} in `folder` all or nothing, as fastddpm/files.py: all written to
    flushed temporaries (where a full disk fails) and every destination checked, then renamed into place with the
    files they replace kept as backups until all succeeded, put back if one fails. SampleError on failure."""
    temps, backups, done, where = {}, {}, [], folder
    try:
        for name, data in files.items():  # every destination checked, every file written before the first rename
            where = os.path.join(folder, name)
            if os.path.isdir(where) and not os.path.islink(where):
                raise SampleError(f"cannot write {where!r}: a folder is in the way; nothing was published")
            if data is not None:
                temps[name] = new_file(folder, name, data)
        for name in files:
            where = os.path.join(folder, name)
            if os.path.lexists(where):
                backups[name] = os.path.join(folder, f"{TMP_PREFIX}{name}.{_FS.token()}.old")
                _FS.rename(where, backups[name])
            if name in temps:
                _FS.rename(temps[name], where)
                del temps[name]
            done.append(name)
    except BaseException as e:
        for path in [os.path.join(folder, n) for n in done if n not in backups] + list(temps.values()):
            _FS.quietly(os.unlink, path)
        for name, old in backups.items():
            _FS.quietly(_FS.rename, old, os.path.join(folder, name))
        if isinstance(e, OSError):
            raise SampleError((f"out of space writing {where!r} ({os.strerror(e.errno)}); nothing was published: "
                               "free some space or choose another --out") if e.errno in NO_SPACE else
                              f"cannot write {where!r} ({e.strerror or e})") from None
        raise
    for old in backups.values():
        _FS.quietly(os.unlink, old)
    if (fd := _FS.quietly(os.open, folder, os.O_RDONLY)) is not None:  # the renames, to disk (best effort)
        _FS.quietly(os.fsync, fd)
        os.close(fd)
    return [os.path.join(folder, n) for n, data in files.items() if data is not None]


def save_outputs(out_dir: str, images: np.ndarray, stats: dict) -> list[str]:
    """samples.npz (arr_0), grid.png (without Pillow none, and an old one is removed) and stats.json,
    published together (publish_together); returns the paths written."""
    npz, png = io.BytesIO(), io.BytesIO()
    np.savez(npz, arr_0=images)
    try:
        from PIL import Image
        g = grid(images)
        Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g).save(png, format="PNG")
    except ImportError:
        png = None
    return publish_together(out_dir, {"samples.npz": npz.getvalue(), "grid.png": png and png.getvalue(),
                                      "stats.json": (json.dumps(stats, indent=2) + "\n").encode()})


def out_folder(path: str) -> list[str]:
    """Create --out (and its missing parents) and prove it writable, before any work; returns the folders it
    may create (removed if the run fails). SampleError: a file, link or loop in the way, a long name, no access."""
    missing, p = [], os.path.abspath(path)
    if os.path.lexists(p) and not os.path.isdir(p):
        raise SampleError(f"--out {path!r} exists and is not a folder (a file, a broken link or a symlink loop)")
    while not os.path.lexists(p) and p != os.path.dirname(p):
        missing, p = missing + [p], os.path.dirname(p)
    try:
        os.makedirs(path, exist_ok=True)
        os.unlink(new_file(path, "probe", b""))
    except OSError as e:
        for folder in missing:  # deepest first; only empty ones go
            _FS.quietly(os.rmdir, folder)
        raise SampleError(f"cannot write to output folder {path!r} ({e.strerror or e})") from None
    return missing


def load_x_T(path: str, shape) -> np.ndarray:
    """--x-T: the starting noise from an .npz whose arr_0 is float32 or float64 of `shape`, finite. The
    array header is read before the data (a hostile header cannot make it allocate); one line otherwise."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            got, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)(f)
            if tuple(got) != tuple(shape) or dtype.kind != "f" or dtype.itemsize not in (4, 8):
                raise SampleError(f"--x-T {path!r} holds {dtype} {list(got)}; this run starts from float {list(shape)}")
            x = np.frombuffer(f.read(math.prod(shape) * dtype.itemsize), dtype=dtype)
            x = x.reshape(shape, order="F" if fortran else "C")
    except SampleError:
        raise
    except Exception as e:  # noqa: BLE001 - zipfile, zlib and numpy raise many types for a corrupt file
        raise SampleError(f"--x-T {path!r} is not a readable .npz with arr_0 ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0]})") from None
    if not np.isfinite(x).all():
        raise SampleError(f"--x-T {path!r} holds NaN or infinite values")
    return x.astype(np.float32)


# ------------------------------------------------------------------------------------------ command line
def _int_in(lo: int, hi: int, what: str):
    """An argparse type: an integer in lo..hi (seeds: 0..2^32-1, the noise key's range, as fastddpm's)."""
    def parse(text: str) -> int:
        if not text.strip().lstrip("+-").isdecimal() or not lo <= int(text) <= hi:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return int(text)
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise SampleError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ort_sample.py", description="Sample a fastddpm ONNX export with numpy + onnxruntime only.")
    positive, add = _int_in(1, 2**63 - 1, "a positive integer"), p.add_argument
    add("--onnx", required=True, metavar="FILE.onnx", help="a file written by `fastddpm export`")
    add("--steps", type=positive, default=None, help="sampling steps (default: the model's T)")
    add("--batch", type=positive, default=64, help="number of samples (default 64)")
    add("--seed", type=_int_in(0, _MASK32, "a seed in 0..2^32-1"), default=0, help="noise seed (default 0)")
    add("--sample-offset", type=_int_in(0, _MASK32, "a sample index in 0..2^32-1"), default=0, help="first sample")
    add("--sampler", default="ancestral", choices=SAMPLERS)
    add("--eta", type=float, default=0.0, help="DDIM's noise scale in [0, 1] (ddim only; default 0)")
    add("--spacing", default="iddpm", choices=SPACINGS, help="which timesteps: improved-diffusion's or diffusers' rule")
    add("--variance", default=None, choices=VARIANCES_OF["ancestral"], help="default: the model's own")
    add("--x-T", dest="x_T", default=None, metavar="FILE.npz", help="start from this noise (arr_0, float [B, C, H, W])")
    add("--provider", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if onnxruntime-gpu finds one")
    add("--threads", type=_int_in(0, MAX_THREADS, f"a thread count in 0..{MAX_THREADS}"), default=0, help="0: ORT's")
    add("--out", default="samples", metavar="DIR", help="output folder (default ./samples)")
    add("--no-progress", action="store_true", help="no progress line on stderr")
    return p


def run(args) -> dict:
    """Sample as the parsed command line asks, publish the outputs, and return the stats."""
    missing = out_folder(args.out)
    try:
        model = OnnxModel(args.onnx, provider=args.provider, threads=args.threads)
        process = Process.from_full(model.betas, args.steps, args.sampler, model.diffusion["mean_type"],
                                    model.diffusion["var_type"], spacing=args.spacing, variance=args.variance,
                                    gamma=model.gamma)
        shape = (args.batch, model.channels, model.image_size, model.image_size)
        x_T = None if args.x_T is None else load_x_T(args.x_T, shape)
        show = not args.no_progress and sys.stderr.isatty()
        progress = (lambda i: print(f"\rsampling: step {i + 1}/{process.num_steps}", end="", file=sys.stderr,
                                    flush=True)) if show else None
        start = time.perf_counter()
        x = sample_loop(model, process, shape, seed=args.seed, sampler=args.sampler, eta=args.eta, x_T=x_T,
                        sample_offset=args.sample_offset, clip_denoised=model.clip_denoised,
                        progress=progress)
        seconds, images, steps = time.perf_counter() - start, to_uint8(x), process.num_steps
        if show:
            print(file=sys.stderr)
        stats = {
            "request": vars(args), "source": f"onnx {args.onnx}", "graph": model.kind, "export_dtype": model.dtype,
            "steps": steps, "sampler": args.sampler, "timesteps": process.timesteps.tolist()[::-1],
            "variance": process.var_type if args.sampler == "ancestral" or args.variance else None,
            "shape": list(images.shape), "seconds": seconds, "images_per_s": args.batch / seconds,
            "ms_per_step": 1000.0 * seconds / steps, "gflop_per_image_forward": model.gflop,
            "achieved_tflops": model.gflop * args.batch * steps / seconds / 1000.0,
            "device": f"{model.provider} on {platform.processor() or platform.machine() or 'cpu'}",
            "onnxruntime": model.ort.__version__,
        }
        written = save_outputs(args.out, images, stats)
    except BaseException:
        for folder in missing:
            _FS.quietly(os.rmdir, folder)
        raise
    print(f"{args.batch} samples, {steps} steps, {args.sampler}, {model.kind} graph ({model.dtype}) on {model.provider}"
          f": {seconds:.2f} s, {stats['images_per_s']:.2f} images/s, {stats['ms_per_step']:.1f} ms/step")
    print("wrote " + ", ".join(written))
    return stats


def main(argv=None) -> int:
    """The command line; returns the exit status. numpy is imported inside the handlers: Ctrl-C then is one line."""
    global np
    try:
        import numpy as np
        run(build_parser().parse_args(argv))
        return 0
    except (SampleError, ImportError) as e:
        print(f"ort_sample.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ort_sample.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
