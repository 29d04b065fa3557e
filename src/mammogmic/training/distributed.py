"""Process-group helpers for ``torchrun`` (several GPUs / machines) and CPU gloo tests."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "all_reduce_max",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_flag",
    "broadcast_state",
    "init_distributed",
    "resolve_device",
    "shard_indices",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Rank layout of this process (``world_size == 1`` when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU; other names as given."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def init_distributed(device_name: str, timeout_minutes: float = 60.0) -> DistInfo:
    """Join the process group that ``torchrun`` (or a test) described in the environment.

    Reads ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; with ``WORLD_SIZE`` unset or 1 nothing happens. The backend is
    NCCL on CUDA devices and gloo otherwise. An already initialised group is reused (with its own timeout).

    Args:
        device_name: ``runtime.device``.
        timeout_minutes: how long a collective may wait for the slowest rank before the run fails
            (``runtime.dist_timeout_minutes``; PyTorch's NCCL default of 10 minutes is shorter than a
            checkpoint export or a slow evaluation batch on a loaded machine).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return DistInfo()
    if not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_name, local_rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
        logger.info(
            "joined process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend
        )
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op when not distributed)."""
    if info.enabled:
        dist.barrier()


def broadcast_flag(value: bool, info: DistInfo, device: torch.device, *, any_rank: bool = False) -> bool:
    """Rank 0's ``value`` on every rank; with ``any_rank`` the OR over all ranks instead."""
    if not info.enabled:
        return value
    t = torch.tensor([1.0 if value else 0.0], device=device)
    if any_rank:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    else:
        dist.broadcast(t, src=0)
    return bool(t.item() > 0.5)


def all_reduce_mean(values: Sequence[float], info: DistInfo, device: torch.device) -> list[float]:
    """The mean over ranks of each of ``values`` (the same list on every rank; unchanged when not distributed)."""
    if not info.enabled:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / info.world_size).tolist()


def all_reduce_max(value: float, info: DistInfo, device: torch.device) -> float:
    """The largest ``value`` over ranks, on every rank."""
    if not info.enabled:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_sum(array: np.ndarray, info: DistInfo, device: torch.device) -> np.ndarray:
    """Element-wise sum of ``array`` over ranks, on every rank (a copy; ``array`` itself when not distributed).

    Used to merge evaluation shards: each rank fills its own rows and leaves the others at zero, and ``x + 0`` is
    exactly ``x``, so the merged array equals the one a single process would have filled.
    """
    if not info.enabled:
        return array
    t = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def shard_indices(n: int, info: DistInfo) -> np.ndarray:
    """The dataset rows this rank evaluates: ``rank, rank + world_size, ...`` (every row exactly once)."""
    return np.arange(info.rank, n, info.world_size) if info.enabled else np.arange(n)


def broadcast_state(module: nn.Module, info: DistInfo, *, buffers_only: bool = False) -> None:
    """Overwrite every rank's parameters and buffers (or buffers only) with rank 0's.

    DDP keeps parameters equal, but batch-norm running statistics are updated by each rank's own last batch;
    evaluation must use one set of weights, rank 0's, the ones that are saved.
    """
    if not info.enabled:
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)
