"""Rank helpers of the trainer's collectives; without a process group they act as a world of one."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def several() -> bool:
    """Whether other ranks take part (a collective is needed)."""
    return rank_world()[1] > 1


def barrier() -> None:
    if several():
        dist.barrier()


def all_ranks(ok: bool) -> bool:
    """Whether ``ok`` holds on EVERY rank (a collective with several ranks: all call it)."""
    flag = torch.tensor([float(ok)])
    if several():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def from_rank0(obj):
    """Rank 0's ``obj`` on every rank (a collective)."""
    box = [obj]
    if several():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole of a DTensor (a collective); a plain tensor as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
