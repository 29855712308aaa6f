"""Shared test helpers (import as `from helpers import ...`; tests/ is on sys.path under pytest)."""
import torch

from fastddpm.unet import GroupNormAct, UNet


def randomized_unet(preset: str = "tiny", seed: int = 0, **overrides) -> UNet:
    """A U-Net whose every parameter is random, so outputs are non-trivial.

    DDPM starts the last conv of each block and of the model at zero, which would make an
    untrained model output exactly 0; tests comparing backends need real signal everywhere.
    Convolutions and linear layers get PyTorch's default init, norms a random affine.
    """
    torch.manual_seed(seed)
    model = UNet.from_preset(preset, **overrides)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.reset_parameters()
        elif isinstance(m, GroupNormAct):
            with torch.no_grad():
                m.weight.copy_(1.0 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def gaussian_eps_model(full, mu, std):
    """The optimal eps(x_t, t) for data N(mu, diag(std^2)) over channels ([B, C, 1, 1] states);
    t is the ORIGINAL timestep of the full process `full`.

    x_t | t ~ N(sqrt(ab) mu, ab s^2 + 1 - ab), so E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab).
    """
    ab_table = full.schedule.alphas_cumprod
    mu, std = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(std, dtype=torch.float64)

    def model(x, t):
        ab = ab_table[t].to(x.dtype).view(-1, 1, 1, 1)
        mu_, s2 = mu.to(x.dtype).view(1, -1, 1, 1), (std**2).to(x.dtype).view(1, -1, 1, 1)
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu_) / (ab * s2 + 1 - ab)

    return model


def gaussian_x0_affine(ab, mu, std):
    """(a, b) with E[x_0 | x_t] = a x_t + b per dimension for N(mu, std^2) data at alphabar ab (float64)."""
    c = (1 - ab).sqrt() / (ab * std**2 + 1 - ab)  # eps = c x - c sqrt(ab) mu
    return (1 - (1 - ab).sqrt() * c) / ab.sqrt(), (1 - ab).sqrt() * c * ab.sqrt() * mu / ab.sqrt()


class GaussianEpsModule(torch.nn.Module):
    """The optimal eps of `gaussian_eps_model` as an nn.Module, so the samplers read a device and dtype
    off it: for data N(mu, diag(std^2)) over channels, computed in the dtype of its one (unused)
    parameter (the coefficients in float64, then cast). learn_sigma: 2C output channels, the second C a v = tanh(x_t) in (-1, 1) that varies
    with the input (what learned_range reads; a fixed or analytic variance ignores it).
    t is the ORIGINAL timestep of the full process `full`.
    """

    def __init__(self, full, mu, std, learn_sigma: bool = False, dtype=torch.float32):
        super().__init__()
        self.ab_table = full.schedule.alphas_cumprod  # float64 [T], a plain attribute: .to(dtype) leaves it
        self.mu = torch.as_tensor(mu, dtype=torch.float64).view(1, -1, 1, 1)
        self.var = torch.as_tensor(std, dtype=torch.float64).view(1, -1, 1, 1) ** 2
        self.learn_sigma = learn_sigma
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=dtype), requires_grad=False)

    def forward(self, x, t):
        dtype = self.anchor.dtype
        ab = self.ab_table.to(x.device)[t].view(-1, 1, 1, 1)
        mu, var = self.mu.to(x.device), self.var.to(x.device)
        # the float64 coefficients of eps = a x + b, then the arithmetic in the model's dtype
        a = ((1 - ab).sqrt() / (ab * var + 1 - ab)).to(dtype)
        b = (-(1 - ab).sqrt() * ab.sqrt() * mu / (ab * var + 1 - ab)).to(dtype)
        eps = a * x.to(dtype) + b
        return torch.cat([eps, torch.tanh(x.to(dtype))], 1) if self.learn_sigma else eps
