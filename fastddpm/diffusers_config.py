"""diffusers configs <-> fastddpm: UNet2DModel's config.json and DDPMScheduler's scheduler_config.json.

    unet_config_from_diffusers(cfg)        config.json dict -> UNetConfig (or a CheckpointError naming
                                           the first setting fastddpm's DDPM U-Net cannot represent)
    diffusers_config(c)                    UNetConfig -> config.json dict
    diffusion_from_scheduler(sched)        scheduler_config.json dict -> (GaussianDiffusion, meta)
    scheduler_config(diffusion)            GaussianDiffusion -> scheduler_config.json dict
    ddpm_diffusion(image_size)             DDPM's own process, when a folder has no scheduler config
    pipeline_index()                       the model_index.json of a DDPMPipeline folder
    unet_of_index(index)                   check that a model_index.json's unet is a UNet2DModel

A config is user input: every number is type- and range-checked (a string, a zero, a negative
or a bool where a count belongs is a CheckpointError naming the key), and the resulting
UNetConfig goes through fastddpm.validate like a checkpoint's.

A scheduler config is read key by key; nothing is silently ignored that could change the
process the weights were trained with or how fastddpm samples it. DDPMScheduler's keys in
diffusers 0.42, and the legacy keys the published ddpm-* configs (diffusers 0.1) carry:

    key                          decision
    num_train_timesteps          read: T, an integer in [1, 100000]
    beta_start, beta_end         read: numbers in (0, 1] (they define linear and scaled_linear)
    beta_schedule                read: linear, scaled_linear, squaredcos_cap_v2 (= fastddpm's cosine);
                                 sigmoid and laplace refused (not implemented here)
    trained_betas                read: a list of numbers, used over beta_schedule as diffusers does; its
                                 length must equal num_train_timesteps (diffusers steps through that many)
    variance_type                read: fixed_small, fixed_small_log -> fixedsmall; fixed_large ->
                                 fixedlarge; learned_range; refused: learned (the variance itself, where
                                 ours is its log) and fixed_large_log (diffusers takes sqrt of a log)
    prediction_type              read: epsilon -> eps, sample -> x0; v_prediction refused
    predict_epsilon              read (legacy, before prediction_type): true = epsilon, false = sample;
                                 refused when it disagrees with prediction_type
    clip_sample                  read: clip x0 to [-1, 1] while sampling (meta clip_denoised)
    clip_sample_range            read: must be 1.0 when clip_sample (fastddpm clips to [-1, 1]); a
                                 positive number, unused, otherwise
    thresholding                 read: must be false (dynamic thresholding is not fastddpm's clipping)
    rescale_betas_zero_snr       read: must be false. True rescales sqrt(alphabar) so that alphabar at
                                 t = T-1 is exactly 0 (its beta exactly 1), whatever the betas were; x0 =
                                 (x_t - sqrt(1 - alphabar) eps) / sqrt(alphabar) then divides by zero,
                                 and schedule.check_betas refuses such a process, so it is refused here
                                 instead of being converted to the un-rescaled betas
    _class_name                  read: DDPMScheduler (or absent); another scheduler's config has other
                                 keys and defaults (DDIMScheduler has no variance_type): refused
    dynamic_thresholding_ratio   ignored: used only with thresholding (which must be false); a number
                                 in (0, 1]
    sample_max_value             ignored: used only with thresholding; a positive number
    timestep_spacing             ignored: inference only (which steps a shortened sampler visits:
                                 fastddpm's --spacing); linspace, leading or trailing
    steps_offset                 ignored: inference only (shifts those steps); an integer >= 0
    _diffusers_version,          ignored: diffusers' bookkeeping (the writing version, the source, the
    _name_or_path,               keys left at their defaults); strings, a list
    _use_default_values
    tensor_format                ignored (legacy, diffusers 0.1-0.3): the array type of outputs, pt or np
    timestep_values              ignored (legacy, diffusers 0.1): an unused placeholder; must be null
    any other key                refused, named

An ignored key still holds a value diffusers would write there; anything else is refused too.
"""
from __future__ import annotations

import math

import torch

from .diffusion import GaussianDiffusion
from .errors import CheckpointError, FastDDPMError
from .schedule import MAX_TIMESTEPS, make_betas
from .unet import UNetConfig
from .validate import unet_config as validated_unet_config

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


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Scheduler keys fastddpm reads (the module docstring's table says how).
_SCHEDULER_READ = frozenset({"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                             "variance_type", "prediction_type", "predict_epsilon", "clip_sample",
                             "clip_sample_range", "thresholding", "rescale_betas_zero_snr", "_class_name"})
# Scheduler keys that change neither the trained process nor fastddpm's sampling of it:
# key -> (check of the value, what the value must be, why the key is ignored).
_SCHEDULER_IGNORED = {
    "dynamic_thresholding_ratio": (lambda v: _is_real(v) and 0 < v <= 1, "a number in (0, 1]",
                                   "used only with thresholding, which must be false"),
    "sample_max_value": (lambda v: _is_real(v) and v > 0, "a positive number",
                         "used only with thresholding, which must be false"),
    "timestep_spacing": (lambda v: v in ("linspace", "leading", "trailing"), "linspace, leading or trailing",
                         "inference only: fastddpm's --spacing chooses the steps"),
    "steps_offset": (lambda v: _is_int(v) and v >= 0, "an integer >= 0", "inference only"),
    "_diffusers_version": (lambda v: isinstance(v, str), "a version string", "diffusers' bookkeeping"),
    "_name_or_path": (lambda v: isinstance(v, str), "a string", "diffusers' bookkeeping"),
    "_use_default_values": (lambda v: isinstance(v, list) and all(isinstance(k, str) for k in v),
                            "a list of key names", "diffusers' bookkeeping"),
    "tensor_format": (lambda v: v in ("pt", "np"), "pt or np", "diffusers 0.1-0.3: the array type of outputs"),
    "timestep_values": (lambda v: v is None, "null", "diffusers 0.1: an unused placeholder"),
}


def _unsupported(key: str, value, why: str) -> CheckpointError:
    return CheckpointError(f"diffusers config {key}={value!r} is not supported: {why}")


def _count(cfg: dict, key: str, default, low: int = 1, high: int | None = None) -> int:
    """cfg[key] as an int in [low, high]; strings, floats, bools and out-of-range values are refused."""
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise CheckpointError(f"diffusers config {key}={value!r} must be an integer {bound}")
    return value


def _real(cfg: dict, key: str, default, low: float, high: float, low_open: bool = False) -> float:
    """cfg[key] as a finite float in [low, high] ((low, high] with low_open)."""
    value = cfg.get(key, default)
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or not (low < value if low_open else low <= value) or value > high:
        raise CheckpointError(f"diffusers config {key}={value!r} must be a number in "
                              f"{'(' if low_open else '['}{low}, {high}]")
    return float(value)


def _names(cfg: dict, key: str, default) -> list:
    value = cfg.get(key, default)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise CheckpointError(f"diffusers config {key}={value!r} must be a list of block type names")
    return list(value)


def unet_config_from_diffusers(cfg: dict) -> UNetConfig:
    """A UNet2DModel config.json (dict) -> UNetConfig, or a CheckpointError naming the first setting
    fastddpm's DDPM U-Net cannot represent or that is not a valid value (a string, zero or negative
    count). Missing keys take UNet2DModel's defaults, except attention_head_dim: configs written
    before diffusers had it (the ddpm-* family) meant one head."""
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

    channels = get("block_out_channels", [224, 448, 672, 896])
    if not isinstance(channels, (list, tuple)) or not channels:
        raise CheckpointError(f"diffusers config block_out_channels={channels!r} must be a list of widths")
    channels = [_count({"block_out_channels": x}, "block_out_channels", None) for x in channels]
    ch = channels[0]
    if any(x % ch for x in channels):
        raise _unsupported("block_out_channels", channels, f"every width must be a multiple of the first ({ch})")
    if get("time_embedding_dim", None) not in (None, 4 * ch):
        raise _unsupported("time_embedding_dim", cfg["time_embedding_dim"], f"fastddpm uses 4 x {ch} = {4 * ch}")
    down = _names(cfg, "down_block_types", ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"))
    up = _names(cfg, "up_block_types", ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
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
    head_dim = None if get("attention_head_dim", None) is None else _count(cfg, "attention_head_dim", None)
    for i in attn_levels + [len(channels) - 1]:
        if head_dim is not None and head_dim != channels[i]:
            raise _unsupported("attention_head_dim", head_dim,
                               f"that is {channels[i] / head_dim:g} heads at {channels[i]} channels; "
                               "fastddpm's DDPM attention has one head (attention_head_dim null)")
    groups = _count(cfg, "norm_num_groups", 32)
    if get("attn_norm_num_groups", None) not in (None, groups):
        raise _unsupported("attn_norm_num_groups", cfg["attn_norm_num_groups"], f"fastddpm uses norm_num_groups={groups}")
    size = get("sample_size", None)
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _unsupported("sample_size", size, "fastddpm's images are square")
        size = size[0]
    if size is None:
        raise CheckpointError("diffusers config has no sample_size; fastddpm needs the image size")
    size = _count({"sample_size": size}, "sample_size", None)
    in_ch, out_ch = _count(cfg, "in_channels", 3), _count(cfg, "out_channels", 3)
    if out_ch not in (in_ch, 2 * in_ch):
        raise _unsupported("out_channels", out_ch, f"fastddpm predicts {in_ch} channels, or {2 * in_ch} with "
                                                   "learned variances, for in_channels={in_ch}")
    # the remaining bounds (sizes, widths, parameter count) are fastddpm.validate's, as for a checkpoint
    return validated_unet_config(dict(
        image_size=size, in_channels=in_ch, model_channels=ch, channel_mult=[x // ch for x in channels],
        num_res_blocks=_count(cfg, "layers_per_block", 2), attention_resolutions=[size >> i for i in attn_levels],
        dropout=_real(cfg, "dropout", 0.0, 0.0, 1.0), num_groups=groups, learn_sigma=out_ch == 2 * in_ch,
        norm_eps=_real(cfg, "norm_eps", 1e-5, 0.0, 1.0, low_open=True)), "diffusers config")


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
    """A diffusers scheduler config (DDPMScheduler's keys and defaults) -> (process, meta).

    Every key is checked as the module docstring's table says (CheckpointError naming the key): T a
    positive integer, beta_start and beta_end in (0, 1], trained_betas a list of T numbers, the
    resulting betas in (0, 1); a setting fastddpm cannot honour, and a key it does not know, are
    refused rather than ignored. var_type, when given, overrides variance_type (--var-type).
    meta is {"clip_denoised": clip_sample}.
    """
    _check_scheduler_keys(sched)
    T = _count(sched, "num_train_timesteps", 1000, 1, MAX_TIMESTEPS)
    betas = _scheduler_betas(sched, T)
    mean_type = _scheduler_mean_type(sched)
    variance = sched.get("variance_type", "fixed_small")
    if not isinstance(variance, str) or variance not in _VAR_FROM_DIFFUSERS:
        raise _unsupported("variance_type", variance, f"fastddpm reads {', '.join(_VAR_FROM_DIFFUSERS)}")
    clip = _scheduler_clip(sched)
    try:
        diffusion = GaussianDiffusion(betas, mean_type=mean_type, var_type=var_type or _VAR_FROM_DIFFUSERS[variance])
    except FastDDPMError as e:
        raise CheckpointError(f"scheduler config gives an unusable process ({e})") from None
    if len(betas) != T:  # diffusers would step through T timesteps over a table of len(betas)
        raise CheckpointError(f"scheduler config trained_betas holds {len(betas)} values but num_train_timesteps "
                              f"is {T}; they must agree")
    return diffusion, {"clip_denoised": clip}


def _check_scheduler_keys(sched: dict) -> None:
    """Refuse unknown keys, another scheduler class, and ignored keys holding values diffusers never writes."""
    unknown = sorted(str(k) for k in sched if k not in _SCHEDULER_READ and k not in _SCHEDULER_IGNORED)
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        shown = ", ".join(repr(k[:40]) for k in unknown[:5]) + more
        raise CheckpointError(f"scheduler config has keys fastddpm does not know ({shown}); it reads DDPMScheduler's "
                              "keys and refuses others rather than ignore a setting that may change the process")
    name = sched.get("_class_name", "DDPMScheduler")
    if name != "DDPMScheduler":
        raise _unsupported("_class_name", name, "fastddpm reads DDPMScheduler configs; if this one describes a "
                                                "DDPM process, save DDPMScheduler.from_config(config) first")
    for key, (ok, expected, why) in _SCHEDULER_IGNORED.items():
        if key in sched and not ok(sched[key]):
            raise CheckpointError(f"scheduler config {key}={_short(sched[key])} is not {expected}; fastddpm ignores "
                                  f"{key} ({why}) but not a value diffusers would not write")
    zero_snr = sched.get("rescale_betas_zero_snr", False)
    if not isinstance(zero_snr, bool):
        raise CheckpointError(f"scheduler config rescale_betas_zero_snr={_short(zero_snr)} must be true or false")
    if zero_snr:
        raise _unsupported("rescale_betas_zero_snr", True,
                           "rescaling to zero terminal SNR (Lin et al. 2023, alg. 1) makes alphabar at t=T-1 "
                           "exactly 0 (its beta 1), where x0 cannot be recovered from x_t; fastddpm keeps every "
                           "beta in (0, 1)")
    if sched.get("thresholding", False) is not False:
        raise _unsupported("thresholding", sched["thresholding"],
                           "fastddpm clips x0 to [-1, 1] (clip_sample), it does not threshold")


def _scheduler_betas(sched: dict, T: int) -> torch.Tensor:
    """The float64 betas [K] a scheduler config describes (trained_betas over beta_schedule, as diffusers)."""
    start = _real(sched, "beta_start", 0.0001, 0.0, 1.0, low_open=True)
    end = _real(sched, "beta_end", 0.02, 0.0, 1.0, low_open=True)
    schedule = sched.get("beta_schedule", "linear")
    if sched.get("trained_betas", None) is not None:
        trained = sched["trained_betas"]
        if not isinstance(trained, list) or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                                    for b in trained):
            raise CheckpointError(f"scheduler config trained_betas must be a list of numbers, not {trained!r:.60}")
        if not 1 <= len(trained) <= MAX_TIMESTEPS:
            raise CheckpointError(f"scheduler config trained_betas holds {len(trained)} values; 1 to "
                                  f"{MAX_TIMESTEPS} are supported")
        return torch.tensor(trained, dtype=torch.float64)
    if schedule == "linear":
        return ddpm_betas(start, end, T)
    if schedule == "scaled_linear":
        return torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2
    if schedule == "squaredcos_cap_v2":
        return make_betas("cosine", T)
    raise _unsupported("beta_schedule", schedule, "fastddpm reads linear, scaled_linear, squaredcos_cap_v2 "
                                                  "or trained_betas")


def _scheduler_mean_type(sched: dict) -> str:
    """eps or x0, from prediction_type (or the legacy predict_epsilon; both must agree when both are given)."""
    prediction = sched.get("prediction_type", "epsilon")
    if not isinstance(prediction, str) or prediction not in _MEAN_FROM_DIFFUSERS:
        raise _unsupported("prediction_type", prediction, "fastddpm reads epsilon and sample")
    if "predict_epsilon" in sched:
        legacy = sched["predict_epsilon"]
        if not isinstance(legacy, bool):
            raise CheckpointError(f"scheduler config predict_epsilon={_short(legacy)} must be true or false")
        implied = "epsilon" if legacy else "sample"
        if "prediction_type" in sched and prediction != implied:
            raise CheckpointError(f"scheduler config predict_epsilon={legacy} and prediction_type={prediction!r} "
                                  "disagree")
        prediction = implied
    return _MEAN_FROM_DIFFUSERS[prediction]


def _scheduler_clip(sched: dict) -> bool:
    """clip_sample; clipping is to [-1, 1] only (clip_sample_range 1), the range is unused without it."""
    clip = sched.get("clip_sample", True)
    if not isinstance(clip, bool):
        raise CheckpointError(f"scheduler config clip_sample={clip!r} must be true or false")
    clip_range = _real(sched, "clip_sample_range", 1.0, 0.0, math.inf, low_open=True)
    if clip and clip_range != 1.0:
        raise _unsupported("clip_sample_range", sched["clip_sample_range"], "fastddpm clips x0 to [-1, 1]")
    return clip


def _short(value) -> str:
    """repr(value), cut to 60 characters (a config value is user input: it may be huge)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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


# ------------------------------------------------------------------------------------ pipelines
def pipeline_index() -> dict:
    """The model_index.json of the DDPMPipeline folder fastddpm writes: the pipeline class and, per
    component (a subfolder of that name), its [library, class]. DiffusionPipeline.from_pretrained
    needs `_diffusers_version` (it parses it) and `_class_name`; diffusers itself writes this shape."""
    return {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}


def unet_of_index(index: dict) -> None:
    """Raise CheckpointError unless a model_index.json (dict) names a diffusers UNet2DModel as its `unet`
    (the component fastddpm converts; the scheduler's own config names its class)."""
    entry = index.get("unet")
    if entry is None:
        raise CheckpointError("model_index.json names no unet component; fastddpm converts a pipeline's UNet2DModel")
    if not isinstance(entry, (list, tuple)) or list(entry) != ["diffusers", "UNet2DModel"]:
        raise CheckpointError(f"model_index.json unet={_short(entry)} is not supported: fastddpm converts a "
                              "pipeline whose unet is [\"diffusers\", \"UNet2DModel\"]")
