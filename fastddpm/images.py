"""Images in and out: [-1, 1] float tensors <-> uint8 NHWC arrays, .npz files, PNG grids."""
from __future__ import annotations

import io
import math

import numpy as np
import torch

from .files import atomic_write, atomic_write_bytes


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] floats in [-1, 1] -> uint8 [B, H, W, C], rounding (x + 1) * 127.5 to the nearest level."""
    x = ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, C] -> float32 [B, C, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def save_npz(path, images: np.ndarray) -> None:
    """Write uint8 NHWC images under key `arr_0` (the layout FID tools read), atomically."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=images)
    atomic_write(path, write)


def grid(images: np.ndarray, min_tile: int = 32, pad: int = 2) -> np.ndarray:
    """Tile uint8 NHWC images into one near-square uint8 HWC image.

    Images smaller than `min_tile` pixels are enlarged by an integer factor (nearest neighbour)
    so that an 8x8 digit is still visible.
    """
    n, h, w, c = images.shape
    scale = max(1, math.ceil(min_tile / max(h, w)))
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
    return out


def save_grid(path, images: np.ndarray) -> None:
    """Write a PNG grid of uint8 NHWC images (1 or 3 channels), atomically."""
    from PIL import Image

    g = grid(images)
    img = Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
