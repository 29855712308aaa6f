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
    """Wait for the device's queued work (CUDA); nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock_name(device: torch.device) -> str:
    """What times a call on `device`: "cuda-events" on CUDA, "host" (time.perf_counter) elsewhere."""
    return "cuda-events" if device.type == "cuda" else "host"


def _host_seconds(fn: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _event_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds between two CUDA events recorded around fn() on the device's current stream.

    The GPU's own clock: what the host does between the launches (Python, the launch calls) is
    not counted unless it leaves the GPU idle, and no host-device round trip is timed.
    """
    stream = torch.cuda.current_stream(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    fn()
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1000.0  # elapsed_time is in milliseconds


def fastest_seconds(fn: Callable[[], object], device: torch.device, repeat: int, warmup: int = 2) -> float:
    """Shortest time of fn() over `repeat` calls, after `warmup` untimed calls.

    On CUDA each call is timed with CUDA events (UNVERIFIED on a GPU: written without one;
    the event path is tested on a CPU with stand-in events), elsewhere with the host clock; the
    device is synchronised before each call, so earlier work is not counted.
    A ceiling is what the device can do, so the fastest call estimates it: other work on a shared
    machine only ever slows a call down.
    """
    for _ in range(warmup):
        fn()
    timer = _event_seconds if device.type == "cuda" else _host_seconds
    times = []
    for _ in range(repeat):
        synchronize(device)
        times.append(timer(fn, device))
    return min(times)


def measure_peak_tflops(device: torch.device) -> dict:
    """The matrix-product ceiling measured here: n x n x n matmuls on random data.

    CUDA: bfloat16, n = 8192 (2 n^3 = 1.1 TFLOP a product, large enough to fill an H100).
    CPU: float32, n = 1024 (2.1 GFLOP, a fraction of a second on a few cores).
    Returns {"tflops", "dtype", "n", "clock"}; TFLOP/s = 2 n^3 / seconds of the fastest of 10 products.
    """
    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    gen = torch.Generator(device).manual_seed(SEED)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    seconds = fastest_seconds(lambda: a @ b, device, repeat=10)
    return {"tflops": 2 * n**3 / seconds / 1e12, "dtype": str(dtype).removeprefix("torch."), "n": n,
            "clock": clock_name(device)}


def measure_copy_gbps(device: torch.device) -> dict:
    """Copy bandwidth measured here: dst.copy_(src) of a buffer far larger than the caches.

    CUDA: 1 GiB; CPU: 64 MiB. GB/s counts bytes read plus bytes written (2 x size / seconds),
    from the fastest of 10 copies. Returns {"gbps", "bytes", "clock"}.
    """
    cuda = device.type == "cuda"
    nbytes = (1 << 30) if cuda else (64 << 20)
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = fastest_seconds(lambda: dst.copy_(src), device, repeat=10)
    return {"gbps": 2 * nbytes / seconds / 1e9, "bytes": nbytes, "clock": clock_name(device)}
