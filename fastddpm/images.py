"""Images in and out: [-1, 1] float tensors <-> uint8 NHWC arrays, .npz files, PNG grids."""
from __future__ import annotations

import io
import math

import numpy as np
import torch

from .files import atomic_write, atomic_write_bytes, open_output


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
        with open_output(tmp) as f:
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


# Pillow modes of 16-bit greyscale images ("I;16*"; a 16-bit PNG may also open as the 32-bit "I").
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
GREY_MODES = ("1", "L", "LA") + SIXTEEN_BIT_MODES


def open_image(path):
    """The image file at `path`, loaded (a Pillow image). A decompression bomb (a header claiming,
    say, 30000 x 30000 pixels: Pillow's DecompressionBombError, or its warning between its limit
    and twice that) or an unreadable file is a DataError naming the file."""
    import warnings

    from PIL import Image

    from .errors import DataError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return im.copy()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise DataError(f"image {str(path)!r} is a decompression bomb ({_first_line(e)})") from None
    # Pillow's decoders raise many types for a broken file (OSError, SyntaxError, struct.error, ...)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read image {str(path)!r} ({type(e).__name__}: {_first_line(e)})") from None


def to_8bit(img, mode: str, source: str):
    """Pillow image `img` as an 8-bit image of `mode` ("L" or "RGB").

    16-bit greyscale is scaled by value / 257, rounded (0 -> 0, 65535 -> 255): Pillow's own
    convert("L") clips it, turning every value above 255 white. A 32-bit "I" image with values
    outside 0..65535 and a floating-point image are refused (DataError), as nothing says how to
    map them to 0..255.
    """
    from PIL import Image

    from .errors import DataError

    if img.mode in SIXTEEN_BIT_MODES:
        a = np.asarray(img).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DataError(f"{source} holds values outside 0..65535 (Pillow mode {img.mode}); fastddpm reads 8- and "
                            "16-bit images")
        img = Image.fromarray(((a + 128) // 257).astype(np.uint8), "L")
    elif img.mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        raise DataError(f"{source} is a Pillow {img.mode} image; fastddpm reads 8- and 16-bit images")
    return img.convert(mode)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
