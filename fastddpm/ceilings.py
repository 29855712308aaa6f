"""The device's measured ceilings: matrix-product peak and copy bandwidth.

Achieved TFLOP/s and GB/s mean something only beside what the same device reaches in the same
run, so `fastddpm bench`, the kernel benchmarks and `fastddpm sample` measure these rather
than quote a datasheet.
"""
from __future__ import annotations

import time
from typing import Callable

import torch

SEED = 0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fastest_seconds(fn: Callable[[], object], device: torch.device, repeat: int, warmup: int = 2) -> float:
    """Shortest wall time of fn() over `repeat` synchronised calls, after `warmup` untimed calls.

    A ceiling is what the device can do, so the fastest call estimates it: other work on a shared
    machine only ever slows a call down.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def measure_peak_tflops(device: torch.device) -> dict:
    """The matrix-product ceiling measured here: n x n x n matmuls on random data.

    CUDA: bfloat16, n = 8192 (2 n^3 = 1.1 TFLOP a product, large enough to fill an H100).
    CPU: float32, n = 1024 (2.1 GFLOP, a fraction of a second on a few cores).
    Returns {"tflops", "dtype", "n"}; TFLOP/s = 2 n^3 / seconds of the fastest of 10 products.
    """
    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    gen = torch.Generator(device).manual_seed(SEED)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    seconds = fastest_seconds(lambda: a @ b, device, repeat=10)
    return {"tflops": 2 * n**3 / seconds / 1e12, "dtype": str(dtype).removeprefix("torch."), "n": n}


def measure_copy_gbps(device: torch.device) -> dict:
    """Copy bandwidth measured here: dst.copy_(src) of a buffer far larger than the caches.

    CUDA: 1 GiB; CPU: 64 MiB. GB/s counts bytes read plus bytes written (2 x size / seconds),
    from the fastest of 10 copies.
    """
    cuda = device.type == "cuda"
    nbytes = (1 << 30) if cuda else (64 << 20)
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = fastest_seconds(lambda: dst.copy_(src), device, repeat=10)
    return {"gbps": 2 * nbytes / seconds / 1e9, "bytes": nbytes}
