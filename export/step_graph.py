"""The modules that are traced into ONNX: the eps-model alone, or the whole reverse step.

    EpsGraph:   x [B, C, H, W] float32, t [B] int64  ->  out [B, C_out, H, W] float32
    StepGraph:  x, t, coef [14] float32, z, prev_x0 [B, C, H, W] float32  ->  x_prev, pred_x0 [B, C, H, W]

Both take and give float32 whatever the export dtype (an fp16 export casts at its edges), so
a host keeps one float32 state. StepGraph computes `ort_sample.update` (the numpy twin of
fastddpm.sampling.reference_step) with the per-step coefficient vector laid out as
`ort_sample.COEF_NAMES`:

    x0      = sqrt_recip_ab x - sqrt_recipm1_ab eps     (or the model's x0, or from x_prev: (mu - coef2 x) / coef1)
    x0      = clip(x0, -1, 1)                            (when exported with clip_denoised)
    mean    = coef1 x0 + coef2 x                         (DDPM eq. 7)
    eps'    = (sqrt_recip_ab x - x0) / sqrt_recipm1_ab
    log_var = use_learned * learned + (1 - use_learned) * log_variance   (learned variances, IDDPM eq. 15)
    x_prev  = w_mean mean + w_x0 x0 + w_eps eps' + w_x x + w_prev prev_x0 + noise_scale exp(log_var / 2) z

so the same graph runs ancestral (DDPM Algorithm 2), DDIM (Song et al. 2021, eq. 12), Analytic-DPM
and DPM-Solver++(2M) / SDE-DPM-Solver++(2M) steps (prev_x0: the previous step's pred_x0; zeros where
w_prev is 0) of any spacing: the host only feeds a different coefficient vector. (Export format
version 2; version 1 had 12 coefficients and no prev_x0.)
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import ort_sample

COEF = {name: i for i, name in enumerate(ort_sample.COEF_NAMES)}


class EpsGraph(nn.Module):
    """model(x.to(dtype), t).float(): the exported eps-model with float32 edges."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype), t).float()


class StepGraph(nn.Module):
    """The eps-model plus the reverse-step update, driven by the coefficient vector (module docstring)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, mean_type: str, var_type: str, clip_denoised: bool):
        super().__init__()
        self.eps_model = EpsGraph(model, dtype)
        self.mean_type, self.var_type, self.clip_denoised = mean_type, var_type, clip_denoised
        self.learned = var_type in ort_sample.LEARNED_VAR_TYPES

    def forward(self, x: torch.Tensor, t: torch.Tensor, coef: torch.Tensor, z: torch.Tensor, prev_x0: torch.Tensor):
        c = {name: coef[i] for name, i in COEF.items()}
        C = x.shape[1]
        out = self.eps_model(x, t)
        mean_part = out[:, :C]
        if self.mean_type == "eps":
            x0 = c["sqrt_recip_ab"] * x - c["sqrt_recipm1_ab"] * mean_part
        elif self.mean_type == "x0":
            x0 = mean_part
        else:
            x0 = (mean_part - c["coef2"] * x) / c["coef1"]
        if self.clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
        if self.mean_type == "xprev" and not self.clip_denoised:
            mean = mean_part
        else:
            mean = c["coef1"] * x0 + c["coef2"] * x
        if self.mean_type == "eps" and not self.clip_denoised:
            eps = mean_part
        else:
            eps = (c["sqrt_recip_ab"] * x - x0) / c["sqrt_recipm1_ab"]
        if self.learned:
            v = out[:, C:]
            if self.var_type == "learned_range":
                frac = (v + 1.0) / 2.0
                v = frac * c["log_beta"] + (1.0 - frac) * c["posterior_log_variance"]
            log_var = c["use_learned"] * v + (1.0 - c["use_learned"]) * c["log_variance"]
        else:
            log_var = c["log_variance"]
        sigma = c["noise_scale"] * torch.exp(0.5 * log_var)
        x_prev = (c["w_mean"] * mean + c["w_x0"] * x0 + c["w_eps"] * eps + c["w_x"] * x + c["w_prev"] * prev_x0
                  + sigma * z)
        return x_prev, x0
