"""This process's place in the tensor-parallel group, and the collectives the sharded layers call.

Layers read their rank and the group size when they are built, inside `model_shard(size)`; built anywhere
else (and for tensor_parallel_size 1) they read rank 0 of 1, take their single-process path and never
call a collective. So a single-process engine works even in a process that also holds a sharded one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

# One step never comes near this; the idle wait between steps is on a pipe, not on a collective.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)

_rank = 0  # of the model being built
_size = 1


def get_tp_rank() -> int:
    return _rank


def get_tp_size() -> int:
    return _size


@contextmanager
def model_shard(size: int) -> Iterator[None]:
    """Build a model's layers inside this to shard them over this process's group of `size` ranks."""
    global _rank, _size
    _rank, _size = (dist.get_rank() if size > 1 else 0), size
    try:
        yield
    finally:
        _rank, _size = 0, 1


def init_tensor_parallel(store: dist.Store, rank: int, size: int, device: torch.device) -> None:
    """Join the group of `size` ranks that meet at `store`: NCCL between GPUs, gloo on the CPU."""
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a tensor-parallel group: close that engine first")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT)


def destroy_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place; every rank gets the sum."""
    dist.all_reduce(x)
    return x


def all_reduce_min(value: int, device: torch.device) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def gather_last_dim(x: torch.Tensor) -> torch.Tensor | None:
    """Concatenate every rank's `x` along the last dimension, in rank order, on rank 0; None elsewhere."""
    x = x.contiguous()
    first = dist.get_rank() == 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())] if first else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=-1) if parts is not None else None
