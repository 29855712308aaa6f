"""The DDPM U-Net (Ho et al. 2020, appendix B; a PixelCNN++-style U-Net with a time embedding).

    x [B, C, H, W], t [B] int64  ->  [B, C_out, H, W]     (C_out = 2C with learn_sigma)

    temb = Dense(SiLU(Dense(sinusoidal(t, ch))))                      [B, 4 ch]
    h    = conv_in(x)
    down: per level, num_res_blocks ResBlocks (+ attention at the listed resolutions), then a
          stride-2 conv (not after the last level); every output is kept for a skip connection
    mid:  ResBlock, attention, ResBlock
    up:   per level, num_res_blocks + 1 ResBlocks over concat(h, skip) (+ attention), then
          nearest-neighbour 2x upsampling and a conv (not after the first level)
    out = conv_out(SiLU(GroupNorm(h)))

    ResBlock(x, temb):  h = conv1(SiLU(GN(x)));  h = conv2(dropout(SiLU(GN(h + Dense(SiLU(temb))))))
                        return skip(x) + h        (skip: 1x1 conv when channels change)
    Attention(x):       single head over the H*W positions of GN(x), then a 1x1 projection, residual

Each GroupNorm(+ embedding add)(+ SiLU) is one `GroupNormAct` module whose `impl` is the seam
the backends swap (fastddpm.backends): plain torch by default, the fused Triton kernel with
backend "triton". Final convolutions start at zero as in DDPM (`init_scale=1e-10` there).
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import FastDDPMError
from .kernels.group_norm import group_norm_silu_reference


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a DDPM U-Net. Saved as JSON beside the weights in every checkpoint."""

    image_size: int = 32
    in_channels: int = 3
    model_channels: int = 128  # "ch" in the DDPM code
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_groups: int = 32
    learn_sigma: bool = False  # IDDPM: twice the output channels, the second half parameterises Sigma
    norm_eps: float = 1e-5  # GroupNorm epsilon; DDPM's TF code and diffusers' ddpm-* configs use 1e-6
    out_channels: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        object.__setattr__(self, "out_channels", self.in_channels * (2 if self.learn_sigma else 1))
        if self.image_size % (2 ** (len(self.channel_mult) - 1)):
            raise FastDDPMError(
                f"image_size {self.image_size} is not divisible by 2^{len(self.channel_mult) - 1}, "
                f"which {len(self.channel_mult)} resolution levels need")
        for mult in self.channel_mult:
            if (self.model_channels * mult) % self.num_groups:
                raise FastDDPMError(f"{self.model_channels * mult} channels do not split into {self.num_groups} groups")

    def to_dict(self) -> dict:
        """The init fields as JSON-ready values (tuples as lists); `from_dict` reads it back."""
        d = asdict(self)
        d.pop("out_channels")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """A config from `to_dict`'s output; unknown keys raise FastDDPMError (a foreign file)."""
        names = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(d) - names - {"out_channels"})
        if unknown:
            raise FastDDPMError(f"unknown U-Net config keys {unknown}")
        return cls(**{k: v for k, v in d.items() if k in names})


PRESETS: dict[str, UNetConfig] = {
    # The DDPM CIFAR-10 model: 35,746,307 parameters, as google/ddpm-cifar10-32, and GroupNorm's
    # epsilon 1e-6 as DDPM's TF code (tf.contrib group_norm) and the diffusers ddpm-* configs.
    "cifar10": UNetConfig(norm_eps=1e-6),
    # Small enough for tests and CPU demos; 8 groups so each group spans several channels.
    "tiny": UNetConfig(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(8,), dropout=0.0, num_groups=8),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps t [B] -> [B, dim] (DDPM's get_timestep_embedding).

    emb[:, j] = sin(t * w_j), emb[:, half + j] = cos(t * w_j), w_j = max_period^(-j / (half - 1)).
    Computed in float32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GroupNormAct(nn.Module):
    """GroupNorm(x [+ emb]) * weight + bias [then SiLU], computed by the swappable `impl`."""

    def __init__(self, channels: int, num_groups: int, silu: bool = True, eps: float = 1e-5):
        super().__init__()
        self.num_groups, self.silu, self.eps = num_groups, silu, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.impl = group_norm_silu_reference

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W], emb [B, C] or None -> [B, C, H, W] in x's dtype."""
        return self.impl(x, self.num_groups, self.weight, self.bias, emb, self.silu, self.eps)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """DDPM's residual block with the time embedding (module docstring): in_ch -> out_ch channels."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float, groups: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = GroupNormAct(in_ch, groups, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_ch, out_ch)
        self.norm2 = GroupNormAct(out_ch, groups, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        """x [B, in_ch, H, W], emb_act = SiLU(temb) [B, emb_ch] -> [B, out_ch, H, W]."""
        h = self.conv1(self.norm1(x))
        h = self.norm2(h, self.emb_proj(emb_act))
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over spatial positions (DDPM's attn_block)."""

    def __init__(self, ch: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.norm = GroupNormAct(ch, groups, silu=False, eps=eps)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = _zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> x + proj(attention(GN(x))) [B, C, H, W]."""
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(-1, -2)  # [B, 3, HW, C]
        h = F.scaled_dot_product_attention(qkv[:, 0:1], qkv[:, 1:2], qkv[:, 2:3])  # [B, 1, HW, C]
        h = h[:, 0].transpose(1, 2).reshape(B, C, H, W)  # indexing, not squeeze: no If nodes in ONNX
        return x + self.proj(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with TF 'SAME' padding (pad right and bottom by one), as DDPM."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        """[B, C, H, W] -> [B, C, H/2, W/2]."""
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv (DDPM's upsample with_conv)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        """[B, C, H, W] -> [B, C, 2H, 2W]."""
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """The DDPM U-Net. Build it from a config or a preset: `UNet.from_preset("cifar10")`."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ch, emb_ch, G, eps = c.model_channels, 4 * c.model_channels, c.num_groups, c.norm_eps
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        self.conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips, cur, res = [ch], ch, c.image_size
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                block = nn.ModuleList([ResBlock(cur, ch * mult, emb_ch, c.dropout, G, eps)])
                cur = ch * mult
                if res in c.attention_resolutions:
                    block.append(AttentionBlock(cur, G, eps))
                self.down.append(block)
                skips.append(cur)
            if level != len(c.channel_mult) - 1:
                self.down.append(nn.ModuleList([Downsample(cur)]))
                skips.append(cur)
                res //= 2

        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_ch, c.dropout, G, eps), AttentionBlock(cur, G, eps),
                                  ResBlock(cur, cur, emb_ch, c.dropout, G, eps)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                block = nn.ModuleList([ResBlock(cur + skips.pop(), ch * mult, emb_ch, c.dropout, G, eps)])
                cur = ch * mult
                if res in c.attention_resolutions:
                    block.append(AttentionBlock(cur, G, eps))
                if level and i == c.num_res_blocks:
                    block.append(Upsample(cur))
                    res *= 2
                self.up.append(block)

        self.norm_out = GroupNormAct(cur, G, eps=eps)
        self.conv_out = _zero(nn.Conv2d(cur, c.out_channels, 3, padding=1))

    @classmethod
    def from_preset(cls, name: str, learn_sigma: bool = False, **overrides) -> "UNet":
        """A U-Net with preset `name` ("cifar10" or "tiny"); keyword overrides replace config fields."""
        if name not in PRESETS:
            raise FastDDPMError(f"unknown model preset {name!r}; choose one of {', '.join(map(repr, PRESETS))}")
        return cls(replace(PRESETS[name], learn_sigma=learn_sigma, **overrides))

    @staticmethod
    def _run(block: nn.ModuleList, h: torch.Tensor, emb_act: torch.Tensor) -> torch.Tensor:
        for layer in block:
            h = layer(h, emb_act) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Predict the model output for x_t [B, C, H, W] at original timesteps t [B] (int64)."""
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = timestep_embedding(t, self.config.model_channels).to(x.dtype)
        emb_act = F.silu(self.time_embed(emb))  # every ResBlock projects SiLU(temb)
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = self._run(block, h, emb_act)
            hs.append(h)
        h = self._run(self.mid, h, emb_act)
        for block in self.up:
            h = self._run(block, torch.cat([h, hs.pop()], dim=1), emb_act)
        return self.conv_out(self.norm_out(h))


def count_parameters(model: nn.Module) -> int:
    """The number of scalar parameters of `model` (35,746,307 for the cifar10 preset)."""
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def group_norm_impl(model, impl):
    """Within the block every GroupNormAct of `model` computes with `impl` (the signature of
    `kernels.group_norm_silu`); restored afterwards. No-op for impl None or a plain callable."""
    if impl is None or not isinstance(model, nn.Module):
        yield
        return
    modules = [m for m in model.modules() if isinstance(m, GroupNormAct)]
    saved = [m.impl for m in modules]
    for m in modules:
        m.impl = impl
    try:
        yield
    finally:
        for m, old in zip(modules, saved):
            m.impl = old


@functools.lru_cache(maxsize=8)
def forward_gflops(config: UNetConfig) -> float:
    """GFLOP of one U-Net forward for one image, counted by torch's FLOP counter on the meta device.

    Counts convolutions, linear layers and attention matmuls (2 FLOP per multiply-add); for the
    cifar10 preset that is 12.44 GFLOP (the DDPM literature's 12.1 leaves out the attention).
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = UNet(config)
        x = torch.zeros(1, config.in_channels, config.image_size, config.image_size)
        t = torch.zeros(1, dtype=torch.int64)
    with FlopCounterMode(display=False) as counter:
        model(x, t)
    return counter.get_total_flops() / 1e9
