"""Training on several processes with torch.distributed (DistributedDataParallel).

Launch the same command under ``torchrun --nproc-per-node N`` (gloo on CPU, NCCL on GPUs).  Every
rank walks the same shuffled global batches and keeps its contiguous slice; the noise layers draw
θ for the rows of their slice from the same counter-based stream (rows coded by their index in the
global batch, :mod:`bmrs.nn.uniforms`), and the
cross-entropy is scaled so that DDP's gradient average equals the gradient of the global-batch
mean.  So N processes compute what one process with the same global batch computes (up to the
order of floating-point sums).  Masks are broadcast from rank 0 after each pruning step, and the
ranks' parameters and masks are checked to agree exactly; only rank 0 writes files.

Examples:
    torchrun --nproc-per-node 2 -m bmrs train --model lenet5 --criterion bmrs-n --device cpu
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import TrainingError
from ..nn.attach import noise_layers

__all__ = ["DistContext", "setup_distributed"]


@dataclass
class DistContext:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_slice(self, size: int) -> slice:
        """This rank's contiguous share of a global batch of ``size`` examples."""
        start = (size * self.rank) // self.world
        stop = (size * (self.rank + 1)) // self.world
        return slice(start, stop)

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if not self.active:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def broadcast_masks(self, model: nn.Module) -> None:
        if self.active:
            for _, noise in noise_layers(model):
                torch.distributed.broadcast(noise.mask, src=0)

    def check_agreement(self, model: nn.Module, where: str) -> None:
        """Raise TrainingError unless every rank holds exactly the same parameters and masks."""
        if not self.active:
            return
        state = model.state_dict()
        local = torch.stack([torch.cat([v.detach().double().reshape(-1) for v in state.values()]).sum(),
                             torch.cat([v.detach().double().reshape(-1) ** 2 for v in state.values()]).sum()])
        gathered = [torch.zeros_like(local) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, local)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise TrainingError(f"ranks disagree on parameters or masks after {where}; check that every rank "
                                "runs the same command and data")

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


def setup_distributed(device: torch.device) -> DistContext:
    """Join the process group that torchrun describes in the environment (one process: no-op)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return DistContext(torch.distributed.get_rank(), torch.distributed.get_world_size())
