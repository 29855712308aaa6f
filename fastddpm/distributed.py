"""torch.distributed for `torchrun`: the process group, sharding a batch, gathering results.

Under `torchrun --nproc_per_node N ...` every process sees WORLD_SIZE, RANK and LOCAL_RANK;
without them there is one process and every collective is the identity. GPUs use NCCL (one
device per local rank), CPUs use gloo.
"""
from __future__ import annotations

import os

import torch

from .errors import FastDDPMError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:local_rank when CUDA is available, else cpu; 'cuda' without CUDA is an error."""
    if name not in ("auto", "cpu", "cuda"):
        raise FastDDPMError(f"unknown device {name!r}; choose one of 'auto', 'cpu', 'cuda'")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise FastDDPMError("--device cuda was asked for, but this machine has no usable CUDA device")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _env_int(name: str, default: int, minimum: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text.strip())
    except ValueError:
        raise FastDDPMError(f"the environment variable {name}={text!r} is not an integer (torchrun sets it; "
                            f"unset it to run one process)") from None
    if value < minimum:
        raise FastDDPMError(f"the environment variable {name}={text!r} must be at least {minimum}")
    return value


def job_from_environment() -> tuple[int, int, int]:
    """(world size, rank, local rank) from torchrun's WORLD_SIZE, RANK and LOCAL_RANK, checked: integers,
    0 <= rank < world size, and for a job of several processes the rendezvous address torchrun sets
    (MASTER_ADDR, MASTER_PORT). Anything else is a FastDDPMError naming the variable: a rank outside
    the job would write nothing and exit 0."""
    world_size = _env_int("WORLD_SIZE", 1, 1)
    rank = _env_int("RANK", 0, 0)
    local_rank = _env_int("LOCAL_RANK", 0, 0)
    if rank >= world_size:
        raise FastDDPMError(f"RANK={rank} is outside a job of WORLD_SIZE={world_size} processes (ranks 0 .. "
                            f"{world_size - 1}); launch with torchrun, or unset RANK and WORLD_SIZE")
    if world_size > 1:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v, "").strip()]
        if missing:
            raise FastDDPMError(f"WORLD_SIZE={world_size} asks for a job of several processes, but {' and '.join(missing)} "
                                "is not set; launch with torchrun (it sets them), or unset WORLD_SIZE")
        _env_int("MASTER_PORT", 0, 1)
    return world_size, rank, local_rank


class Distributed:
    """This process's place in a torchrun job (a job of one without torchrun)."""

    def __init__(self, device: str = "auto"):
        self.world_size, self.rank, self.local_rank = job_from_environment()
        self.device = resolve_device(device, self.local_rank)
        self.enabled = self.world_size > 1
        if self.enabled:
            import torch.distributed as dist

            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, total: int) -> tuple[int, int]:
        """(first index, count) of this rank's part of `total` items; the first total % world ranks get one more."""
        per, extra = divmod(total, self.world_size)
        start = self.rank * per + min(self.rank, extra)
        return start, per + (1 if self.rank < extra else 0)

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over all ranks, in place (every rank gets the total)."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate equal-sized x [B, ...] from every rank in rank order: [world_size * B, ...]."""
        if not self.enabled:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def gather_rows(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """Concatenate every rank's shard x [n_r, ...] in rank order: [total, ...] (on every rank)."""
        if not self.enabled:
            return x
        import torch.distributed as dist

        counts = [self._count(r, total) for r in range(self.world_size)]
        width = max(counts)
        padded = torch.zeros((width,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, counts)])

    def max(self, value: float) -> float:
        """The largest `value` over all ranks (e.g. the slowest rank's time)."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def _count(self, rank: int, total: int) -> int:
        per, extra = divmod(total, self.world_size)
        return per + (1 if rank < extra else 0)

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
