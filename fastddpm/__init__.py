"""fastddpm: denoising diffusion probabilistic models, fast and tested.

DDPM (Ho, Jain & Abbeel 2020) with the Improved-DDPM additions (Nichol & Dhariwal 2021) on a
plain eager PyTorch reference; the Triton, CUDA-graph, torch.compile and ONNX backends compute
the same function faster. See DESIGN.md for the conventions and README.md to get started.

The public names below are imported on first use (PEP 562), not when the package is: the
`fastddpm` command enters at fastddpm.cli:main, and importing the package must not import torch
before the command has installed its signal handling (a Ctrl-C during the 1-2 s `import torch`
takes would otherwise end in a KeyboardInterrupt traceback).
"""
import importlib
import sys
import types

__version__ = "0.1.0"
_EXPORTS = {
    "GaussianDiffusion": "diffusion", "FastDDPMError": "errors", "SampleOptions": "options", "UNet": "unet",
    "UNetConfig": "unet", "interpolate": "sampling", "load_checkpoint": "checkpoint", "make_betas": "schedule",
    "noise": "noise", "sample": "sampling", "save_checkpoint": "checkpoint",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastddpm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    setattr(sys.modules[__name__], name, value)
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """The package module: `fastddpm.noise` stays the function `noise` (as with eager imports), even
    after the submodule fastddpm.noise is imported, which would otherwise rebind the attribute."""

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType) and _EXPORTS[name] == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
