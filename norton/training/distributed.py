"""Processes under ``torchrun``; the device a command runs on comes from ``norton.core.devices``."""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from norton.core.devices import resolve_device  # noqa: F401  (re-exported: the commands import it from here)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        # left to the interpreter's exit, the group's threads were torn down running ("terminate called without
        # an active exception"): a rank then aborted after its work was done and torchrun reported a failure
        atexit.register(_leave)
    return Distributed(rank=dist.get_rank(), world_size=dist.get_world_size())


def _leave() -> None:
    """Destroy the process group at exit, once every rank has reached it."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
