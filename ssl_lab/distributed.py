"""Process-group facts and collectives in one place. Everything that writes (console, files, W&B)
asks `is_main()`.

Single-process runs need no process group; under torchrun (or SLURM, later) the environment names
rank and world, and `init()` joins the group: NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def init(device_type: str) -> None:
    """Join the process group when launched with several processes."""
    if world_size() > 1 and not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' `x`, concatenated in rank order; gradients flow back to every rank's part."""
    if world_size() == 1:
        return x
    return torch.cat(dist_nn.all_gather(x))


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
