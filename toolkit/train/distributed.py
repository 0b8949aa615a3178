"""Data parallelism under ``torchrun``: process group setup and averaging helpers (gloo on CPU, nccl on CUDA).

Every process computes on its shard of the global batch (see toolkit.data.batching); gradients are
averaged here for the first-order optimizers, while HessianFree averages gradients and curvature
products itself when torch.distributed is initialized.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` among ``size`` processes."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints."""
        return self.rank == 0


def setup(device: torch.device) -> World:
    """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE > 1), else a world of one.

    Args:
        device: the training device (chooses nccl for CUDA, gloo otherwise).

    Returns:
        The World.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def teardown() -> None:
    """Leave the process group if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether more than one process trains together."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def mean_(t: torch.Tensor) -> torch.Tensor:
    """Average ``t`` across processes in place (no-op with one process); returns it."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def any_true(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any process."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the ``.grad`` of every parameter across processes."""
    if not active():
        return
    for p in params:
        if p.grad is not None:
            mean_(p.grad)


def barrier() -> None:
    """Wait for every process (no-op with one)."""
    if active():
        dist.barrier()
