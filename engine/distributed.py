"""torch.distributed context under `torchrun` (one process per GPU or node slot): sharded indexing
and data-parallel training share it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported only under torchrun: a single process that embeds nothing never pays for it
    import torch


@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self) -> str | None:
        """Each rank its own GPU; None (auto) when single-process."""
        if not self.distributed:
            return None
        import torch

        if torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return "cpu"

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj):
        """Every rank's `obj`, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather_with_grad(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' rows of `x`, in rank order, keeping the gradient to this rank's rows."""
        if not self.distributed:
            return x
        import torch
        import torch.distributed.nn.functional as dfn

        return torch.cat(dfn.all_gather(x))

    def average_gradients(self, params) -> None:
        """Data-parallel step. When every rank computed the loss of the whole gathered batch, the
        all-gather's backward summed the ranks' gradients into each local slice: summing over ranks
        and dividing by the world size gives exactly the single-process gradient of the global batch."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def init_from_env(backend: str = "gloo") -> Ranks:
    """Join the process group that `torchrun` describes in the environment. gloo carries object
    collectives on CPU and GPU alike (indexing); training asks for NCCL when it runs on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
