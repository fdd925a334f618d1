"""Data-parallel training under torchrun, in one place.

`torchrun --nproc-per-node N -m stagewise pretrain ...` sets RANK, WORLD_SIZE and LOCAL_RANK;
`setup()` then joins the process group (gloo on CPU, NCCL on GPUs) and returns a `Dist`; without
torchrun it returns None and the stages run their plain single-process path. The global batch
stays the same whatever the number of processes: each rank takes an equal share of every batch,
and DDP's gradient averaging makes the update the one a single process would make.
FSDP2 (`torch.distributed.fsdp.fully_shard`) would slot in at `wrap`.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from stagewise.errors import StagewiseError


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (rows rank, rank + world_size, ...)."""
        if batch.shape[0] % self.world_size:
            raise StagewiseError(f"batch size {batch.shape[0]} is not divisible by {self.world_size} processes")
        return batch[self.rank::self.world_size]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def barrier(self) -> None:
        dist.barrier()

    def from_main(self, value):
        """Rank 0's `value` on every rank (a picklable object), e.g. a decision only rank 0 may take."""
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def setup(device: torch.device) -> Dist | None:
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Dist(rank, world_size, local_rank)


def launch(device_name: str, batch_size: int, grad_accum: int) -> tuple[torch.device, Dist | None]:
    """The device and process group of a training stage (None when not under torchrun), with
    the global batch checked to split evenly over processes and micro-batches."""
    from stagewise.training import pick_device
    device = pick_device(device_name)
    d = setup(device)
    if batch_size % (grad_accum * (d.world_size if d else 1)):
        raise StagewiseError(f"batch_size {batch_size} must be divisible by grad_accum x processes")
    return device_for(device, d), d


def device_for(base: torch.device, d: Dist | None) -> torch.device:
    if d is not None and base.type == "cuda":
        return torch.device("cuda", d.local_rank)
    return base


def wrap(model: torch.nn.Module, d: Dist, device: torch.device) -> torch.nn.Module:
    return DistributedDataParallel(model, device_ids=[d.local_rank] if device.type == "cuda" else None)


def teardown(d: Dist | None) -> None:
    """Leave the process group. The caller drops its DDP wrapper first: collected here, while the
    interpreter is whole, it lets go of the gloo group, whose worker threads would otherwise be
    torn down at interpreter exit and abort the process."""
    if d is not None:
        gc.collect()
        dist.destroy_process_group()
