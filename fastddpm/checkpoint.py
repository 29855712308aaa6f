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
from .paths import check_path_length
from .unet import UNet
from .validate import ANALYTIC_KEY, analytic_gamma, betas_tensor, check_weights, config_object, diffusion_settings
from .validate import unet_config as validate_unet_config

FORMAT = "fastddpm"
VERSION = "1"
# names `--checkpoint` resolves to package data: the L_simple model (fixed variance) and the
# hybrid-loss, learned-variance one (IDDPM)
BUNDLED = {"digits": "digits.safetensors", "digits-hybrid": "digits-hybrid.safetensors"}


def bundled_path(name: str) -> Path:
    """Where the bundled checkpoint `name` lives inside the installed package."""
    return Path(__file__).parent / "assets" / BUNDLED[name]


def checkpoint_file(path):
    """The file a `--checkpoint` value names: the bundled file for a bundled name, else `path` itself
    (which need not exist; for refusing an output that would overwrite it)."""
    return bundled_path(str(path)) if str(path) in BUNDLED else path


def resolve_checkpoint(path) -> Path:
    """A path, or the name of a bundled checkpoint ("digits", "digits-hybrid"), as an existing file's Path."""
    if str(path) in BUNDLED:
        p = bundled_path(str(path))
        if not p.is_file():
            raise CheckpointError(f"the bundled {path!r} checkpoint is not installed ({p} is missing)")
        return p
    p = Path(path)
    check_path_length(p, "--checkpoint", CheckpointError)
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist")
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} is not a file")
    return p


def save_checkpoint(path, model: UNet, diffusion: GaussianDiffusion, extra_tensors: dict | None = None,
                    **meta) -> None:
    """Write `model`'s weights, `diffusion`'s betas and settings, and JSON-able `meta` to `path`.

    extra_tensors: more tensors to store, each name starting with "train." (training state).
    A diffusion that carries an Analytic-DPM table (`diffusion.gamma`) stores it in
    meta["analytic_dpm"]["gamma"], beside whatever else meta["analytic_dpm"] holds.
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
    if diffusion.gamma is not None:
        meta = {**meta, ANALYTIC_KEY: {**meta.get(ANALYTIC_KEY, {}), "gamma": diffusion.gamma.tolist()}}
    config = {"unet": model.config.to_dict(), "diffusion": diffusion.config(), "meta": meta}
    metadata = {"format": FORMAT, "version": VERSION, "config": json.dumps(config)}
    save_safetensors(path, tensors, metadata)


def read_checkpoint(path) -> tuple[dict, dict]:
    """(tensors, config) of a fastddpm checkpoint, with clear errors for foreign or broken files.

    config is the JSON object {"unet": {...}, "diffusion": {...}, "meta": {...}} ("meta" is {} when
    absent). The U-Net config is checked here (fastddpm.validate: a resumed run builds from it too);
    betas, diffusion settings and weights are checked by `load_checkpoint`.
    """
    tensors, config, _ = _read_checkpoint(path)
    return tensors, config


def _read_checkpoint(path):
    """(tensors, config, validated UNetConfig) of the checkpoint at `path` (see read_checkpoint)."""
    from safetensors import safe_open

    p = resolve_checkpoint(path)
    source = repr(str(p))
    try:
        with safe_open(str(p), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(p))
    # safetensors reports a bad header as SafetensorError, some malformed files as other errors
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as e:
        raise CheckpointError(f"{source} is not a readable safetensors checkpoint ({_first_line(e)})") from None
    if metadata.get("format") != FORMAT or "config" not in metadata:
        raise CheckpointError(
            f"{source} is a safetensors file but not a fastddpm checkpoint (no fastddpm config in its "
            "metadata); convert foreign weights with `fastddpm convert`")
    if metadata.get("version") != VERSION:
        raise CheckpointError(f"{source} has checkpoint format version {metadata.get('version')!r}; "
                              f"this fastddpm reads version {VERSION}")
    try:
        config = json.loads(metadata["config"])
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{source} has a corrupt config ({_first_line(e)})") from None
    config = config_object(config, "the config", source)
    for key in ("unet", "diffusion"):
        if key not in config:
            raise CheckpointError(f"{source} has no {key!r} section in its config")
        config_object(config[key], f"the {key!r} config", source)
    config["meta"] = config_object(config.get("meta", {}), "the 'meta' config", source)
    return tensors, config, validate_unet_config(config["unet"], source)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_checkpoint(path, device="cpu") -> tuple[UNet, GaussianDiffusion, dict]:
    """(model, diffusion, meta) from a checkpoint written by `save_checkpoint` or `fastddpm convert`.

    `path` may also name a bundled checkpoint ("digits"). The model is in eval mode on `device`,
    in float32. Everything in the file is checked before anything is built (fastddpm.validate):
    the U-Net config's fields and size, the diffusion settings, the betas, the weights' names,
    shapes, dtypes (floating point) and values (finite), and a calibration table if there is one
    (then `diffusion.gamma` holds it). Any problem raises CheckpointError.
    """
    tensors, config, unet_config = _read_checkpoint(path)
    source = repr(str(path))
    if "diffusion.betas" not in tensors:
        raise CheckpointError(f"{source} holds no 'diffusion.betas' tensor")
    betas = betas_tensor(tensors.pop("diffusion.betas"), source)
    settings = diffusion_settings(config["diffusion"], len(betas), source)
    gamma = analytic_gamma(config["meta"], len(betas), source)
    try:
        diffusion = GaussianDiffusion(betas, **settings, gamma=gamma)
    except FastDDPMError as e:
        raise CheckpointError(f"{source}: {e}") from None
    weights = {k: v for k, v in tensors.items() if not k.startswith("train.")}
    with torch.device("meta"):  # names and shapes are checked before any memory is spent on the model
        model = UNet(unet_config)
    check_state_dict(model.state_dict(), weights, source)
    check_weights(weights, source)
    model.load_state_dict({k: v.to(torch.float32) for k, v in weights.items()}, assign=True)
    return model.to(device).eval(), diffusion, config["meta"]


def check_state_dict(own: dict, weights: dict, source: str) -> None:
    """Raise one CheckpointError naming the missing, unexpected and mis-shaped keys of `weights`
    against the state dict `own` (tensors, possibly on the meta device)."""
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
        raise CheckpointError(f"{source} does not match its model config ({'; '.join(problems)})")


def load_state_dict_checked(model: torch.nn.Module, weights: dict, source: str) -> None:
    """load_state_dict that names missing, unexpected and mis-shaped keys in one CheckpointError."""
    check_state_dict(model.state_dict(), weights, repr(source))
    model.load_state_dict(weights)
