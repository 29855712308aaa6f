"""Checkpoints: one safetensors file holding the weights, the betas and a JSON config.

Layout of a fastddpm checkpoint (`.safetensors`):
    tensors   the U-Net's state dict under its own names ("conv_in.weight", ...),
              "diffusion.betas" (float64 [T]), and anything under "train." (optimizer,
              raw weights, RNG state: written by the trainer, ignored by `load_checkpoint`)
    metadata  {"format": "fastddpm", "version": "1", "config": JSON string:
               {"unet": UNetConfig.to_dict(), "diffusion": GaussianDiffusion.config(), "meta": {...}}}

Nothing is ever unpickled: safetensors holds only raw tensors and strings. Files are serialised
in memory and written to a temporary name of ours in the same folder, flushed and renamed
(fastddpm.files), so a crash never leaves half a checkpoint, and a full disk is an
OutOfSpaceError that leaves the previous file in place.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .diffusion import GaussianDiffusion
from .errors import CheckpointError, FastDDPMError
from .files import save_safetensors
from .unet import UNet, UNetConfig

FORMAT = "fastddpm"
VERSION = "1"
BUNDLED = {"digits": "digits.safetensors"}  # names `--checkpoint` resolves to package data


def bundled_path(name: str) -> Path:
    """Where the bundled checkpoint `name` lives inside the installed package."""
    return Path(__file__).parent / "assets" / BUNDLED[name]


def resolve_checkpoint(path) -> Path:
    """A path, or the name of a bundled checkpoint ("digits"), as an existing file's Path."""
    if str(path) in BUNDLED:
        p = bundled_path(str(path))
        if not p.is_file():
            raise CheckpointError(f"the bundled {path!r} checkpoint is not installed ({p} is missing)")
        return p
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} is not a file")
    return p


def save_checkpoint(path, model: UNet, diffusion: GaussianDiffusion, extra_tensors: dict | None = None,
                    **meta) -> None:
    """Write `model`'s weights, `diffusion`'s betas and settings, and JSON-able `meta` to `path`.

    extra_tensors: more tensors to store, each name starting with "train." (training state).
    Raises OutOfSpaceError / OutputError (fastddpm.errors) when the file cannot be written; the
    file at `path`, if any, is then unchanged.
    """
    if diffusion.num_steps != diffusion.num_timesteps:
        raise FastDDPMError("save the full diffusion process, not a respaced one")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tensors["diffusion.betas"] = diffusion.schedule.betas.contiguous()
    for name, value in (extra_tensors or {}).items():
        if not name.startswith("train."):
            raise ValueError(f"extra tensor {name!r} must be named 'train.*'")
        tensors[name] = value.detach().to("cpu").contiguous()
    config = {"unet": model.config.to_dict(), "diffusion": diffusion.config(), "meta": meta}
    metadata = {"format": FORMAT, "version": VERSION, "config": json.dumps(config)}
    save_safetensors(path, tensors, metadata)


def read_checkpoint(path) -> tuple[dict, dict]:
    """(tensors, config) of a fastddpm checkpoint, with clear errors for foreign or broken files."""
    p = resolve_checkpoint(path)
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(p)!r} is not a readable safetensors checkpoint ({e})") from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(
            f"{str(p)!r} is a safetensors file but not a fastddpm checkpoint (no fastddpm config in its "
            "metadata); convert foreign weights with `fastddpm convert`")
    if metadata.get("version") != VERSION:
        raise CheckpointError(f"{str(p)!r} has checkpoint format version {metadata.get('version')!r}; "
                              f"this fastddpm reads version {VERSION}")
    try:
        config = json.loads(metadata["config"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(p)!r} has a corrupt config ({e})") from None
    return tensors, config


def load_checkpoint(path, device="cpu") -> tuple[UNet, GaussianDiffusion, dict]:
    """(model, diffusion, meta) from a checkpoint written by `save_checkpoint` or `fastddpm convert`.

    `path` may also name a bundled checkpoint ("digits"). The model is in eval mode on `device`.
    """
    tensors, config = read_checkpoint(path)
    try:
        unet_config = UNetConfig.from_dict(config["unet"])
        dcfg = dict(config["diffusion"])
        betas = tensors.pop("diffusion.betas")
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{str(path)!r} lacks part of its config or tensors ({e})") from None
    num_timesteps = dcfg.pop("num_timesteps", len(betas))
    if num_timesteps != len(betas):
        raise CheckpointError(f"{str(path)!r} says T={num_timesteps} but holds {len(betas)} betas")
    diffusion = GaussianDiffusion(betas, **dcfg)
    model = UNet(unet_config)
    weights = {k: v for k, v in tensors.items() if not k.startswith("train.")}
    load_state_dict_checked(model, weights, str(path))
    return model.to(device).eval(), diffusion, config.get("meta", {})


def load_state_dict_checked(model: torch.nn.Module, weights: dict, source: str) -> None:
    """load_state_dict that names missing, unexpected and mis-shaped keys in one CheckpointError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = sorted(f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
                    for k in set(own) & set(weights) if own[k].shape != weights[k].shape)
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source!r} does not match its model config ({'; '.join(problems)})")
    model.load_state_dict(weights)
