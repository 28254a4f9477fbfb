"""Multi-process helpers: DDP switched on by the environment ``torchrun`` sets, and the few
collectives the method needs (a global ΔL threshold, one epsilon memory on every process).
With a single process every helper is the identity."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_world(device_type: str) -> World:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); else a world of one."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if not active():
        return t
    t = t.clone()
    dist.all_reduce(t, op=op)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over processes (a new tensor; ``t`` is left alone)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    return _all_reduce(t, dist.ReduceOp.MAX)


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (``[n, ...]``, n may differ per process) over processes in rank order."""
    if not active():
        return t
    if t.dtype == torch.bool:  # gloo has no bool collectives
        return all_gather_cat(t.to(torch.uint8)).bool()
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def check_same(t: torch.Tensor, what: str) -> None:
    """Raise if ``t`` differs between processes (a cheap guard on state that must stay replicated)."""
    if not active():
        return
    t = t.float()
    hi, lo = all_reduce_max(t), -all_reduce_max(-t)
    if not (torch.equal(hi, t) and torch.equal(lo, t)):
        raise RuntimeError(f"{what} differs between processes (rank {dist.get_rank()})")


def barrier() -> None:
    if active():
        dist.barrier()
