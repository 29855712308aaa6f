"""Fused GroupNorm (+ time-embedding add) (+ SiLU): the torch reference twin.

    y[n, c, ...] = act( (x[n, c, ...] + emb[n, c] - mu[n, g]) / sqrt(var[n, g] + eps) * gamma[c] + beta[c] )

with g = c // (C / G) the group of channel c, mu and var the mean and (biased) variance of
x + emb over the group's channels and all spatial positions, and act = SiLU or the identity.

The embedding is added *before* the normalisation: that is where the DDPM residual block puts
it (h = conv1(...) + dense(temb); h = SiLU(GroupNorm(h))), so a converted DDPM or diffusers
checkpoint gives the same output. The Triton kernels (forward and backward) live beside this
twin and are compared with it in tests/kernels/.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
