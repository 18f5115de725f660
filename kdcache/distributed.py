"""torch.distributed glue: kdcache runs under ``torchrun`` and uses its process group.

Outside torchrun (no ``WORLD_SIZE`` > 1 and no initialised group) everything here is a no-op
for a single process, rank 0 of 1.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["world", "barrier", "broadcast", "gather", "local_device", "shutdown"]


def world() -> tuple[int, int]:
    """``(rank, world_size)``; initialises the default group (nccl on CUDA, else gloo) when
    started by torchrun and not yet initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def local_device(device: Any) -> Any:
    """Under torchrun with CUDA, ``auto``/``cuda`` means this process's ``cuda:LOCAL_RANK``."""
    if world()[1] > 1 and torch.cuda.is_available() and str(device) in ("auto", "None", "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if world()[1] == 1:
        return [value]
    out: list[Any] = [None] * world()[1]
    dist.all_gather_object(out, value)
    return out


def shutdown(clean: bool) -> None:
    """Leave the process group before the interpreter exits: a gloo group still alive at exit,
    or torn down while another rank still talks to it, can abort the process ("terminate called
    without an active exception"). After a ``clean`` run every rank meets at a barrier first;
    after a failure there is no waiting for ranks that may never come."""
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
