"""Refusing work that cannot fit in memory before allocating it.

torch raises a clean error for one allocation that is too large (and on a GPU for any
allocation that fails), which the command line turns into one line naming the flag to lower.
On a host, many mid-sized allocations that each succeed end instead in the kernel's
out-of-memory killer (SIGKILL, no message, maybe another process killed): a batch of 10^9
samples did exactly that. So `sample` and `train` compare a lower bound of what they will need
with the memory free now and refuse at once (OutOfMemoryError, exit 2) when it cannot fit.
The bounds are deliberately low (never refuse work that would fit): they catch absurd values,
and the error handler catches the rest.
"""
from __future__ import annotations

import functools
import math

import torch

from .errors import OutOfMemoryError

# Bytes per element of the sampling state alive at once: the state and the model output in
# float32, and the counter-based noise's int64 Philox temporaries (about 8, fastddpm.noise).
SAMPLING_BYTES_PER_ELEMENT = 4 * 4 + 8 * 8
# Bytes per diffusion step of the schedule: ~20 float64 tables of [T] (GaussianDiffusion) and,
# for the cosine schedule, a Python list of T floats while it is built.
SCHEDULE_BYTES_PER_STEP = 20 * 8 + 32


def available_memory(device: torch.device) -> int | None:
    """Free bytes on `device` now: the GPU's free memory, or the host's MemAvailable (None if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def require(needed: int, device: torch.device, what: str, flag: str) -> None:
    """OutOfMemoryError naming `flag` if `needed` bytes exceed the free memory of `device`."""
    free = available_memory(device)
    if free is not None and needed > free:
        raise OutOfMemoryError(f"out of memory: {what} need at least {needed / 2**30:.1f} GiB on {device.type}, "
                               f"{free / 2**30:.1f} GiB is free; lower {flag}")


def check_sampling_fits(shape, device: torch.device, flag: str = "--batch") -> None:
    """Refuse a sampling batch `shape` = [B, C, H, W] whose state alone cannot fit on `device`."""
    require(math.prod(shape) * SAMPLING_BYTES_PER_ELEMENT, device, f"{shape[0]} samples", flag)


def check_schedule_fits(T: int, device: torch.device = torch.device("cpu")) -> None:
    """Refuse a number of diffusion steps whose schedule tables cannot fit in host memory."""
    require(T * SCHEDULE_BYTES_PER_STEP, device, f"the schedule tables of T = {T} steps", "--diffusion-steps")


@functools.lru_cache(maxsize=8)
def training_bytes_per_image(config) -> int:
    """Bytes autograd keeps per training image of a UNet with `config` (float32), counted on the
    meta device: saved tensors at batch 2 minus batch 1 (the weights, saved once, cancel out)."""
    from .unet import UNet

    def saved(batch: int) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t
        with torch.device("meta"):
            model = UNet(config)
            x = torch.zeros(batch, config.in_channels, config.image_size, config.image_size)
            t = torch.zeros(batch, dtype=torch.int64)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, t)
        return total
    return max(saved(2) - saved(1), 0)


def check_training_fits(config, batch: int, device: torch.device, half_precision: bool) -> None:
    """Refuse a per-process training batch whose saved activations cannot fit on `device`.

    A lower bound: a tensor saved by two operations is counted twice, so only half the count
    is required (and half again under bf16 / fp16 autocast)."""
    needed = batch * training_bytes_per_image(config) // (4 if half_precision else 2)
    require(needed, device, f"the activations of a batch of {batch}", "--batch")


def check_data_fits(nbytes: int, what: str) -> None:
    """Refuse a data set whose `nbytes` of images (`what`, e.g. "the images of 'x.npz'") cannot fit in
    the host's free memory: a 4 MB .npz of zeros inflates to 4 GiB."""
    free = available_memory(torch.device("cpu"))
    if free is not None and nbytes > free:
        raise OutOfMemoryError(f"out of memory: {what} take {nbytes / 2**30:.1f} GiB once decompressed, "
                               f"{free / 2**30:.1f} GiB is free; use a smaller data set")
