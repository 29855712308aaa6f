"""Converters between fastddpm checkpoints and the other layouts of the DDPM U-Net.

    diffusers          a UNet2DModel folder: config.json + diffusion_pytorch_model.safetensors
                       (or .bin, read with torch.load(weights_only=True)), as google/ddpm-cifar10-32,
                       ddpm-ema-church-256, ddpm-celebahq-256 ...; the diffusion settings come from
                       scheduler_config.json beside it (or in ../scheduler/, as pipelines keep it)
    pytorch_diffusion  the PyTorch port of the original DDPM TensorFlow checkpoints
                       (pesser/pytorch_diffusion, `model-790000.ckpt` ...): a bare state dict,
                       read with torch.load(weights_only=True); the architecture is read off
                       the tensor shapes, the image size from `image_size` (guessed for the
                       published models: 32 for 4 levels, 256 for 6)
    fastddpm           our own checkpoint (fastddpm.checkpoint); converting one exports it to a
                       diffusers folder that UNet2DModel.from_pretrained and
                       DDPMScheduler.from_pretrained read

`convert(src, out)` detects the format of `src` from what it holds (not from its name) and
converts to fastddpm, or, for a fastddpm checkpoint, to diffusers.

The three layouts hold the same network (DDPM's U-Net, Ho et al. 2020 appendix B): the
differences are names and the attention projections. fastddpm fuses q, k and v into one
1x1 conv `qkv` [3C, C, 1, 1]; diffusers keeps three Linear layers to_q, to_k, to_v [C, C]
(named query, key, value and proj_attn in configs written before diffusers 0.13) and
pytorch_diffusion three 1x1 convs q, k, v. A 1x1 conv weight is a Linear weight with
[..., 1, 1]. GroupNorm epsilon is 1e-6 in both (TensorFlow's default), kept in
UNetConfig.norm_eps. Every key is accounted for: a missing, unexpected or mis-shaped tensor
stops the conversion with a CheckpointError that names the keys.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import FORMAT, load_checkpoint, save_checkpoint
from .diffusion import GaussianDiffusion
from .errors import CheckpointError, FastDDPMError, check_choice
from .files import atomic_write, atomic_write_bytes
from .schedule import make_betas
from .unet import UNet, UNetConfig, count_parameters

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
DIFFUSERS_CONFIG = "config.json"
SCHEDULER_CONFIG = "scheduler_config.json"
# The diffusers version whose UNet2DModel config has every key `diffusers_config` writes.
DIFFUSERS_VERSION = "0.24.0"
# DDPM's process (Ho et al. 2020, sec. 4): linear betas from 1e-4 to 0.02 over T = 1000.
DDPM_BETA_START, DDPM_BETA_END, DDPM_T = 1e-4, 0.02, 1000

# diffusers' "learned" takes the model output as the variance itself (ours, as IDDPM's, as its log), and its
# "fixed_large_log" step takes the square root of a log: neither has a counterpart here.
_VAR_FROM_DIFFUSERS = {"fixed_small": "fixedsmall", "fixed_small_log": "fixedsmall", "fixed_large": "fixedlarge",
                       "learned_range": "learned_range"}
_VAR_TO_DIFFUSERS = {"fixedsmall": "fixed_small", "fixedlarge": "fixed_large", "learned_range": "learned_range"}
_MEAN_FROM_DIFFUSERS = {"epsilon": "eps", "sample": "x0"}
_MEAN_TO_DIFFUSERS = {v: k for k, v in _MEAN_FROM_DIFFUSERS.items()}


@dataclass
class ConvertRequest:
    """Everything `fastddpm convert` takes (see `fastddpm convert --help`)."""

    src: str
    out: str
    image_size: int | None = None  # pytorch_diffusion only: the training resolution
    var_type: str | None = None  # override the reverse variance: fixedlarge | fixedsmall


# ------------------------------------------------------------------------------------- the layout
@dataclass(frozen=True)
class _Block:
    """One module of the U-Net under its three names. kind: res | attn | plain (conv, linear, norm)."""

    kind: str
    ours: str
    diffusers: str
    pytorch_diffusion: str


# Sub-module names inside a ResBlock and an attention block, per layout.
_RES = {"ours": ("norm1", "conv1", "emb_proj", "norm2", "conv2", "skip"),
        "diffusers": ("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut"),
        "pytorch_diffusion": ("norm1", "conv1", "temb_proj", "norm2", "conv2", "nin_shortcut")}
_ATTN = {"diffusers": ("group_norm", ("to_q", "to_k", "to_v"), "to_out.0"),
         "diffusers_legacy": ("group_norm", ("query", "key", "value"), "proj_attn"),
         "pytorch_diffusion": ("norm", ("q", "k", "v"), "proj_out")}


def _blocks(c: UNetConfig) -> list[_Block]:
    """Every module of the U-Net of config `c`, in the order fastddpm.unet.UNet builds them."""
    blocks = [_Block("plain", "time_embed.0", "time_embedding.linear_1", "temb.dense.0"),
              _Block("plain", "time_embed.2", "time_embedding.linear_2", "temb.dense.1"),
              _Block("plain", "conv_in", "conv_in", "conv_in")]
    levels, res, k = len(c.channel_mult), c.image_size, 0
    for level in range(levels):
        for j in range(c.num_res_blocks):
            blocks.append(_Block("res", f"down.{k}.0", f"down_blocks.{level}.resnets.{j}", f"down.{level}.block.{j}"))
            if res in c.attention_resolutions:
                blocks.append(_Block("attn", f"down.{k}.1", f"down_blocks.{level}.attentions.{j}",
                                     f"down.{level}.attn.{j}"))
            k += 1
        if level != levels - 1:
            blocks.append(_Block("plain", f"down.{k}.0.conv", f"down_blocks.{level}.downsamplers.0.conv",
                                 f"down.{level}.downsample.conv"))
            k += 1
            res //= 2
    blocks += [_Block("res", "mid.0", "mid_block.resnets.0", "mid.block_1"),
               _Block("attn", "mid.1", "mid_block.attentions.0", "mid.attn_1"),
               _Block("res", "mid.2", "mid_block.resnets.1", "mid.block_2")]
    k = 0
    for u, level in enumerate(reversed(range(levels))):
        attn = res in c.attention_resolutions
        for i in range(c.num_res_blocks + 1):
            blocks.append(_Block("res", f"up.{k}.0", f"up_blocks.{u}.resnets.{i}", f"up.{level}.block.{i}"))
            if attn:
                blocks.append(_Block("attn", f"up.{k}.1", f"up_blocks.{u}.attentions.{i}", f"up.{level}.attn.{i}"))
            if level and i == c.num_res_blocks:
                blocks.append(_Block("plain", f"up.{k}.{2 if attn else 1}.conv", f"up_blocks.{u}.upsamplers.0.conv",
                                     f"up.{level}.upsample.conv"))
                res *= 2
            k += 1
    blocks += [_Block("plain", "norm_out", "conv_norm_out", "norm_out"),
               _Block("plain", "conv_out", "conv_out", "conv_out")]
    return blocks


def _shown(keys) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


class _Source:
    """A foreign state dict being consumed: takes tensors by name, records what was used or missing."""

    def __init__(self, tensors: dict, name: str):
        self.tensors, self.name = tensors, name
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.shapes: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The tensor `key`, checked to have `shape`; None (and noted) when absent or mis-shaped."""
        if key not in self.tensors:
            self.missing.append(key)
            return None
        self.used.add(key)
        value = self.tensors[key]
        if tuple(value.shape) != tuple(shape):
            self.shapes.append(f"{key} {tuple(value.shape)} (expected {tuple(shape)})")
            return None
        return value

    def check(self) -> None:
        """Raise one CheckpointError naming every missing, unexpected and mis-shaped key."""
        unexpected = set(self.tensors) - self.used
        problems = [f"{label}: {_shown(keys)}" for label, keys in
                    (("missing keys", self.missing), ("unexpected keys", unexpected),
                     ("shape mismatches", self.shapes)) if keys]
        if problems:
            raise CheckpointError(f"{self.name} does not match the U-Net its config describes ({'; '.join(problems)})")


def _import_weights(tensors: dict, config: UNetConfig, layout: str, name: str) -> dict:
    """Foreign state dict (layout "diffusers" or "pytorch_diffusion") -> fastddpm state dict for `config`."""
    with torch.device("meta"):
        own = UNet(config).state_dict()
    src = _Source(tensors, name)
    out: dict[str, torch.Tensor] = {}
    linear = layout == "diffusers"  # diffusers' attention projections are Linear, not 1x1 conv

    def copy(ours: str, theirs: str) -> None:
        value = src.take(theirs, own[ours].shape)
        if value is not None:
            out[ours] = value

    for b in _blocks(config):
        theirs = getattr(b, layout)
        if b.kind == "plain":
            for p in ("weight", "bias"):
                copy(f"{b.ours}.{p}", f"{theirs}.{p}")
        elif b.kind == "res":
            for ours_name, their_name in zip(_RES["ours"], _RES[layout]):
                if f"{b.ours}.{ours_name}.weight" in own:  # no skip conv when the channels stay
                    for p in ("weight", "bias"):
                        copy(f"{b.ours}.{ours_name}.{p}", f"{theirs}.{their_name}.{p}")
        else:
            style = "diffusers_legacy" if linear and src.has(f"{theirs}.query.weight") else layout
            norm, qkv, proj = _ATTN[style]
            C = own[f"{b.ours}.proj.weight"].shape[0]
            wshape = (C, C) if linear else (C, C, 1, 1)
            for p in ("weight", "bias"):
                copy(f"{b.ours}.norm.{p}", f"{theirs}.{norm}.{p}")
            ws = [src.take(f"{theirs}.{n}.weight", wshape) for n in qkv]
            bs = [src.take(f"{theirs}.{n}.bias", (C,)) for n in qkv]
            pw = src.take(f"{theirs}.{proj}.weight", wshape)
            pb = src.take(f"{theirs}.{proj}.bias", (C,))
            if all(w is not None for w in ws):
                out[f"{b.ours}.qkv.weight"] = torch.cat(ws).reshape(3 * C, C, 1, 1)
            if all(v is not None for v in bs):
                out[f"{b.ours}.qkv.bias"] = torch.cat(bs)
            if pw is not None:
                out[f"{b.ours}.proj.weight"] = pw.reshape(C, C, 1, 1)
            if pb is not None:
                out[f"{b.ours}.proj.bias"] = pb
    src.check()
    return {k: v.to(torch.float32).contiguous() for k, v in out.items()}


def diffusers_state_dict(model: UNet) -> dict:
    """fastddpm U-Net -> a diffusers UNet2DModel state dict (current names: to_q, to_k, to_v, to_out.0)."""
    c, own = model.config, model.state_dict()
    out = {}
    for b in _blocks(c):
        if b.kind == "plain":
            for p in ("weight", "bias"):
                out[f"{b.diffusers}.{p}"] = own[f"{b.ours}.{p}"]
        elif b.kind == "res":
            for ours_name, their_name in zip(_RES["ours"], _RES["diffusers"]):
                if f"{b.ours}.{ours_name}.weight" in own:
                    for p in ("weight", "bias"):
                        out[f"{b.diffusers}.{their_name}.{p}"] = own[f"{b.ours}.{ours_name}.{p}"]
        else:
            norm, qkv, proj = _ATTN["diffusers"]
            C = own[f"{b.ours}.proj.weight"].shape[0]
            for p in ("weight", "bias"):
                out[f"{b.diffusers}.{norm}.{p}"] = own[f"{b.ours}.norm.{p}"]
            for n, w, bias in zip(qkv, own[f"{b.ours}.qkv.weight"].reshape(3, C, C),
                                  own[f"{b.ours}.qkv.bias"].reshape(3, C)):
                out[f"{b.diffusers}.{n}.weight"], out[f"{b.diffusers}.{n}.bias"] = w, bias
            out[f"{b.diffusers}.{proj}.weight"] = own[f"{b.ours}.proj.weight"].reshape(C, C)
            out[f"{b.diffusers}.{proj}.bias"] = own[f"{b.ours}.proj.bias"]
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


# ------------------------------------------------------------------------------------ diffusers config
def _unsupported(key: str, value, why: str) -> CheckpointError:
    return CheckpointError(f"diffusers config {key}={value!r} is not supported: {why}")


def unet_config_from_diffusers(cfg: dict) -> UNetConfig:
    """A UNet2DModel config.json (dict) -> UNetConfig, or a CheckpointError naming the first setting
    fastddpm's DDPM U-Net cannot represent. Missing keys take UNet2DModel's defaults, except
    attention_head_dim: configs written before diffusers had it (the ddpm-* family) meant one head."""
    def get(key, default):
        return cfg.get(key, default)

    if get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise _unsupported("_class_name", cfg["_class_name"], "only UNet2DModel converts")
    fixed = {"time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 1,
             "center_input_sample": False, "downsample_padding": 0, "act_fn": "silu",
             "mid_block_type": "UNetMidBlock2D", "add_attention": True, "resnet_time_scale_shift": "default",
             "class_embed_type": None, "num_class_embeds": None, "downsample_type": "conv",
             "upsample_type": "conv", "mid_block_scale_factor": 1}
    defaults = {"time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0,
                "center_input_sample": False, "downsample_padding": 1, "act_fn": "silu",
                "mid_block_type": "UNetMidBlock2D", "add_attention": True, "resnet_time_scale_shift": "default",
                "class_embed_type": None, "num_class_embeds": None, "downsample_type": "conv",
                "upsample_type": "conv", "mid_block_scale_factor": 1}
    for key, want in fixed.items():
        value = get(key, defaults[key])
        if value != want:
            raise _unsupported(key, value, f"fastddpm's DDPM U-Net has {key}={want!r}")

    channels = [int(x) for x in get("block_out_channels", (224, 448, 672, 896))]
    ch = channels[0]
    if any(x % ch for x in channels):
        raise _unsupported("block_out_channels", channels, f"every width must be a multiple of the first ({ch})")
    if get("time_embedding_dim", None) not in (None, 4 * ch):
        raise _unsupported("time_embedding_dim", cfg["time_embedding_dim"], f"fastddpm uses 4 x {ch} = {4 * ch}")
    down = list(get("down_block_types", ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")))
    up = list(get("up_block_types", ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")))
    if len(down) != len(channels) or len(up) != len(channels):
        raise CheckpointError(f"diffusers config has {len(channels)} block_out_channels but {len(down)} down and "
                              f"{len(up)} up block types")
    for key, types, plain, attn in (("down_block_types", down, "DownBlock2D", "AttnDownBlock2D"),
                                    ("up_block_types", up, "UpBlock2D", "AttnUpBlock2D")):
        bad = [t for t in types if t not in (plain, attn)]
        if bad:
            raise _unsupported(key, bad, f"fastddpm converts only {plain} and {attn}")
    attn_levels = [i for i, t in enumerate(down) if t == "AttnDownBlock2D"]
    if attn_levels != [i for i, t in enumerate(reversed(up)) if t == "AttnUpBlock2D"]:
        raise _unsupported("up_block_types", up, f"attention must sit at the same levels as in {down}")
    head_dim = get("attention_head_dim", None)
    for i in attn_levels + [len(channels) - 1]:
        if head_dim is not None and head_dim != channels[i]:
            raise _unsupported("attention_head_dim", head_dim,
                               f"that is {channels[i] // head_dim} heads at {channels[i]} channels; "
                               "fastddpm's DDPM attention has one head (attention_head_dim null)")
    groups = int(get("norm_num_groups", 32))
    if get("attn_norm_num_groups", None) not in (None, groups):
        raise _unsupported("attn_norm_num_groups", cfg["attn_norm_num_groups"], f"fastddpm uses norm_num_groups={groups}")
    size = get("sample_size", None)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise _unsupported("sample_size", size, "fastddpm's images are square")
        size = size[0]
    if size is None:
        raise CheckpointError("diffusers config has no sample_size; fastddpm needs the image size")
    in_ch, out_ch = int(get("in_channels", 3)), int(get("out_channels", 3))
    if out_ch not in (in_ch, 2 * in_ch):
        raise _unsupported("out_channels", out_ch, f"fastddpm predicts {in_ch} channels, or {2 * in_ch} with "
                                                   "learned variances, for in_channels={in_ch}")
    return UNetConfig(image_size=int(size), in_channels=in_ch, model_channels=ch,
                      channel_mult=tuple(x // ch for x in channels), num_res_blocks=int(get("layers_per_block", 2)),
                      attention_resolutions=tuple(int(size) >> i for i in attn_levels),
                      dropout=float(get("dropout", 0.0)), num_groups=groups, learn_sigma=out_ch == 2 * in_ch,
                      norm_eps=float(get("norm_eps", 1e-5)))


def diffusers_config(c: UNetConfig) -> dict:
    """UNetConfig -> the UNet2DModel config.json that builds the same network (one head, TF padding)."""
    levels = len(c.channel_mult)
    attn = [c.image_size >> i in c.attention_resolutions for i in range(levels)]
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu", "add_attention": True, "attention_head_dim": None, "attn_norm_num_groups": None,
        "block_out_channels": [c.model_channels * m for m in c.channel_mult], "center_input_sample": False,
        "class_embed_type": None,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "downsample_padding": 0, "downsample_type": "conv", "dropout": c.dropout, "flip_sin_to_cos": False,
        "freq_shift": 1, "in_channels": c.in_channels, "layers_per_block": c.num_res_blocks,
        "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2D", "norm_eps": c.norm_eps,
        "norm_num_groups": c.num_groups, "num_class_embeds": None, "num_train_timesteps": None,
        "out_channels": c.out_channels, "resnet_time_scale_shift": "default", "sample_size": c.image_size,
        "time_embedding_dim": None, "time_embedding_type": "positional",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "upsample_type": "conv",
    }


# --------------------------------------------------------------------------- diffusion settings
def ddpm_betas(beta_start: float, beta_end: float, T: int) -> torch.Tensor:
    """Linear betas from beta_start to beta_end over T steps, float64 [T] (DDPM sec. 4)."""
    if (beta_start, beta_end) == (DDPM_BETA_START, DDPM_BETA_END):
        return make_betas("linear", T) if T == DDPM_T else torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def diffusion_from_scheduler(sched: dict, var_type: str | None = None) -> tuple[GaussianDiffusion, dict]:
    """A diffusers scheduler config (DDPMScheduler's keys and defaults) -> (process, meta)."""
    def get(key, default):
        return sched.get(key, default)

    T = int(get("num_train_timesteps", 1000))
    start, end = float(get("beta_start", 0.0001)), float(get("beta_end", 0.02))
    schedule = get("beta_schedule", "linear")
    if get("trained_betas", None) is not None:
        betas = torch.tensor(sched["trained_betas"], dtype=torch.float64)
    elif schedule == "linear":
        betas = ddpm_betas(start, end, T)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = make_betas("cosine", T)
    else:
        raise _unsupported("beta_schedule", schedule, "fastddpm reads linear, scaled_linear, squaredcos_cap_v2 "
                                                      "or trained_betas")
    variance = get("variance_type", "fixed_small")
    if variance not in _VAR_FROM_DIFFUSERS:
        raise _unsupported("variance_type", variance, f"fastddpm reads {', '.join(_VAR_FROM_DIFFUSERS)}")
    prediction = get("prediction_type", "epsilon")
    if prediction not in _MEAN_FROM_DIFFUSERS:
        raise _unsupported("prediction_type", prediction, "fastddpm reads epsilon and sample")
    if get("thresholding", False):
        raise _unsupported("thresholding", True, "fastddpm clips x0 to [-1, 1] (clip_sample), it does not threshold")
    clip = bool(get("clip_sample", True))
    if clip and float(get("clip_sample_range", 1.0)) != 1.0:
        raise _unsupported("clip_sample_range", sched["clip_sample_range"], "fastddpm clips x0 to [-1, 1]")
    var = var_type or _VAR_FROM_DIFFUSERS[variance]
    diffusion = GaussianDiffusion(betas, mean_type=_MEAN_FROM_DIFFUSERS[prediction], var_type=var)
    return diffusion, {"clip_denoised": clip}


def ddpm_diffusion(image_size: int, var_type: str | None = None) -> tuple[GaussianDiffusion, dict]:
    """DDPM's own settings: linear 1e-4..0.02, T = 1000, eps prediction, clipping; sigma^2 = beta
    (fixedlarge) for CIFAR-10 (32 x 32) and betatilde (fixedsmall) for the 256 x 256 models, as the
    published checkpoints were sampled."""
    var = var_type or ("fixedlarge" if image_size == 32 else "fixedsmall")
    return GaussianDiffusion(ddpm_betas(DDPM_BETA_START, DDPM_BETA_END, DDPM_T), "eps", var), {"clip_denoised": True}


def scheduler_config(diffusion: GaussianDiffusion, clip: bool = True) -> dict:
    """GaussianDiffusion -> a DDPMScheduler scheduler_config.json describing the same process."""
    if diffusion.mean_type not in _MEAN_TO_DIFFUSERS:
        raise FastDDPMError(f"diffusers' DDPMScheduler has no mean_type {diffusion.mean_type!r} (it reads eps and x0)")
    if diffusion.var_type not in _VAR_TO_DIFFUSERS:
        raise FastDDPMError(f"diffusers' DDPMScheduler has no var_type {diffusion.var_type!r} "
                            f"(it reads {', '.join(_VAR_TO_DIFFUSERS)})")
    betas = diffusion.schedule.betas
    T = len(betas)
    cfg = {"_class_name": "DDPMScheduler", "_diffusers_version": DIFFUSERS_VERSION, "num_train_timesteps": T,
           "variance_type": _VAR_TO_DIFFUSERS[diffusion.var_type], "clip_sample": clip, "clip_sample_range": 1.0,
           "prediction_type": _MEAN_TO_DIFFUSERS[diffusion.mean_type], "thresholding": False}
    start, end = float(betas[0]), float(betas[-1])
    linear = torch.allclose(betas, torch.linspace(start, end, T, dtype=torch.float64), rtol=1e-12, atol=0.0)
    # diffusers uses trained_betas, when given, over the schedule
    cfg.update(beta_schedule="linear", beta_start=start, beta_end=end, trained_betas=None if linear else betas.tolist())
    return cfg


# -------------------------------------------------------------------------------- reading files
def _read_json(path: Path) -> dict:
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
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({e})") from None


def _read_torch(path: Path) -> dict:
    """A state dict saved with torch.save, read with weights_only=True (nothing else is unpickled)."""
    import pickle

    try:
        value = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
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
    with open(path, "rb") as f:
        head = f.read(9)
    is_zip_or_pickle = head[:2] == b"PK" or head[:1] == b"\x80"
    if not is_zip_or_pickle and len(head) >= 9 and head[8:9] == b"{":
        return _read_safetensors(path)
    return _read_torch(path), {}


def _scheduler_config_near(folder: Path) -> Path | None:
    for p in (folder / SCHEDULER_CONFIG, folder / "scheduler" / SCHEDULER_CONFIG,
              folder.parent / "scheduler" / SCHEDULER_CONFIG):
        if p.is_file():
            return p
    return None


def _diffusers_folder(folder: Path) -> tuple[Path, Path]:
    """(config.json, weights file) of a UNet2DModel folder, or of a pipeline folder's unet/."""
    for f in (folder, folder / "unet"):
        if (f / DIFFUSERS_CONFIG).is_file():
            for name in DIFFUSERS_WEIGHTS:
                if (f / name).is_file():
                    return f / DIFFUSERS_CONFIG, f / name
            raise CheckpointError(f"{str(f)!r} has a config.json but no {' or '.join(DIFFUSERS_WEIGHTS)}")
    raise CheckpointError(f"{str(folder)!r} is not a diffusers UNet2DModel folder (no config.json in it or in "
                          f"{str(folder / 'unet')!r})")


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
    config = unet_config_from_diffusers(_read_json(config_path))
    model = _built(config, _import_weights(weights, config, "diffusers", f"{str(config_path.parent)!r}"))
    sched = _scheduler_config_near(config_path.parent)
    if sched is not None:
        diffusion, meta = diffusion_from_scheduler(_read_json(sched), var_type)
        meta["scheduler_config"] = str(sched)
    else:
        diffusion, meta = ddpm_diffusion(config.image_size, var_type)
        print(f"fastddpm: no {SCHEDULER_CONFIG} beside {str(config_path.parent)!r}: assuming DDPM's process "
              f"(linear betas, T=1000, {diffusion.var_type}, clipping)", file=sys.stderr)
    return model, diffusion, meta


def pytorch_diffusion_config(tensors: dict, image_size: int | None = None) -> UNetConfig:
    """The UNetConfig of a pytorch_diffusion state dict, read off its tensor shapes.

    image_size is not in the weights: it is guessed for the published models (4 levels: CIFAR-10,
    32; 6 levels: LSUN / CelebA-HQ, 256) and must be given otherwise.
    """
    try:
        conv_in, conv_out = tensors["conv_in.weight"], tensors["conv_out.weight"]
    except KeyError as e:
        raise CheckpointError(f"pytorch_diffusion state dict lacks {e.args[0]!r}") from None
    ch, in_ch = int(conv_in.shape[0]), int(conv_in.shape[1])
    level_ids = {k.split(".")[1] for k in tensors if k.startswith("down.")}
    block_ids = {k.split(".")[3] for k in tensors if k.startswith("down.0.block.")}
    if not level_ids or not block_ids or not all(i.isdigit() for i in level_ids | block_ids):
        raise CheckpointError("pytorch_diffusion state dict has no down.<level>.block.<i>.* keys")
    levels, blocks = 1 + max(map(int, level_ids)), 1 + max(map(int, block_ids))
    mult = []
    for i in range(levels):
        w = tensors.get(f"down.{i}.block.0.conv1.weight")
        if w is None:
            raise CheckpointError(f"pytorch_diffusion state dict lacks 'down.{i}.block.0.conv1.weight'")
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
    return UNetConfig(image_size=image_size, in_channels=in_ch, model_channels=ch, channel_mult=tuple(mult),
                      num_res_blocks=blocks, attention_resolutions=tuple(image_size >> i for i in attn_levels),
                      dropout=0.1 if image_size == 32 else 0.0, num_groups=32, learn_sigma=out_ch == 2 * in_ch,
                      norm_eps=1e-6)


def from_pytorch_diffusion(path: Path, tensors: dict, image_size: int | None = None,
                           var_type: str | None = None) -> tuple[UNet, GaussianDiffusion, dict]:
    """A pytorch_diffusion `model-*.ckpt` state dict -> (model, diffusion with DDPM's settings, meta)."""
    config = pytorch_diffusion_config(tensors, image_size)
    model = _built(config, _import_weights(tensors, config, "pytorch_diffusion", f"{str(path)!r}"))
    diffusion, meta = ddpm_diffusion(config.image_size, var_type)
    return model, diffusion, meta


def export_diffusers(src, out) -> Path:
    """Write a fastddpm checkpoint as a diffusers folder: config.json, diffusion_pytorch_model.safetensors
    and scheduler_config.json (UNet2DModel.from_pretrained / DDPMScheduler.from_pretrained read it)."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FastDDPMError(f"--out {str(out)!r} is a file; exporting to diffusers writes a folder")
    if out.suffix == ".safetensors":
        raise FastDDPMError(f"{str(src)!r} is already a fastddpm checkpoint; converting it exports a diffusers "
                            f"folder, so --out should name a folder, not {str(out)!r}")
    model, diffusion, meta = load_checkpoint(src)
    weights = diffusers_state_dict(model)
    unet_cfg = json.dumps(diffusers_config(model.config), indent=2) + "\n"
    sched_cfg = json.dumps(scheduler_config(diffusion, bool(meta.get("clip_denoised", True))), indent=2) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / DIFFUSERS_WEIGHTS[0], lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
    atomic_write_bytes(out / SCHEDULER_CONFIG, sched_cfg.encode())
    atomic_write_bytes(out / DIFFUSERS_CONFIG, unet_cfg.encode())
    return out


def convert(request: ConvertRequest) -> str:
    """Convert request.src (format detected) and write request.out; returns a one-line summary."""
    if request.var_type is not None:
        check_choice("--var-type", request.var_type, ("fixedlarge", "fixedsmall"))
    if request.image_size is not None and request.image_size < 1:
        raise FastDDPMError(f"--image-size must be positive, got {request.image_size}")
    src = Path(request.src)
    if not src.exists():
        raise CheckpointError(f"{str(src)!r} does not exist")
    if Path(request.out).resolve() == src.resolve():
        raise FastDDPMError(f"--out {request.out!r} is SRC itself; write the conversion somewhere else")
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
        return f"wrote diffusers UNet2DModel folder {out} (config.json, {DIFFUSERS_WEIGHTS[0]}, {SCHEDULER_CONFIG})"
    if fmt == "diffusers":
        if not config_path.is_file():
            raise CheckpointError(f"{str(src)!r} holds diffusers weights but there is no config.json beside it")
        if request.image_size is not None:
            raise FastDDPMError("--image-size is for pytorch_diffusion checkpoints; a diffusers config gives sample_size")
        model, diffusion, meta = from_diffusers(config_path, tensors, request.var_type)
    else:
        model, diffusion, meta = from_pytorch_diffusion(src, tensors, request.image_size, request.var_type)
    if Path(request.out).is_dir():
        raise FastDDPMError(f"--out {request.out!r} is a folder; importing writes one DST.safetensors file")
    save_checkpoint(request.out, model, diffusion, converted_from=fmt, source=str(src), **meta)
    T = diffusion.num_timesteps
    return (f"wrote {request.out}: {fmt} U-Net, {count_parameters(model):,} parameters, "
            f"{model.config.image_size}x{model.config.image_size}; T={T}, {diffusion.mean_type} prediction, "
            f"{diffusion.var_type} variance, {'clipped' if meta.get('clip_denoised', True) else 'unclipped'} x0")
