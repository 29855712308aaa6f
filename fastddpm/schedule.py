"""Noise schedules and the float64 tables every other part indexes.

Notation (Ho et al. 2020, eq. 4-7; Nichol & Dhariwal 2021, sec. 2):
    beta_t                         variance of the forward step q(x_t | x_{t-1})
    alpha_t     = 1 - beta_t
    alphabar_t  = prod_{s <= t} alpha_s           q(x_t | x_0) = N(sqrt(alphabar_t) x_0, 1 - alphabar_t)
    betatilde_t = beta_t (1 - alphabar_{t-1}) / (1 - alphabar_t)       posterior variance (eq. 7)
    mu~_t(x_t, x_0) = c1_t x_0 + c2_t x_t,
        c1_t = beta_t sqrt(alphabar_{t-1}) / (1 - alphabar_t),
        c2_t = (1 - alphabar_{t-1}) sqrt(alpha_t) / (1 - alphabar_t)

Timesteps are 0-based: t in {0..T-1}; alphabar_{-1} = 1, so betatilde_0 = 0 and its log is
clipped to log(betatilde_1), as improved-diffusion does.

Everything here is computed once in float64. Backends cast these tables to their compute
dtype (and move them to their device) themselves; see `Schedule.to`.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, fields

import torch

from .errors import FastDDPMError, check_choice

SCHEDULES = ("linear", "cosine")
MAX_TIMESTEPS = 100_000  # 100x DDPM's T; a larger T is a typo, and T = 10^12 would allocate terabytes


def make_betas(name: str, T: int) -> torch.Tensor:
    """Return the float64 beta schedule `name` over `T` steps, shape [T].

    "linear": Ho et al. (2020) sec. 4, beta from 1e-4 to 0.02 at T = 1000, both ends scaled
        by 1000 / T so that any T gives a comparable process (improved-diffusion's rule).
    "cosine": Nichol & Dhariwal (2021) eq. 17, alphabar(t) = f(t) / f(0) with
        f(t) = cos(((t / T) + s) / (1 + s) * pi / 2)^2, s = 0.008, and beta capped at 0.999.
    """
    check_choice("schedule", name, SCHEDULES)
    if isinstance(T, bool) or not isinstance(T, int) or not 1 <= T <= MAX_TIMESTEPS:
        raise FastDDPMError(f"the number of diffusion steps must be an integer in [1, {MAX_TIMESTEPS}], got {T!r}")
    if name == "linear":
        if T <= 20:  # T = 20 would end at beta = 1, alphabar = 0 (see check_betas)
            raise FastDDPMError(f"the linear schedule needs T > 20 (its last beta is 20 / T), got T={T}")
        scale = 1000.0 / T
        return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)

    def alphabar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1.0 - alphabar((i + 1) / T) / alphabar(i / T), 0.999) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float64)


def check_betas(betas) -> torch.Tensor:
    """Validate a user-given beta array [T] and return it as a float64 tensor [T].

    Every beta must be finite and in (0, 1): beta_t = 1 makes alphabar_t = 0, so x_0 = x_t /
    sqrt(alphabar_t) (eps prediction) divides by zero and the sampler returns NaN. For the same
    reason alphabar_t must not underflow to 0 (thousands of large betas). And every step must add
    noise that float64 can represent: 1 - alphabar_t > 0 and sqrt(1 / alphabar_t - 1) finite and
    > 0 (betas of 1e-300 leave 1 - beta = 1 exactly, alphabar = 1, and every sampler then
    returns all-zero images); a respaced process whose beta comes out 0 is refused by the same rule.
    """
    try:
        b = torch.as_tensor(betas, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise FastDDPMError(f"the beta schedule is not an array of numbers ({e})") from None
    if b.ndim != 1:
        raise FastDDPMError(f"the beta schedule must be a 1-D array [T], not of shape {list(b.shape)}")
    if b.numel() == 0:
        raise FastDDPMError("the beta schedule is empty")
    if not torch.isfinite(b).all() or (b <= 0).any() or (b >= 1).any():
        bad = int(torch.nonzero(~(torch.isfinite(b) & (b > 0) & (b < 1)))[0])
        raise FastDDPMError(f"every beta must be finite and in (0, 1); beta[{bad}] = {b[bad].item()}")
    alphabar = torch.cumprod(1.0 - b, 0)
    if alphabar[-1] <= 0:
        first = int(torch.nonzero(alphabar <= 0)[0])
        raise FastDDPMError(f"the beta schedule drives alphabar to 0 at t={first} (float64 underflow); "
                            "x_0 cannot be recovered from x_t there")
    ratio = torch.sqrt(1.0 / alphabar - 1.0)  # sigma_t / sqrt(alphabar_t) of x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps
    bad = ~((1.0 - alphabar > 0) & torch.isfinite(ratio) & (ratio > 0))
    if bad.any():
        first = int(torch.nonzero(bad)[0])
        raise FastDDPMError(f"the beta schedule adds no noise float64 can represent at t={first} (beta[{first}] = "
                            f"{b[first].item():.3g}; 1 - alphabar = {(1.0 - alphabar[first]).item():.3g}): the "
                            "betas are too small, and sampling would return x_0 = x_t")
    return b


@dataclass(frozen=True)
class Schedule:
    """All per-timestep tables of one diffusion process, float64 tensors of shape [T]."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    log_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor  # 1 / sqrt(alphabar_t)
    sqrt_recipm1_alphas_cumprod: torch.Tensor  # sqrt(1 / alphabar_t - 1)
    posterior_variance: torch.Tensor  # betatilde_t (0 at t = 0)
    posterior_log_variance_clipped: torch.Tensor  # log betatilde_t, t = 0 uses betatilde_1
    posterior_mean_coef1: torch.Tensor  # c1_t, multiplies x_0
    posterior_mean_coef2: torch.Tensor  # c2_t, multiplies x_t
    fixedlarge_variance: torch.Tensor  # beta_t, except betatilde_1 at t = 0 (DDPM's sigma^2 = beta)

    @classmethod
    def from_betas(cls, betas) -> "Schedule":
        b = check_betas(betas)
        a = 1.0 - b
        ab = torch.cumprod(a, 0)
        ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
        post_var = b * (1.0 - ab_prev) / (1.0 - ab)
        # betatilde_0 = 0: its log is clipped to the next entry (a single step process keeps 0's log
        # finite by falling back to beta_0).
        first = post_var[1] if len(b) > 1 else b[0]
        post_log = torch.log(torch.cat([first.reshape(1), post_var[1:]]))
        large = torch.cat([first.reshape(1), b[1:]])
        return cls(
            betas=b,
            alphas=a,
            alphas_cumprod=ab,
            alphas_cumprod_prev=ab_prev,
            sqrt_alphas_cumprod=ab.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - ab).sqrt(),
            log_one_minus_alphas_cumprod=torch.log1p(-ab),
            sqrt_recip_alphas_cumprod=ab.rsqrt(),
            sqrt_recipm1_alphas_cumprod=(1.0 / ab - 1.0).sqrt(),
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_log,
            posterior_mean_coef1=b * ab_prev.sqrt() / (1.0 - ab),
            posterior_mean_coef2=(1.0 - ab_prev) * a.sqrt() / (1.0 - ab),
            fixedlarge_variance=large,
        )

    @property
    def num_steps(self) -> int:
        return len(self.betas)

    def to(self, device=None, dtype=None) -> "Schedule":
        """The same tables cast to `dtype` on `device` (a backend's copy; float64 stays canonical)."""
        return Schedule(**{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)})


SPACINGS = ("iddpm", "linspace", "leading", "trailing")  # `fastddpm sample --spacing`
DIFFUSERS_SPACINGS = ("linspace", "leading", "trailing")  # diffusers' `timestep_spacing`
# Samplers whose last step jumps straight to x_0 (sigma = 0) from the last listed timestep, as
# diffusers' DPMSolverMultistepScheduler does with final_sigmas_type="zero": with linspace and
# leading spacing it takes N of N + 1 points, dropping the cleanest (`diffusers_timesteps`).
SOLVER_SAMPLERS = ("dpm++2m", "dpm++2m-sde")


def diffusers_timesteps(num_timesteps: int, spacing: str, n: int, *, solver: bool = False) -> list[int]:
    """The n timesteps diffusers' schedulers visit with `timestep_spacing=spacing`, ascending.

    Exactly diffusers' `set_timesteps` (steps_offset 0), reproduced with numpy's own rounding:
      solver=False (DDPMScheduler, DDIMScheduler, and most others), T = num_timesteps:
        linspace  round(linspace(0, T - 1, n))
        leading   arange(n) * (T // n)
        trailing  round(arange(T, 0, -T / n)) - 1
      solver=True (DPMSolverMultistepScheduler, whose last step goes to sigma = 0):
        linspace  round(linspace(0, T - 1, n + 1)) without its first point (t = 0)
        leading   arange(n + 1) * (T // (n + 1)) without its first point
        trailing  as above.
    One quirk is not copied: for some n (61, 103, ... at T = 1000) numpy's float `arange` in the
    trailing rule yields n + 1 values, the last -1 (an invalid timestep diffusers then indexes as
    alphabar[-1]); the n valid ones are kept.
    FastDDPMError when n is out of range (1..T, or 1..T - 1 for the solver's linspace / leading).
    """
    import numpy as np

    check_choice("spacing", spacing, DIFFUSERS_SPACINGS)
    T = num_timesteps
    most = T - 1 if solver and spacing != "trailing" else T
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= most:
        raise FastDDPMError(f"{spacing} spacing takes 1 to {most} steps of T={T}, got {n!r}")
    extra = 1 if solver else 0
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n + extra).round()
    elif spacing == "leading":
        t = np.arange(0, n + extra) * (T // (n + extra))
    else:
        t = np.round(np.arange(T, 0, -T / n))[:n] - 1
        extra = 0
    kept = sorted(int(v) for v in t)[extra:]
    if len(set(kept)) != n or kept[0] < 0 or kept[-1] > T - 1:  # cannot happen for the ranges above
        raise FastDDPMError(f"{spacing} spacing of {n} steps over T={T} does not give {n} distinct timesteps")
    return kept


def space_timesteps(num_timesteps: int, spec: str) -> list[int]:
    """Which of `num_timesteps` original steps a respaced process keeps, ascending.

    As improved-diffusion's `respace.space_timesteps`, so that step counts compare:
      "50"        50 evenly spaced steps (first and last included);
      "10,20,30"  T split into 3 near-equal sections (the first T mod 3 one step longer),
                  keeping 10, 20 and 30 evenly spaced steps in each;
      "ddim50"    the integer stride that gives exactly 50 steps starting at t = 0;
    and diffusers' `timestep_spacing` rules of DDPMScheduler / DDIMScheduler
    (`diffusers_timesteps`): "linspace50", "leading50", "trailing50".
    """
    spec = str(spec).strip()
    for spacing in DIFFUSERS_SPACINGS:
        if spec.startswith(spacing):
            count = spec[len(spacing):]
            if not count.isdecimal():
                raise FastDDPMError(f"bad respacing {spec!r}: expected '{spacing}N' with N a positive integer")
            return diffusers_timesteps(num_timesteps, spacing, int(count))
    if spec.startswith("ddim"):
        try:
            want = int(spec[len("ddim"):])
        except ValueError:
            raise FastDDPMError(f"bad respacing {spec!r}: expected 'ddimN' with N an integer") from None
        if not 1 <= want <= num_timesteps:
            raise FastDDPMError(f"bad respacing {spec!r}: the step count must be in 1..T={num_timesteps}")
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == want:
                return list(range(0, num_timesteps, stride))
        raise FastDDPMError(
            f"cannot keep exactly {want} of {num_timesteps} steps with an integer stride; "
            f"use '{want}' for evenly spaced steps instead"
        )
    try:
        counts = [int(c) for c in spec.split(",")]
    except ValueError:
        raise FastDDPMError(f"bad respacing {spec!r}: expected 'N', 'N1,N2,...', 'ddimN', 'linspaceN', "
                            "'leadingN' or 'trailingN'") from None
    if any(c < 1 for c in counts):
        raise FastDDPMError(f"bad respacing {spec!r}: every step count must be positive")
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise FastDDPMError(
                f"cannot keep {count} steps of a section of {size} (respacing {spec!r} over T={num_timesteps})"
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return sorted(set(kept))


def explicit_timesteps(num_timesteps: int, timesteps) -> list[int]:
    """A user's list of timesteps to visit, given in walking order (strictly decreasing, as
    diffusers' `set_timesteps(timesteps=...)` takes them), checked and returned ascending."""
    try:
        values = [operator.index(v) for v in (timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps)]
    except TypeError:
        raise FastDDPMError(f"explicit timesteps must be a sequence of integers, got {timesteps!r:.80}") from None
    if not values:
        raise FastDDPMError("explicit timesteps: the list is empty")
    bad = [v for v in values if not 0 <= v < num_timesteps]
    if bad:
        raise FastDDPMError(f"explicit timesteps must lie in 0..{num_timesteps - 1} (T={num_timesteps}); got {bad[0]}")
    if any(a <= b for a, b in zip(values, values[1:])):
        raise FastDDPMError("explicit timesteps must be strictly decreasing (the order they are visited in), "
                            f"got {values[:8]}{' ...' if len(values) > 8 else ''}")
    return values[::-1]


def sampling_timesteps(num_timesteps: int, steps: int | None, sampler: str = "ancestral",
                       spacing: str = "iddpm") -> list[int]:
    """The original timesteps a run of `steps` steps visits, ascending (what `fastddpm sample` uses).

    None or T: all of them. spacing "iddpm" (the default): ancestral and the solvers keep `steps`
    evenly spaced steps ("N"); DDIM uses the integer stride from t = 0 ("ddimN") when one gives
    exactly N steps, else "N". "linspace" / "leading" / "trailing": diffusers' rule of the
    scheduler the sampler corresponds to (`diffusers_timesteps`): DDPMScheduler and DDIMScheduler
    for ancestral and ddim, DPMSolverMultistepScheduler (solver=True) for dpm++2m and dpm++2m-sde.
    """
    check_choice("spacing", spacing, SPACINGS)
    T = num_timesteps
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T):
        raise FastDDPMError(f"--steps must be between 1 and the model's T = {T}, got {steps}")
    if spacing != "iddpm":
        return diffusers_timesteps(T, spacing, T if steps is None else steps, solver=sampler in SOLVER_SAMPLERS)
    if steps is None or steps == T:
        return list(range(T))
    if sampler == "ddim":
        try:
            return space_timesteps(T, f"ddim{steps}")
        except FastDDPMError:
            pass
    return space_timesteps(T, str(steps))


def respaced_betas(alphas_cumprod: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """Betas of the process that visits only the `kept` steps (Nichol & Dhariwal 2021, sec. 4).

    beta'_k = 1 - alphabar_{t_k} / alphabar_{t_{k-1}}, so the kept steps' alphabar is unchanged.
    """
    out, last = [], 1.0
    for t in kept:
        ab = float(alphas_cumprod[t])
        out.append(1.0 - ab / last)
        last = ab
    return torch.tensor(out, dtype=torch.float64)
