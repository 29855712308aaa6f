"""The DDPM U-Net's state dict under three names: fastddpm, diffusers UNet2DModel, pytorch_diffusion.

The three layouts hold the same network (DDPM's U-Net, Ho et al. 2020 appendix B): the
differences are names and the attention projections. fastddpm fuses q, k and v into one
1x1 conv `qkv` [3C, C, 1, 1]; diffusers keeps three Linear layers to_q, to_k, to_v [C, C]
(named query, key, value and proj_attn in configs written before diffusers 0.13) and
pytorch_diffusion three 1x1 convs q, k, v. A 1x1 conv weight is a Linear weight with
[..., 1, 1]. Every key is accounted for: a missing, unexpected or mis-shaped tensor stops
the conversion with a CheckpointError that names the keys.

    import_weights(tensors, config, layout, name)   foreign state dict -> fastddpm state dict
    diffusers_state_dict(model)                     fastddpm U-Net -> diffusers state dict
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CheckpointError
from .validate import check_weights
from .unet import UNet, UNetConfig


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


def import_weights(tensors: dict, config: UNetConfig, layout: str, name: str) -> dict:
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
    check_weights(out, name)  # integer, boolean or non-finite weights would convert silently
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
