"""What the sampling stack reads off a model: device and dtype, memory layout, a fingerprint of
its weights, the shape it samples; and how it calls it (eval mode, dtype and layout casts).

A "model" is any callable (x_t, t) -> output (DESIGN.md); an nn.Module tells more about itself.
Leaf module: imports only `errors` (and `unet` lazily, for its config class).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .errors import FastDDPMError


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off while sampling; the module's training flag is restored afterwards."""
    was_training = isinstance(model, torch.nn.Module) and model.training
    if was_training:
        model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    """Where and in what dtype a model computes: its first parameter's, else CPU float32."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def channels_last(model) -> bool:
    """Whether the model's conv weights are channels-last (then its inputs are made so too)."""
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.ndim == 4:
                return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def as_model_fn(model, model_dtype: torch.dtype, state_dtype: torch.dtype, layout_of=None) -> Callable:
    """model as a callable on the float state: x [B, C, ...] cast to the model's dtype (and to
    channels-last when `layout_of`'s weights are), the output cast back to `state_dtype`."""
    fmt = torch.channels_last if channels_last(layout_of if layout_of is not None else model) else None
    if model_dtype == state_dtype and fmt is None:
        return model
    if fmt is None:
        return lambda x, t: model(x.to(model_dtype), t).to(state_dtype)
    return lambda x, t: model(x.to(dtype=model_dtype, memory_format=fmt), t).to(state_dtype)


def weights_fingerprint(model) -> tuple:
    """Identity of a module's weights as compiled code and CUDA graphs see them: for every
    parameter and buffer (name, storage address, dtype, shape, strides, device, in-place version).

    It changes after `.half()` / `.to(torch.bfloat16)` (new storages), `load_state_dict(...,
    assign=True)` (new tensors), `load_state_dict` (in-place copies bump `_version`) or an
    optimiser step, and stays equal otherwise; a cache keyed on it never replays a captured graph
    over freed or stale memory. () for a plain callable.
    """
    if not isinstance(model, torch.nn.Module):
        return ()
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return tuple((name, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()), str(t.device), t._version)
                 for name, t in named)


def check_model_shape(model, shape: tuple[int, ...]) -> None:
    """For a model with a U-Net config (`UNet`, an ONNX model), shape must be [B, in_channels,
    image_size, image_size]; FastDDPMError naming expected and given otherwise. Plain callables
    are not checked (DESIGN.md: `sample` works for any 4-D shape)."""
    from .unet import UNetConfig

    config = getattr(model, "config", None)
    if not isinstance(config, UNetConfig):
        return
    want = (config.in_channels, config.image_size, config.image_size)
    if len(shape) != 4 or tuple(shape[1:]) != want:
        raise FastDDPMError(f"this model samples shape [B, {', '.join(map(str, want))}] (in_channels "
                            f"{config.in_channels}, image_size {config.image_size}), but the shape given is "
                            f"{list(shape)}")
