"""The retrain under ``torchrun``: several processes (on one host or several) train the
embedder together with DistributedDataParallel.

``torchrun --nproc_per_node N -m trainer.retrain ...`` starts N processes with ``RANK`` and
``WORLD_SIZE`` set; :func:`init_from_env` joins them into one process group (gloo on a CPU,
NCCL on CUDA). Each process reads the same data and split (the DB and the pixel store are
shared services), and each training step runs one balanced batch per process: the batches
of an epoch are dealt out by position (batch ``n`` to rank ``n % N``) and DDP averages the
gradients, so every process holds the same weights after every step. The effective batch
is N balanced batches.

Only rank 0 validates, evaluates the candidate beside the serving model, lets the gate
decide, records the version and promotes: the same models and the same gate as one
process. The other ranks train and leave. The STIR stage (whose step plan follows a time
budget) is trained by rank 0 alone. A distributed run does not resume (every rank would
have to resume at the same step) and takes a step count, not a time budget (each rank
would plan its own).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run (rank 0 of 1 when not under ``torchrun``)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


SINGLE = Distributed()


def init_from_env(device: str = "cpu") -> Distributed:
    """Join the process group ``torchrun`` describes in the environment (none: one
    process). ``device``: the training device setting (gloo unless it is CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    rank = int(os.environ["RANK"])
    if not dist.is_initialized():
        backend = "nccl" if device == "cuda" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return Distributed(rank=rank, world=world)


def current() -> Distributed:
    """The run this process belongs to, once :func:`init_from_env` joined it."""
    if not dist.is_available() or not dist.is_initialized():
        return SINGLE
    return Distributed(rank=dist.get_rank(), world=dist.get_world_size())


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
