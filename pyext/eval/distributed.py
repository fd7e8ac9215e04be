"""torch.distributed plumbing for ``tokenbounds evaluate`` under ``torchrun``.

The plan (the units to score, in a fixed order) is cut into *blocks* of consecutive batches
(fixed by the plan, ``--batch-size`` and ``--checkpoint-every``, not by the number of processes). Block ``j`` is evaluated by rank
``j mod P``; at the end every rank's per-block statistics are gathered and merged **in block
order** on rank 0. Because each block's statistics depend only on its own batches and the merge
order is fixed, the result is bit-identical for every world size P, including P = 1.
Backends: ``nccl`` when CUDA is available, else ``gloo``. See docs/distributed.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_from_env(device: str = "auto") -> World:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, ...);
    a single-process World when those are absent."""
    if "WORLD_SIZE" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    backend = "nccl" if use_cuda else "gloo"
    created = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        created = True
    return World(rank, world_size, local_rank, created, backend)


def gather_to_main(world: World, obj: Any) -> list[Any] | None:
    """Rank-ordered list of every rank's ``obj`` on rank 0 (None elsewhere)."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] | None = [None] * world.world_size if world.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(world: World, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(world: World, obj: Any) -> Any:
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def shutdown(world: World) -> None:
    if world.initialized_here:
        import torch.distributed as dist

        dist.destroy_process_group()
