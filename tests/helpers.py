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
