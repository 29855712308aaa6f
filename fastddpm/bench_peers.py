"""The diffusers peer of `fastddpm bench`: UNet2DModel in the google/ddpm-cifar10-32 layout (random
weights, nothing downloaded), its FLOPs, DDPMPipeline's loop with the scheduler that corresponds to
a fastddpm sampler, and its accuracy run (the peer's U-Net in our reference sampler).

diffusers is imported inside the functions: `fastddpm bench` without it reports the rows skipped.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from .sampling import sample
from .unet import UNet, UNetConfig
from .unet_layouts import diffusers_state_dict

SEED = 0  # fastddpm.bench.SEED: every row draws from the same seed

# google/ddpm-cifar10-32's scheduler_config.json: linear betas 1e-4 .. 0.02 over T = 1000,
# sigma_t^2 = beta_t ("fixed_large"), x0 clipped to [-1, 1]. Same process as default_diffusion().
DDPM_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                             variance_type="fixed_large", clip_sample=True)


def diffusers_unet_kwargs(config: UNetConfig) -> dict:
    """UNet2DModel keyword arguments for the same architecture as `config`.

    For the cifar10 preset these are google/ddpm-cifar10-32's config.json values (35,746,307
    parameters, as fastddpm's). A level gets an Attn block where fastddpm puts attention.
    """
    down, res = [], config.image_size
    for level in range(len(config.channel_mult)):
        down.append("AttnDownBlock2D" if res in config.attention_resolutions else "DownBlock2D")
        if level != len(config.channel_mult) - 1:
            res //= 2
    up = [name.replace("Down", "Up") for name in reversed(down)]
    return dict(sample_size=config.image_size, in_channels=config.in_channels, out_channels=config.out_channels,
                layers_per_block=config.num_res_blocks,
                block_out_channels=tuple(config.model_channels * m for m in config.channel_mult),
                down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=config.num_groups,
                norm_eps=config.norm_eps, act_fn="silu", attention_head_dim=None, center_input_sample=False,
                downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1,
                time_embedding_type="positional")


@functools.lru_cache(maxsize=8)
def diffusers_forward_gflops(config: UNetConfig) -> float:
    """GFLOP of one forward of the diffusers twin of `config`, one image, by torch's FLOP counter."""
    from diffusers import UNet2DModel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = UNet2DModel(**diffusers_unet_kwargs(config))
        x = torch.zeros(1, config.in_channels, config.image_size, config.image_size)
        t = torch.zeros(1, dtype=torch.int64)
    with FlopCounterMode(display=False) as counter:
        model(x, t)
    return counter.get_total_flops() / 1e9


def _peer_scheduler(sampler: str, spacing: str):
    """diffusers' scheduler for a fastddpm sampler (the same process: linear betas over T = 1000);
    spacing "iddpm" has no diffusers equivalent and keeps the scheduler's default."""
    import diffusers

    kw = {} if spacing == "iddpm" else {"timestep_spacing": spacing}
    if sampler == "ancestral":
        return diffusers.DDPMScheduler(**DDPM_SCHEDULER_CONFIG, **kw)
    common = {k: DDPM_SCHEDULER_CONFIG[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")}
    if sampler == "ddim":
        return diffusers.DDIMScheduler(**common, clip_sample=True, **kw)
    return diffusers.DPMSolverMultistepScheduler(
        **common, algorithm_type="dpmsolver++" if sampler == "dpm++2m" else "sde-dpmsolver++", **kw)


def _diffusers_sampler(config: UNetConfig, shape, device: torch.device, dtype: torch.dtype,
                       compiled: bool, sampler: str = "ancestral",
                       spacing: str = "iddpm") -> tuple[Callable[[int], torch.Tensor], str, torch.nn.Module]:
    """(run(steps) -> x_0, notes, unet): DDPMPipeline's loop over a random-weight UNet2DModel, and
    that UNet (compiled when `compiled`) for the accuracy run (`_peer_accuracy`).

    The loop is DDPMPipeline.__call__ without its conversion to images: x_T and the state in the
    UNet's dtype, unet(x, t).sample, then scheduler.step(...).prev_sample for each timestep; the
    scheduler is the peer of `sampler` (DDPMScheduler, DDIMScheduler or DPMSolverMultistepScheduler).
    """
    from diffusers import UNet2DModel
    from diffusers.utils.torch_utils import randn_tensor

    from diffusers.utils import logging as diffusers_logging

    torch.manual_seed(SEED)
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # .to(dtype) warns about from_pretrained's torch_dtype
    try:
        unet = UNet2DModel(**diffusers_unet_kwargs(config)).to(device=device, dtype=dtype).eval()
    finally:
        diffusers_logging.set_verbosity(verbosity)
    scheduler = _peer_scheduler(sampler, spacing)
    notes = f"DDPMPipeline loop, {type(scheduler).__name__}"
    if compiled:
        unet = unet.to(memory_format=torch.channels_last)
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        unet = torch.compile(unet, mode=mode)
        notes += f", torch.compile mode={mode}"

    @torch.no_grad()
    def run(steps: int) -> torch.Tensor:
        scheduler.set_timesteps(steps, device=device)
        generator = torch.Generator(device).manual_seed(SEED)
        x = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        for t in scheduler.timesteps:
            eps = unet(x, t).sample
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
        return x

    return run, notes, unet


class _PeerEps(torch.nn.Module):
    """A diffusers UNet2DModel as fastddpm's model callable (x_t, t) -> eps, fed as its own row feeds
    it: one 0-d timestep for the whole batch and an NCHW-contiguous x, so a compiled peer meets the
    inputs it was compiled and recorded for (no recompilation in the accuracy run)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x.contiguous(), t[0]).sample


def _peer_accuracy(unet: torch.nn.Module, base: UNet, process, shape, sampler: str) -> torch.Tensor:
    """x_0 of `process` drawn by fastddpm's reference sampler (seed SEED) with the peer's `unet`,
    loaded in place with `base`'s weights (the same network as eager-bf16's, in diffusers' names)."""
    target = getattr(unet, "_orig_mod", unet)  # a torch.compile'd module keeps the real one here
    target.load_state_dict(diffusers_state_dict(base))  # copies in place: compiled code stays valid
    with torch.no_grad():
        return sample(_PeerEps(unet), process, shape, seed=SEED, backend="reference", sampler=sampler)
