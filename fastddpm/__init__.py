"""fastddpm: denoising diffusion probabilistic models, fast and tested.

DDPM (Ho, Jain & Abbeel 2020) with the Improved-DDPM additions (Nichol & Dhariwal 2021) on a
plain eager PyTorch reference; the Triton, CUDA-graph, torch.compile and ONNX backends compute
the same function faster. See DESIGN.md for the conventions and README.md to get started.
"""
from .checkpoint import load_checkpoint, save_checkpoint
from .diffusion import GaussianDiffusion
from .errors import FastDDPMError
from .noise import noise
from .options import SampleOptions
from .sampling import interpolate, sample
from .schedule import make_betas
from .unet import UNet, UNetConfig

__version__ = "0.1.0"
__all__ = ["GaussianDiffusion", "FastDDPMError", "SampleOptions", "UNet", "UNetConfig", "interpolate",
           "load_checkpoint", "make_betas", "noise", "sample", "save_checkpoint"]
