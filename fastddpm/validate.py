"""Validation of what a file says about a model: the U-Net config, the diffusion settings, the tensors.

A checkpoint (or an ONNX export's metadata) is user input: its JSON can hold strings where
numbers belong, zero groups, negative or absurd widths, unknown keys, and its tensors can be
integers, NaN or the wrong rank. Each check here raises a CheckpointError that names the file
and the field, before anything is built or allocated, so `fastddpm` answers with one line and
exit status 2 instead of a traceback, a 64 GB allocation or all-NaN samples.

    unet_config(d, source)               JSON dict -> UNetConfig, every field type- and range-checked,
                                         the parameter count bounded (counted on the meta device)
    diffusion_settings(d, T, source)     JSON dict -> GaussianDiffusion keyword arguments
    analytic_gamma(meta, T, source)      the Analytic-DPM table a calibrated checkpoint carries, or None
    betas_tensor(t, source)              a stored beta tensor -> float64 [T] in (0, 1)
    check_weights(tensors, source)       every weight floating point and finite
    config_object(value, what, source)   a JSON value that must be an object (dict)
"""
from __future__ import annotations

import math
from dataclasses import fields

import torch

from .diffusion import LOSS_TYPES, MEAN_TYPES, MODEL_VAR_TYPES
from .errors import CheckpointError, FastDDPMError
from .schedule import MAX_TIMESTEPS, check_betas

# Bounds on what a file may ask for. Each is far above any published DDPM / IDDPM / ADM model
# (the largest, ADM ImageNet-512, has 559M parameters at 512x512) and far below what would
# exhaust a machine: a file cannot make fastddpm allocate more than MAX_PARAMETERS weights.
MAX_PARAMETERS = 2**30  # 4 GiB of float32 weights
MAX_IMAGE_SIZE = 1024
MAX_IN_CHANNELS = 64
MAX_CHANNELS = 8192  # model_channels x every channel multiplier
MAX_LEVELS = 8
MAX_RES_BLOCKS = 32

DIFFUSION_KEYS = ("mean_type", "var_type", "loss_type", "num_timesteps")


def _fail(source: str, message: str) -> CheckpointError:
    return CheckpointError(f"{source}: {message}")


def config_object(value, what: str, source: str) -> dict:
    """`value` if it is a JSON object (dict), else a CheckpointError naming `what`."""
    if not isinstance(value, dict):
        raise _fail(source, f"{what} must be a JSON object, not {type(value).__name__} {_short(value)}")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _int(d: dict, key: str, low: int, high: int, source: str) -> int:
    """d[key] as an int in [low, high]; bools and floats are refused (JSON true is not 1)."""
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(source, f"U-Net config field {key} must be an integer, not {type(value).__name__} {_short(value)}")
    if not low <= value <= high:
        raise _fail(source, f"U-Net config field {key}={value} is out of range [{low}, {high}]")
    return value


def _number(d: dict, key: str, source: str) -> float:
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(source, f"U-Net config field {key} must be a finite number, not {_short(value)}")
    return float(value)


def _int_list(d: dict, key: str, low: int, high: int, max_len: int, source: str, empty_ok: bool) -> tuple:
    value = d[key]
    if not isinstance(value, (list, tuple)) or (not value and not empty_ok) or len(value) > max_len:
        raise _fail(source, f"U-Net config field {key} must be a list of 1 to {max_len} integers, "
                            f"not {_short(value)}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not low <= item <= high:
            raise _fail(source, f"U-Net config field {key} holds {_short(item)}; each entry must be an integer "
                                f"in [{low}, {high}]")
    return tuple(value)


def unet_config(d, source: str):
    """A UNetConfig from its JSON dict `d`, or a CheckpointError naming the file and the bad field.

    Missing fields take UNetConfig's defaults (older files lack newer fields); unknown fields,
    wrong types and out-of-range values are refused; num_groups must divide every level's
    width; the model must have at most MAX_PARAMETERS parameters (counted on the meta device,
    so nothing is allocated).
    """
    from .unet import UNet, UNetConfig

    d = config_object(d, "the U-Net config", source)
    names = [f.name for f in fields(UNetConfig) if f.init]
    unknown = sorted(set(d) - set(names) - {"out_channels"})
    if unknown:
        raise _fail(source, f"unknown U-Net config fields {unknown}; this fastddpm knows {names}")
    defaults = UNetConfig()
    d = {name: d.get(name, getattr(defaults, name)) for name in names}
    kw = {
        "image_size": _int(d, "image_size", 1, MAX_IMAGE_SIZE, source),
        "in_channels": _int(d, "in_channels", 1, MAX_IN_CHANNELS, source),
        "model_channels": _int(d, "model_channels", 1, MAX_CHANNELS, source),
        "channel_mult": _int_list(d, "channel_mult", 1, MAX_CHANNELS, MAX_LEVELS, source, empty_ok=False),
        "num_res_blocks": _int(d, "num_res_blocks", 0, MAX_RES_BLOCKS, source),
        "attention_resolutions": _int_list(d, "attention_resolutions", 1, MAX_IMAGE_SIZE, 64, source,
                                           empty_ok=True),
        "dropout": _number(d, "dropout", source),
        "num_groups": _int(d, "num_groups", 1, MAX_CHANNELS, source),
        "norm_eps": _number(d, "norm_eps", source),
    }
    if not isinstance(d["learn_sigma"], bool):
        raise _fail(source, f"U-Net config field learn_sigma must be true or false, not {_short(d['learn_sigma'])}")
    if not 0.0 <= kw["dropout"] < 1.0:
        raise _fail(source, f"U-Net config field dropout={kw['dropout']} is not in [0, 1)")
    if not 0.0 < kw["norm_eps"] <= 1.0:
        raise _fail(source, f"U-Net config field norm_eps={kw['norm_eps']} is not in (0, 1]")
    widths = [kw["model_channels"] * m for m in kw["channel_mult"]]
    if max(widths) > MAX_CHANNELS:
        raise _fail(source, f"U-Net config asks for {max(widths)} channels (model_channels x channel_mult); "
                            f"at most {MAX_CHANNELS} are supported")
    try:
        config = UNetConfig(learn_sigma=d["learn_sigma"], **kw)  # checks groups and the image size's divisibility
    except FastDDPMError as e:
        raise _fail(source, f"bad U-Net config ({e})") from None
    with torch.device("meta"):
        count = sum(p.numel() for p in UNet(config).parameters())
    if count > MAX_PARAMETERS:
        raise _fail(source, f"U-Net config describes {count:,} parameters ({4 * count / 2**30:.0f} GiB in "
                            f"float32); at most {MAX_PARAMETERS:,} are supported")
    return config


def diffusion_settings(d, num_betas: int, source: str) -> dict:
    """GaussianDiffusion keyword arguments (mean_type, var_type, loss_type) from a checkpoint's
    diffusion dict, checked: known keys only, known values, num_timesteps equal to the betas held."""
    d = config_object(d, "the diffusion config", source)
    unknown = sorted(set(d) - set(DIFFUSION_KEYS))
    if unknown:
        raise _fail(source, f"unknown diffusion config keys {unknown}; this fastddpm knows {list(DIFFUSION_KEYS)}")
    out = {}
    for key, choices, default in (("mean_type", MEAN_TYPES, "eps"), ("var_type", MODEL_VAR_TYPES, "fixedlarge"),
                                  ("loss_type", LOSS_TYPES, "simple")):
        value = d.get(key, default)
        if not isinstance(value, str) or value not in choices:
            raise _fail(source, f"diffusion config {key}={_short(value)} is not one of {', '.join(choices)}")
        out[key] = value
    T = d.get("num_timesteps", num_betas)
    if isinstance(T, bool) or not isinstance(T, int) or T != num_betas:
        raise _fail(source, f"diffusion config says num_timesteps={_short(T)} but the file holds {num_betas} betas")
    return out


ANALYTIC_KEY = "analytic_dpm"  # meta key of `fastddpm calibrate`'s record: {"gamma": [T], "gamma_stderr": [T], ...}


def analytic_gamma(meta: dict, T: int, source: str) -> torch.Tensor | None:
    """The calibration table Gamma [T] (float64) of a checkpoint's meta, None when it has none;
    a CheckpointError when the record is not an object holding T finite, non-negative numbers."""
    from .analytic import check_gamma

    if ANALYTIC_KEY not in meta:
        return None
    record = config_object(meta[ANALYTIC_KEY], f"meta[{ANALYTIC_KEY!r}]", source)
    gamma = record.get("gamma")
    if not isinstance(gamma, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in gamma):
        raise _fail(source, f"meta[{ANALYTIC_KEY!r}]['gamma'] must be a list of numbers, not {_short(gamma)}; "
                            "calibrate again with `fastddpm calibrate`")
    try:
        return check_gamma(gamma, T)
    except FastDDPMError as e:
        raise _fail(source, str(e)) from None


def betas_tensor(betas, source: str) -> torch.Tensor:
    """A stored beta schedule as float64 [T], or a CheckpointError: it must be a 1-D floating tensor of
    1..MAX_TIMESTEPS finite values in (0, 1) whose alphabar stays above 0 (see schedule.check_betas)."""
    if not isinstance(betas, torch.Tensor) or not betas.is_floating_point():
        kind = betas.dtype if isinstance(betas, torch.Tensor) else type(betas).__name__
        raise _fail(source, f"diffusion.betas must be a floating-point tensor, not {kind}")
    if betas.ndim != 1:
        raise _fail(source, f"diffusion.betas must be 1-D [T], not of shape {list(betas.shape)}")
    if betas.numel() > MAX_TIMESTEPS:
        raise _fail(source, f"diffusion.betas holds {betas.numel()} steps; at most {MAX_TIMESTEPS} are supported")
    try:
        return check_betas(betas)
    except FastDDPMError as e:
        raise _fail(source, f"bad diffusion.betas ({e})") from None


def check_weights(tensors: dict, source: str) -> None:
    """Refuse integer, boolean and non-finite weights (they would load silently and sample NaN or zeros)."""
    not_float = sorted(k for k, v in tensors.items() if not v.is_floating_point())
    if not_float:
        raise _fail(source, f"checkpoint holds non-floating-point weights ({', '.join(not_float[:5])}"
                            f"{' ...' if len(not_float) > 5 else ''}: {tensors[not_float[0]].dtype})")
    bad = sorted(k for k, v in tensors.items() if not torch.isfinite(v).all())
    if bad:
        more = " ..." if len(bad) > 5 else ""
        raise _fail(source, f"checkpoint holds non-finite weights ({', '.join(bad[:5])}{more})")
