"""GaussianDiffusion: the forward process, the reverse-process parameterisations, the losses.

Ho, Jain & Abbeel (2020) "Denoising Diffusion Probabilistic Models" (DDPM) and
Nichol & Dhariwal (2021) "Improved Denoising Diffusion Probabilistic Models" (IDDPM).

Shapes: x0, xt, noise are [B, ...] (images: [B, C, H, W]); t is an int64 tensor [B] of step
indices of *this* process. For a full process they are the original timesteps 0..T-1; for a
respaced one (see `respace`) they index the kept steps, and the model is always called with
the original timestep `timesteps[t]`, as improved-diffusion does.

`model` is any callable (x_t [B, C, ...], t [B] int64 original timesteps) -> output, with C
output channels, or 2C for learned variances (mean part first, then the variance part).

Arithmetic runs in the dtype of the inputs: the float64 tables are cast to it (and moved to
its device) once and cached, so float64 inputs give a float64 reference.
"""
from __future__ import annotations

import math

import torch

from .analytic import check_gamma
from .errors import FastDDPMError, check_choice
from .schedule import Schedule, explicit_timesteps, respaced_betas, space_timesteps

MEAN_TYPES = ("eps", "x0", "xprev")
# What a model is trained with (and a checkpoint stores): fixed beta_t or betatilde_t, or learned.
MODEL_VAR_TYPES = ("fixedlarge", "fixedsmall", "learned", "learned_range")
# ... plus Analytic-DPM's optimal variance (Bao et al. 2022), for sampling and evaluation only.
VAR_TYPES = MODEL_VAR_TYPES + ("analytic",)
LOSS_TYPES = ("simple", "kl", "hybrid")
LEARNED_VAR_TYPES = ("learned", "learned_range")


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: [B, ...] -> [B]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) ~ 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the approximation DDPM's code uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """log p(x) of 8-bit data under N(means, e^(2 log_scales)) discretised to 256 bins (DDPM eq. 13).

    x is uint8 data scaled to [-1, 1]; bin k covers [x - 1/255, x + 1/255], the two edge bins
    extend to -inf and +inf. Elementwise, in nats.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def to_level(x: torch.Tensor, levels: int) -> torch.Tensor:
    """The nearest of `levels` grey levels evenly spaced on [-1, 1] (0..255): int64 indices 0..levels-1.

    For the digits (0..16 stored as rint(v * 255 / 16)) levels = 17 gives back v exactly."""
    return torch.round((x.double().clamp(-1.0, 1.0) + 1.0) * (0.5 * (levels - 1))).long()


class GaussianDiffusion:
    """A diffusion process over `betas` (float64 [K]) and the reverse process's parameterisation.

    mean_type  what the model predicts: "eps" (the noise, DDPM eq. 11), "x0", or "xprev" (the
               posterior mean mu~ directly).
    var_type   the reverse variance Sigma_t: "fixedlarge" (beta_t), "fixedsmall" (betatilde_t),
               "learned" (the model outputs log Sigma), "learned_range" (the model outputs v in
               [-1, 1]; log Sigma = f log beta_t + (1 - f) log betatilde_t, f = (v + 1) / 2,
               IDDPM eq. 15), or "analytic" (Analytic-DPM's optimal variance, Bao et al. 2022,
               from the calibration table `gamma`; sampling and evaluation only).
    learn_sigma  the model outputs 2C channels (default: var_type is learned); such a model can
               still be sampled with a fixed or analytic variance (`with_variance`).
    gamma      Analytic-DPM's Gamma_t = E||eps_theta(x_t, t)||^2 / d, float64 [T] (`fastddpm calibrate`).
    loss_type  "simple" (MSE on the mean parameterisation's target, DDPM eq. 14), "kl" (the
               variational bound L_vlb, DDPM eq. 5), or "hybrid" (L_simple + lambda L_vlb, IDDPM
               eq. 16, lambda = 0.001).
    """

    def __init__(self, betas, mean_type: str = "eps", var_type: str = "fixedlarge", loss_type: str = "simple",
                 timesteps=None, num_timesteps: int | None = None, *, learn_sigma: bool | None = None,
                 gamma=None, trained_var_type: str | None = None):
        check_choice("mean_type", mean_type, MEAN_TYPES)
        check_choice("var_type", var_type, VAR_TYPES)
        check_choice("loss_type", loss_type, LOSS_TYPES)
        self.schedule = Schedule.from_betas(betas)
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type
        steps = self.schedule.num_steps
        # The original timestep of each step of this process (identity unless respaced).
        self.timesteps = torch.arange(steps) if timesteps is None else torch.as_tensor(timesteps, dtype=torch.int64)
        # T: the length of the original process the model was trained on.
        self.num_timesteps = steps if num_timesteps is None else int(num_timesteps)
        # Whether the model outputs 2C channels (mean part, then variance part): a model trained
        # with learned variances keeps them even when sampled with another var_type.
        self.learn_sigma = var_type in LEARNED_VAR_TYPES if learn_sigma is None else bool(learn_sigma)
        if var_type in LEARNED_VAR_TYPES and not self.learn_sigma:
            raise FastDDPMError(f"var_type {var_type!r} needs a model that outputs its variance (learn_sigma)")
        # The variance the model was trained with (what checkpoints store); var_type may differ.
        self.trained_var_type = trained_var_type or (var_type if var_type in MODEL_VAR_TYPES else "fixedlarge")
        check_choice("trained_var_type", self.trained_var_type, MODEL_VAR_TYPES)
        # Analytic-DPM's Gamma_t = E||eps_theta(x_t, t)||^2 / d per ORIGINAL timestep, float64 [T], or None.
        self.gamma = None if gamma is None else check_gamma(gamma, self.num_timesteps)
        if var_type == "analytic" and self.gamma is None:
            raise FastDDPMError("var_type 'analytic' needs the model's calibration table Gamma_t; make a calibrated "
                                "checkpoint with `fastddpm calibrate`")
        self._tables: dict = {}

    # ----------------------------------------------------------------------------- structure
    @property
    def num_steps(self) -> int:
        """How many steps this process has (T unless respaced)."""
        return self.schedule.num_steps

    @property
    def learned_variance(self) -> bool:
        return self.var_type in LEARNED_VAR_TYPES

    def config(self) -> dict:
        """The settings that, with the betas, rebuild the trained process (saved in checkpoints).

        var_type is the one the model was trained with (`trained_var_type`): a process viewed
        with another variance (`with_variance`) saves as the model it came from."""
        return {"mean_type": self.mean_type, "var_type": self.trained_var_type, "loss_type": self.loss_type,
                "num_timesteps": self.num_timesteps}

    def _like(self, betas, timesteps, var_type: str) -> "GaussianDiffusion":
        return GaussianDiffusion(betas, self.mean_type, var_type, self.loss_type, timesteps=timesteps,
                                 num_timesteps=self.num_timesteps, learn_sigma=self.learn_sigma, gamma=self.gamma,
                                 trained_var_type=self.trained_var_type)

    def respace(self, spec) -> "GaussianDiffusion":
        """The process that visits only some of the steps (IDDPM sec. 4).

        spec: "50", "10,20,30", "ddim50", diffusers' "linspace50" / "leading50" / "trailing50"
        (see `schedule.space_timesteps`), or an explicit list of original timesteps in the order
        they are visited, strictly decreasing (`[999, 800, 500, 200, 0]`).
        The kept steps keep their alphabar; betas are recomputed from it, so fixed, learned and
        analytic variances follow the shorter process. The model is still called with original
        timesteps, and `num_timesteps` stays T.
        """
        if self.num_steps != self.num_timesteps:
            raise FastDDPMError("respace a full process, not one that is already respaced")
        if isinstance(spec, str):
            kept = space_timesteps(self.num_timesteps, spec)
        else:
            kept = explicit_timesteps(self.num_timesteps, spec)
        betas = respaced_betas(self.schedule.alphas_cumprod, kept)
        return self._like(betas, kept, self.var_type)

    def prefix(self, n: int) -> "GaussianDiffusion":
        """The process made of the first n steps this one walks (its n noisiest), the last of
        them jumping to x_0: what `backend="auto"` runs to check a backend (fastddpm.auto).
        Its steps keep their alphabar and original timesteps; n >= num_steps gives an equal process."""
        K = self.num_steps
        n = max(1, min(int(n), K))
        kept = list(range(K - n, K))
        return GaussianDiffusion(respaced_betas(self.schedule.alphas_cumprod, kept), self.mean_type, self.var_type,
                                 self.loss_type, timesteps=self.timesteps[K - n:], num_timesteps=self.num_timesteps,
                                 learn_sigma=self.learn_sigma, gamma=self.gamma, trained_var_type=self.trained_var_type)

    def with_gamma(self, gamma) -> "GaussianDiffusion":
        """The same process carrying the Analytic-DPM calibration table gamma (float64 [T], per
        original timestep; `fastddpm.analytic.estimate_gamma`)."""
        return GaussianDiffusion(self.schedule.betas, self.mean_type, self.var_type, self.loss_type,
                                 timesteps=self.timesteps, num_timesteps=self.num_timesteps,
                                 learn_sigma=self.learn_sigma, gamma=gamma, trained_var_type=self.trained_var_type)

    def with_variance(self, var_type: str) -> "GaussianDiffusion":
        """The same process with another reverse variance (`fastddpm sample --variance`).

        "fixedlarge" (beta_t), "fixedsmall" (betatilde_t), "learned" (the model's own learned
        variance; FastDDPMError for a model trained with fixed ones) or "analytic" (Analytic-DPM's
        optimal variance from the calibration table `gamma`; FastDDPMError without one). The model
        output keeps its channels: a learned-variance model sampled with a fixed or analytic
        variance has its variance channels ignored.
        """
        check_choice("variance", var_type, ("fixedlarge", "fixedsmall", "learned", "analytic"))
        if var_type == "learned":
            if self.trained_var_type not in LEARNED_VAR_TYPES:
                raise FastDDPMError(f"--variance learned needs a model trained with learned variances; this one was "
                                    f"trained with {self.trained_var_type!r} (use fixedlarge, fixedsmall or analytic)")
            var_type = self.trained_var_type
        if var_type == "analytic" and self.gamma is None:
            raise FastDDPMError("--variance analytic needs Analytic-DPM's table Gamma_t, which this model does not "
                                "carry; make a calibrated copy with `fastddpm calibrate --checkpoint C --data D "
                                "--out C2.safetensors`")
        return self._like(self.schedule.betas, self.timesteps, var_type)

    def tables(self, device, dtype) -> dict:
        """The schedule tables cast to `dtype` on `device`, plus the timestep map; cached."""
        key = (torch.device(device), dtype)
        if key not in self._tables:
            s = self.schedule.to(device=device, dtype=dtype)
            tables = {name: getattr(s, name) for name in s.__dataclass_fields__}
            tables["log_betas"] = torch.log(self.schedule.betas).to(device=device, dtype=dtype)
            tables["log_fixedlarge_variance"] = torch.log(self.schedule.fixedlarge_variance).to(device=device, dtype=dtype)
            tables["timesteps"] = self.timesteps.to(device)
            if self.gamma is not None:
                tables["log_analytic_variance"] = torch.log(self.analytic_variance()).to(device=device, dtype=dtype)
            self._tables[key] = tables
        return self._tables[key]

    def analytic_variance(self, sampler: str = "ancestral", eta: float = 0.0) -> torch.Tensor:
        """Analytic-DPM's optimal reverse variance sigma*_k^2 of every step of this process, float64 [K].

        For the ancestral sampler (Analytic-DDPM) and for DDIM with noise scale eta (Analytic-DDIM);
        see `fastddpm.analytic.optimal_variance`. Needs the calibration table `gamma`.
        """
        from .analytic import optimal_variance

        if self.gamma is None:
            raise FastDDPMError("this process has no Analytic-DPM calibration table; run `fastddpm calibrate`")
        return optimal_variance(self.schedule, self.gamma[self.timesteps], sampler, eta)

    def _coef(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """tables[name][t] shaped [B, 1, 1, ...] to broadcast against `like` ([B, ...])."""
        table = self.tables(like.device, like.dtype)[name]
        return table[t].reshape((-1,) + (1,) * (like.ndim - 1))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The original timesteps to call the model with for step indices t."""
        return self.tables(t.device, torch.float32)["timesteps"][t]

    # ----------------------------------------------------------------------------- q
    def q_mean_variance(self, x0, t):
        """q(x_t | x_0) = N(sqrt(alphabar_t) x_0, (1 - alphabar_t) I) (DDPM eq. 4): (mean, variance, log_variance)."""
        mean = self._coef("sqrt_alphas_cumprod", t, x0) * x0
        var = self._coef("alphas_cumprod", t, x0)
        return mean, (1.0 - var).expand_as(x0), self._coef("log_one_minus_alphas_cumprod", t, x0).expand_as(x0)

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps (DDPM eq. 4). All [B, ...]; t [B]."""
        return self._coef("sqrt_alphas_cumprod", t, x0) * x0 + self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0, xt, t):
        """q(x_{t-1} | x_t, x_0) = N(mu~_t, betatilde_t I) (DDPM eq. 6-7): (mean, variance, log_variance)."""
        mean = self._coef("posterior_mean_coef1", t, xt) * x0 + self._coef("posterior_mean_coef2", t, xt) * xt
        var = self._coef("posterior_variance", t, xt).expand_as(xt)
        log_var = self._coef("posterior_log_variance_clipped", t, xt).expand_as(xt)
        return mean, var, log_var

    def predict_x0_from_eps(self, xt, t, eps):
        """x_0 = (x_t - sqrt(1 - alphabar_t) eps) / sqrt(alphabar_t)  (DDPM eq. 4 solved for x_0)."""
        return self._coef("sqrt_recip_alphas_cumprod", t, xt) * xt - self._coef("sqrt_recipm1_alphas_cumprod", t, xt) * eps

    def predict_eps_from_x0(self, xt, t, x0):
        """eps = (x_t / sqrt(alphabar_t) - x_0) / sqrt(1 / alphabar_t - 1)."""
        return (self._coef("sqrt_recip_alphas_cumprod", t, xt) * xt - x0) / self._coef("sqrt_recipm1_alphas_cumprod", t, xt)

    def predict_x0_from_xprev(self, xt, t, xprev):
        """x_0 from the posterior mean: mu~ = c1 x_0 + c2 x_t  =>  x_0 = (mu~ - c2 x_t) / c1."""
        return (xprev - self._coef("posterior_mean_coef2", t, xt) * xt) / self._coef("posterior_mean_coef1", t, xt)

    # ----------------------------------------------------------------------------- p
    def split_output(self, output: torch.Tensor, channels: int):
        """(mean part, variance part or None) of a model output with `channels` data channels."""
        if self.learn_sigma:
            if output.shape[1] != 2 * channels:
                raise FastDDPMError(
                    f"a learned-variance model needs {2 * channels} output channels (mean and variance), "
                    f"got {output.shape[1]}")
            return output[:, :channels], output[:, channels:]
        if output.shape[1] != channels:
            raise FastDDPMError(f"the model returned {output.shape[1]} channels, expected {channels}")
        return output, None

    def variance(self, var_part, t, like):
        """(variance, log_variance) of p(x_{t-1} | x_t) for this var_type; var_part from the model or None."""
        if self.var_type == "learned":
            log_var = var_part
        elif self.var_type == "learned_range":
            frac = (var_part + 1.0) / 2.0
            log_var = frac * self._coef("log_betas", t, like) + (1.0 - frac) * self._coef(
                "posterior_log_variance_clipped", t, like)
        elif self.var_type == "fixedlarge":
            log_var = self._coef("log_fixedlarge_variance", t, like).expand_as(like)
        elif self.var_type == "analytic":
            log_var = self._coef("log_analytic_variance", t, like).expand_as(like)
        else:
            log_var = self._coef("posterior_log_variance_clipped", t, like).expand_as(like)
        var = self._coef("posterior_variance", t, like).expand_as(like) if self.var_type == "fixedsmall" else torch.exp(log_var)
        return var, log_var

    def p_mean_variance(self, model, xt, t, clip_denoised: bool = True, model_output=None) -> dict:
        """p(x_{t-1} | x_t) = N(mu_theta(x_t, t), Sigma_theta(x_t, t)) (DDPM eq. 1, IDDPM eq. 15).

        xt [B, C, ...], t [B] step indices. Returns a dict of [B, C, ...] tensors: mean, variance,
        log_variance, pred_x0 (clipped to [-1, 1] when clip_denoised) and eps (the noise implied
        by pred_x0). `model_output` skips the model call when the output is already known.
        """
        out = model(xt, self.model_timesteps(t)) if model_output is None else model_output
        mean_part, var_part = self.split_output(out, xt.shape[1])
        var, log_var = self.variance(var_part, t, xt)
        if self.mean_type == "eps":
            pred_x0 = self.predict_x0_from_eps(xt, t, mean_part)
        elif self.mean_type == "x0":
            pred_x0 = mean_part
        else:
            pred_x0 = self.predict_x0_from_xprev(xt, t, mean_part)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        if self.mean_type == "xprev" and not clip_denoised:
            mean = mean_part
        else:
            mean, _, _ = self.q_posterior(pred_x0, xt, t)
        eps = mean_part if self.mean_type == "eps" and not clip_denoised else self.predict_eps_from_x0(xt, t, pred_x0)
        return {"mean": mean, "variance": var, "log_variance": log_var, "pred_x0": pred_x0, "eps": eps,
                "model_output": out}

    # ----------------------------------------------------------------------------- losses
    def vb_terms_bpd(self, model, x0, xt, t, clip_denoised: bool = True, model_output=None) -> dict:
        """L_{t} of the variational bound for step indices t, in bits per dimension, [B].

        L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 (DDPM eq. 5), and the
        discretised decoder's -log p(x_0 | x_1) at t = 0 (DDPM eq. 13). Also returns pred_x0.
        """
        true_mean, _, true_log_var = self.q_posterior(x0, xt, t)
        out = self.p_mean_variance(model, xt, t, clip_denoised=clip_denoised, model_output=model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])) / math.log(2.0)
        return {"output": torch.where(t == 0, nll, kl), "pred_x0": out["pred_x0"], "eps": out["eps"]}

    def training_losses(self, model, x0, t, noise=None) -> dict:
        """Per-sample training losses at step indices t: dict(loss, mse, vb), each [B].

        mse  mean over dimensions of (target - prediction)^2, the target being eps, x0 or the
             posterior mean per mean_type (L_simple, DDPM eq. 14).
        vb   the step's variational-bound term L_t in bits/dim, unscaled, computed with
             clip_denoised=False; for the simple and hybrid losses the mean part of the output is
             detached inside it, so vb trains only the variance (IDDPM sec. 3.1). Zero when the
             variance is fixed and the loss is simple.
        loss simple: mse;  kl: vb * T;  hybrid: mse + vb * T / 1000 (L_vlb = T E_t[L_t], so this is
             lambda L_vlb with lambda = 0.001 at T = 1000 and the same weight per step at any T,
             as improved-diffusion's rescaled hybrid loss).
        """
        if self.var_type != self.trained_var_type:
            raise FastDDPMError(f"training uses the variance the model is trained with ({self.trained_var_type!r}), "
                                f"not {self.var_type!r}: `with_variance` is for sampling and evaluation")
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        out = model(xt, self.model_timesteps(t))
        mean_part, var_part = self.split_output(out, x0.shape[1])
        T = self.num_timesteps
        terms = {}
        if self.loss_type == "kl" or self.learned_variance or self.loss_type == "hybrid":
            frozen = out if self.loss_type == "kl" else torch.cat(
                [mean_part.detach()] + ([var_part] if var_part is not None else []), dim=1)
            terms["vb"] = self.vb_terms_bpd(None, x0, xt, t, clip_denoised=False, model_output=frozen)["output"]
        else:
            terms["vb"] = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        if self.mean_type == "eps":
            target = noise
        elif self.mean_type == "x0":
            target = x0
        else:
            target = self.q_posterior(x0, xt, t)[0]
        terms["mse"] = mean_flat((target - mean_part) ** 2)
        if self.loss_type == "simple":
            terms["loss"] = terms["mse"]
        elif self.loss_type == "kl":
            terms["loss"] = terms["vb"] * T
        else:
            terms["loss"] = terms["mse"] + terms["vb"] * T / 1000.0
        return terms

    def prior_bpd(self, x0) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) in bits/dim, [B]: the bound's L_T (DDPM eq. 5)."""
        t = torch.full((x0.shape[0],), self.num_steps - 1, dtype=torch.int64, device=x0.device)
        mean, _, log_var = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean))) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(self, model, x0, clip_denoised: bool = True, progress: bool = False,
                      levels: int | None = None) -> dict:
        """The whole variational bound of x0 [B, ...] in bits/dim, term by term.

        Returns vb, mse (eps-prediction error) and xstart_mse (x0 error), each [B, K] in step
        order 0..K-1, prior_bpd [B], and total_bpd [B] = sum(vb) + prior_bpd. Noise is drawn
        with torch's generator (seed it for a repeatable estimate). With `levels` (the data's
        number of grey levels, evenly spaced on 0..255: 17 for the digits, 256 for 8-bit images)
        also level_accuracy [B, K]: the share of pixels at which the x0 prediction, rounded to
        the nearest level, is the image's own level (1.0: the image is recovered exactly).
        """
        from tqdm.auto import tqdm

        B, K = x0.shape[0], self.num_steps
        vb, mse, xmse = (torch.zeros(B, K, dtype=x0.dtype, device=x0.device) for _ in range(3))
        if levels is not None:
            if levels < 2:
                raise ValueError(f"levels must be at least 2, got {levels}")
            acc = torch.zeros(B, K, dtype=torch.float64, device=x0.device)
            level_of_x0 = to_level(x0, levels)
        for k in tqdm(range(K - 1, -1, -1), disable=not progress, desc="bpd", leave=False):
            t = torch.full((B,), k, dtype=torch.int64, device=x0.device)
            noise = torch.randn_like(x0)
            xt = self.q_sample(x0, t, noise)
            out = self.vb_terms_bpd(model, x0, xt, t, clip_denoised=clip_denoised)
            vb[:, k] = out["output"]
            xmse[:, k] = mean_flat((out["pred_x0"] - x0) ** 2)
            mse[:, k] = mean_flat((out["eps"] - noise) ** 2)
            if levels is not None:
                acc[:, k] = mean_flat((to_level(out["pred_x0"], levels) == level_of_x0).double())
        prior = self.prior_bpd(x0)
        result = {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb, "mse": mse, "xstart_mse": xmse}
        if levels is not None:
            result["level_accuracy"] = acc
        return result
