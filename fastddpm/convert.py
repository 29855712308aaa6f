"""Converters between fastddpm checkpoints and the other layouts of the DDPM U-Net.

    diffusers          read: a DDPMPipeline folder (model_index.json, unet/config.json, unet/
                       diffusion_pytorch_model.safetensors or .bin, scheduler/scheduler_config.json),
                       its unet/ subfolder alone (the scheduler is then read from ../scheduler/), or a
                       bare UNet2DModel folder (config.json + weights, scheduler_config.json beside
                       them), as google/ddpm-cifar10-32, ddpm-ema-church-256 ... are published; a .bin
                       is read with torch.load(weights_only=True). Without a scheduler config DDPM's
                       own process is assumed (and said on stderr).
                       written (exporting a fastddpm checkpoint): the DDPMPipeline folder

                           DIR/model_index.json                       DDPMPipeline: unet + scheduler
                           DIR/unet/config.json                       UNet2DModel
                           DIR/unet/diffusion_pytorch_model.safetensors
                           DIR/scheduler/scheduler_config.json        DDPMScheduler

                       that diffusers.DDPMPipeline.from_pretrained(DIR) loads as it is (and
                       UNet2DModel / DDPMScheduler.from_pretrained(DIR, subfolder=...)).
    pytorch_diffusion  the PyTorch port of the original DDPM TensorFlow checkpoints
                       (pesser/pytorch_diffusion, `model-790000.ckpt` ...): a bare state dict,
                       read with torch.load(weights_only=True); the architecture is read off
                       the tensor shapes, the image size from `image_size` (guessed for the
                       published models: 32 for 4 levels, 256 for 6)
    fastddpm           our own checkpoint (fastddpm.checkpoint), or a built-in one by name
                       (`digits`, `digits-hybrid`); converting one exports it to the pipeline above

`convert(request)` detects the format of SRC from what it holds (not from its name) and
converts to fastddpm, or, for a fastddpm checkpoint, to a diffusers pipeline folder.

Inputs are never destroyed and outputs never half-written: before any work, an output that is
an input file (same device and inode), the source folder, or a folder holding an input is
refused, as are output paths that cannot be written (fastddpm.files' checks); the pipeline's
four files are written under temporary names and renamed together (files.publish_together),
model_index.json last. SRC must be a regular file or a folder: a FIFO or device is refused
before it is opened (reading one would block forever).

The U-Net's names in each layout live in unet_layouts.py, the diffusers configs in
diffusers_config.py; this file reads the files (never unpickling: torch.load(weights_only=True)),
detects the format and writes the result.
"""
from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import BUNDLED, FORMAT, load_checkpoint, resolve_checkpoint, save_checkpoint
from .diffusers_config import (ddpm_diffusion, diffusers_config, diffusion_from_scheduler, pipeline_index,
                               scheduler_config, unet_config_from_diffusers, unet_of_index)
from .diffusion import GaussianDiffusion
from .errors import CheckpointError, FastDDPMError, check_choice
from .errors import OutputError
from .files import check_not_an_input, check_output_file, check_output_folder, publish_together
from .paths import check_path_length
from .unet import UNet, UNetConfig, count_parameters
from .unet_layouts import diffusers_state_dict, import_weights
from .validate import unet_config as validated_unet_config

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
MODEL_INDEX = "model_index.json"  # a pipeline folder's index of its components (subfolders)
UNET_DIR, SCHEDULER_DIR = "unet", "scheduler"


@dataclass
class ConvertRequest:
    """Everything `fastddpm convert` takes (see `fastddpm convert --help`)."""

    src: str
    out: str
    image_size: int | None = None  # pytorch_diffusion only: the training resolution
    var_type: str | None = None  # override the reverse variance: fixedlarge | fixedsmall



# -------------------------------------------------------------------------------- reading files
def _require_regular(path: Path) -> None:
    """Refuse anything but a regular file before opening it: a FIFO would block forever, a device
    (/dev/zero) would never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise CheckpointError(f"cannot read {str(path)!r} ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{str(path)!r} is not a regular file (a FIFO, device or socket); refusing to read it")


def _read_json(path: Path) -> dict:
    _require_regular(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {str(path)!r} as JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{str(path)!r} is not a JSON object")
    return value


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({e})") from None


def _read_torch(path: Path) -> dict:
    """A state dict saved with torch.save, read with weights_only=True (nothing else is unpickled)."""
    import pickle

    try:
        value = torch.load(str(path), map_location="cpu", weights_only=True)
    # a hostile zip or pickle stream surfaces as any of these (the weights-only unpickler runs nothing)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError,
            IndexError, MemoryError, NotImplementedError) as e:
        # torch's weights_only refusal is a paragraph; the sentence naming what it refused is the useful one
        msg, tag = " ".join(str(e).split()), "WeightsUnpickler error:"
        detail = (msg[msg.index(tag) + len(tag):] if tag in msg else msg).strip().split(". ")[0] or type(e).__name__
        raise CheckpointError(f"{str(path)!r} is not a state dict torch.load(weights_only=True) can read ({detail}); "
                              "nothing else is unpickled") from None
    if not isinstance(value, dict) or not all(isinstance(v, torch.Tensor) for v in value.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a plain state dict (name -> tensor)")
    return value


def read_weights_file(path: Path) -> tuple[dict, dict]:
    """(tensors, safetensors metadata) of a weights file: safetensors by its header, else torch.load."""
    _require_regular(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"cannot read {str(path)!r} ({e.strerror or e})") from None
    # safetensors: an 8-byte little-endian header length, then the JSON header. The length's low byte
    # may be anything (0x80 too, a pickle's first byte), so the header decides, not that byte alone.
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    if head[8:9] == b"{" and 0 < header_len < path.stat().st_size and head[:2] != b"PK":
        return _read_safetensors(path)
    return _read_torch(path), {}


def _scheduler_config_near(folder: Path) -> Path | None:
    for p in (folder / SCHEDULER_CONFIG, folder / "scheduler" / SCHEDULER_CONFIG,
              folder.parent / "scheduler" / SCHEDULER_CONFIG):
        if p.is_file():
            return p
    return None


def _diffusers_folder(folder: Path) -> tuple[Path, Path]:
    """(config.json, weights file) of a diffusers folder: a pipeline folder (model_index.json; its unet/,
    or the files beside model_index.json as the first published ddpm-* pipelines kept them), a
    pipeline's unet/ subfolder, or a bare UNet2DModel folder."""
    index = folder / MODEL_INDEX
    if index.is_file():
        try:
            unet_of_index(_read_json(index))
        except CheckpointError as e:
            raise CheckpointError(f"{str(index)!r}: {e}") from None
        candidates = (folder / UNET_DIR, folder)
    else:
        candidates = (folder, folder / UNET_DIR)
    for f in candidates:
        if (f / DIFFUSERS_CONFIG).is_file():
            for name in DIFFUSERS_WEIGHTS:
                if (f / name).is_file():
                    return f / DIFFUSERS_CONFIG, f / name
            raise CheckpointError(f"{str(f)!r} has a config.json but no {' or '.join(DIFFUSERS_WEIGHTS)}")
    raise CheckpointError(f"{str(folder)!r} is not a diffusers UNet2DModel folder (no config.json in it or in "
                          f"{str(folder / UNET_DIR)!r})")


def resolve_source(src) -> Path:
    """SRC as an existing path: a file, a folder, or a built-in checkpoint's name ("digits",
    "digits-hybrid", as --checkpoint takes them). CheckpointError if there is nothing there."""
    name = str(src)
    if name in BUNDLED:
        return resolve_checkpoint(name)
    p = Path(name)
    try:
        exists = p.exists()
    except OSError as e:  # a name too long, no permission on a folder above it
        raise CheckpointError(f"cannot read {name[:80]!r} ({e.strerror or e})") from None
    if not exists:
        raise CheckpointError(f"{name!r} does not exist")
    return p


def input_paths(src: Path) -> list[Path]:
    """The existing files and folders converting `src` reads: src itself and, for a diffusers layout, the
    model_index.json, config.json, weights file and scheduler config it would use (the config and scheduler
    beside a weights file are listed whatever the file holds: a superset is what a guard needs)."""
    paths = [src]
    if src.is_dir():
        config, weights = _diffusers_folder(src)
        paths += [src / MODEL_INDEX, config, weights]
        folder = config.parent
    else:
        folder = src.parent
        paths.append(folder / DIFFUSERS_CONFIG)
    scheduler = _scheduler_config_near(folder)
    return [p for p in paths + ([scheduler] if scheduler else []) if p.exists()]


def detect_format(src) -> str:
    """'diffusers', 'pytorch_diffusion' or 'fastddpm': what `src` (a folder or a weights file) holds."""
    p = Path(src)
    if not p.exists():
        raise CheckpointError(f"{str(p)!r} does not exist")
    if p.is_dir():
        _diffusers_folder(p)
        return "diffusers"
    tensors, metadata = read_weights_file(p)
    return _format_of(p, tensors, metadata)


def _format_of(p: Path, tensors: dict, metadata: dict) -> str:
    if metadata.get("format") == FORMAT:
        return "fastddpm"
    if "temb.dense.0.weight" in tensors:
        return "pytorch_diffusion"
    if "time_embedding.linear_1.weight" in tensors:
        return "diffusers"
    raise CheckpointError(f"{str(p)!r} holds neither a diffusers UNet2DModel (time_embedding.*), a "
                          "pytorch_diffusion model (temb.dense.*) nor a fastddpm checkpoint")


# ------------------------------------------------------------------------------------- converters
def _built(config: UNetConfig, weights: dict) -> UNet:
    """The U-Net of `config` holding `weights` (built on the meta device: no init work thrown away)."""
    with torch.device("meta"):
        model = UNet(config)
    model.load_state_dict(weights, assign=True)
    return model.eval()


def from_diffusers(config_path: Path, weights: dict, var_type: str | None = None) -> tuple[UNet, GaussianDiffusion, dict]:
    """A UNet2DModel (config.json + state dict) and its scheduler_config.json -> (model, diffusion, meta)."""
    cfg = _read_json(config_path)
    try:
        config = unet_config_from_diffusers(cfg)
    except CheckpointError as e:
        raise CheckpointError(f"{str(config_path)!r}: {e}") from None
    model = _built(config, import_weights(weights, config, "diffusers", f"{str(config_path.parent)!r}"))
    sched = _scheduler_config_near(config_path.parent)
    if sched is not None:
        try:
            diffusion, meta = diffusion_from_scheduler(_read_json(sched), var_type)
        except CheckpointError as e:
            raise CheckpointError(f"{str(sched)!r}: {e}") from None
        meta["scheduler_config"] = str(sched)
    else:
        diffusion, meta = ddpm_diffusion(config.image_size, var_type)
        print(f"fastddpm: no {SCHEDULER_CONFIG} beside {str(config_path.parent)!r}: assuming DDPM's process "
              f"(linear betas, T=1000, {diffusion.var_type}, clipping)", file=sys.stderr)
    return model, diffusion, meta


def pytorch_diffusion_config(tensors: dict, image_size: int | None = None) -> UNetConfig:
    """The UNetConfig of a pytorch_diffusion state dict, read off its tensor shapes.

    image_size is not in the weights: it is guessed for the published models (4 levels: CIFAR-10,
    32; 6 levels: LSUN / CelebA-HQ, 256) and must be given otherwise. Tensors of the wrong rank
    and zero widths are refused; the result is checked by fastddpm.validate.
    """
    def conv(key: str) -> torch.Tensor:
        if key not in tensors:
            raise CheckpointError(f"pytorch_diffusion state dict lacks {key!r}")
        w = tensors[key]
        if w.ndim != 4 or min(w.shape) < 1:
            raise CheckpointError(f"pytorch_diffusion {key} has shape {list(w.shape)}; a conv weight is "
                                  "[out, in, kh, kw] with every size positive")
        return w

    conv_in, conv_out = conv("conv_in.weight"), conv("conv_out.weight")
    ch, in_ch = int(conv_in.shape[0]), int(conv_in.shape[1])
    level_ids = {k.split(".")[1] for k in tensors if k.startswith("down.")}
    block_ids = {k.split(".")[3] for k in tensors if k.startswith("down.0.block.") and k.count(".") >= 4}
    if not level_ids or not block_ids or not all(i.isdigit() and len(i) < 4 for i in level_ids | block_ids):
        raise CheckpointError("pytorch_diffusion state dict has no down.<level>.block.<i>.* keys")
    levels, blocks = 1 + max(map(int, level_ids)), 1 + max(map(int, block_ids))
    mult = []
    for i in range(levels):
        w = conv(f"down.{i}.block.0.conv1.weight")
        if w.shape[0] % ch:
            raise CheckpointError(f"down.{i}.block.0.conv1.weight has {w.shape[0]} channels, not a multiple of {ch}")
        mult.append(int(w.shape[0]) // ch)
    if image_size is None:
        guesses = {4: 32, 6: 256}
        if levels not in guesses:
            raise FastDDPMError(f"the pytorch_diffusion model has {levels} resolution levels; give its training "
                                "image size with --image-size")
        image_size = guesses[levels]
    attn_levels = [i for i in range(levels) if f"down.{i}.attn.0.q.weight" in tensors]
    out_ch = int(conv_out.shape[0])
    return validated_unet_config(dict(
        image_size=image_size, in_channels=in_ch, model_channels=ch, channel_mult=mult, num_res_blocks=blocks,
        attention_resolutions=[image_size >> i for i in attn_levels], dropout=0.1 if image_size == 32 else 0.0,
        num_groups=32, learn_sigma=out_ch == 2 * in_ch, norm_eps=1e-6), "pytorch_diffusion state dict")


def from_pytorch_diffusion(path: Path, tensors: dict, image_size: int | None = None,
                           var_type: str | None = None) -> tuple[UNet, GaussianDiffusion, dict]:
    """A pytorch_diffusion `model-*.ckpt` state dict -> (model, diffusion with DDPM's settings, meta)."""
    config = pytorch_diffusion_config(tensors, image_size)
    model = _built(config, import_weights(tensors, config, "pytorch_diffusion", f"{str(path)!r}"))
    diffusion, meta = ddpm_diffusion(config.image_size, var_type)
    return model, diffusion, meta


def pipeline_files(model: UNet, diffusion: GaussianDiffusion, clip: bool = True) -> dict[str, bytes]:
    """The files of a diffusers DDPMPipeline folder holding `model` and `diffusion`, by path inside the
    folder: model_index.json, unet/config.json, unet/diffusion_pytorch_model.safetensors and
    scheduler/scheduler_config.json (clip: the scheduler's clip_sample), serialised in memory."""
    from safetensors.torch import save

    def js(value: dict) -> bytes:
        return (json.dumps(value, indent=2) + "\n").encode()

    return {f"{UNET_DIR}/{DIFFUSERS_WEIGHTS[0]}": save(diffusers_state_dict(model), metadata={"format": "pt"}),
            f"{UNET_DIR}/{DIFFUSERS_CONFIG}": js(diffusers_config(model.config)),
            f"{SCHEDULER_DIR}/{SCHEDULER_CONFIG}": js(scheduler_config(diffusion, clip)),
            MODEL_INDEX: js(pipeline_index())}


def _check_export_out(src, out) -> Path:
    """Refuse an export destination before any work: a file, a .safetensors name, or a folder that
    cannot be made or written (fastddpm.files.check_output_folder)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FastDDPMError(f"--out {str(out)!r} is a file; exporting to diffusers writes a pipeline folder")
    if out.suffix == ".safetensors":
        raise FastDDPMError(f"{str(src)!r} is already a fastddpm checkpoint; converting it exports a diffusers "
                            f"pipeline folder, so --out should name a folder, not {str(out)!r}")
    return check_output_folder(out, "--out")


def export_diffusers(src, out) -> Path:
    """Write the fastddpm checkpoint `src` as the diffusers DDPMPipeline folder `out` (see the module
    docstring; DDPMPipeline.from_pretrained(out) loads it). The four files are published together,
    model_index.json last: a failure (a full disk) leaves `out` as it was. Returns `out` as a Path."""
    out = _check_export_out(src, out)
    model, diffusion, meta = load_checkpoint(src)
    publish_together(out, pipeline_files(model, diffusion, bool(meta.get("clip_denoised", True))), last=MODEL_INDEX)
    return out


def _check_import_out(out) -> None:
    if Path(out).is_dir():
        raise FastDDPMError(f"--out {str(out)!r} is a folder; importing writes one DST.safetensors file")
    check_output_file(out, "--out")


def convert(request: ConvertRequest) -> str:
    """Convert request.src (format detected) and write request.out; returns a one-line summary.

    Bad input raises FastDDPMError (CheckpointError for the source, OutputError for --out), and
    nothing is written: the options, --out's name and the source are checked first, and an --out
    that would replace or hold an input is refused before the source is read."""
    _check_options(request)
    src = resolve_source(request.src)
    check_not_an_input(request.out, input_paths(src))
    if src.is_dir():
        config_path, weights_path = _diffusers_folder(src)
        tensors, metadata = read_weights_file(weights_path)
        fmt = "diffusers"
    else:
        tensors, metadata = read_weights_file(src)
        fmt = _format_of(src, tensors, metadata)
        config_path = src.parent / DIFFUSERS_CONFIG
    if fmt == "fastddpm":
        out = export_diffusers(src, request.out)
        return (f"wrote diffusers DDPMPipeline folder {out} ({MODEL_INDEX}, {UNET_DIR}/{DIFFUSERS_CONFIG}, "
                f"{UNET_DIR}/{DIFFUSERS_WEIGHTS[0]}, {SCHEDULER_DIR}/{SCHEDULER_CONFIG})")
    _check_import_out(request.out)
    if fmt == "diffusers":
        if not config_path.is_file():
            raise CheckpointError(f"{str(src)!r} holds diffusers weights but there is no config.json beside it")
        if request.image_size is not None:
            raise FastDDPMError("--image-size is for pytorch_diffusion checkpoints; a diffusers config gives sample_size")
        model, diffusion, meta = from_diffusers(config_path, tensors, request.var_type)
    else:
        model, diffusion, meta = from_pytorch_diffusion(src, tensors, request.image_size, request.var_type)
    save_checkpoint(request.out, model, diffusion, converted_from=fmt, source=str(src), **meta)
    T = diffusion.num_timesteps
    return (f"wrote {request.out}: {fmt} U-Net, {count_parameters(model):,} parameters, "
            f"{model.config.image_size}x{model.config.image_size}; T={T}, {diffusion.mean_type} prediction, "
            f"{diffusion.var_type} variance, {'clipped' if meta.get('clip_denoised', True) else 'unclipped'} x0")


def _check_options(request: ConvertRequest) -> None:
    """The flags' values and --out's name (empty, or longer than the kernel takes: paths.check_path_length)."""
    if request.var_type is not None:
        check_choice("--var-type", request.var_type, ("fixedlarge", "fixedsmall"))
    if request.image_size is not None and request.image_size < 1:
        raise FastDDPMError(f"--image-size must be positive, got {request.image_size}")
    if not str(request.out).strip():
        raise FastDDPMError("--out is empty; give DST.safetensors or a folder")
    check_path_length(request.out, "--out", OutputError)
