"""Processes and devices: the torchrun process group (one process per GPU, any number of nodes) and the device.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process joins one group: nccl on CUDA, gloo on CPU. torchrun sets
``RANK`` (global, over all nodes), ``WORLD_SIZE`` and ``LOCAL_RANK`` (on this node): the device is
``cuda:LOCAL_RANK`` and only global rank 0 writes files and metrics. A single process needs no group at all.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from tcm_core.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Distributed:
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if backend == "nccl":
            check_node_gpus(local_rank)
            torch.cuda.set_device(local_rank)
        # periodic evaluation runs on rank 0 only; the others wait at the next collective
        dist.init_process_group(backend=backend, timeout=timedelta(hours=2))
    return Distributed(rank, world_size, local_rank, initialised=True)


def check_node_gpus(local_rank: int) -> None:
    """Process LOCAL_RANK of a node uses GPU LOCAL_RANK: the node must show at least LOCAL_RANK + 1 GPUs (SLURM
    can spread a job's ``--gpus=N`` unevenly over its nodes)."""
    visible = torch.cuda.device_count()
    if local_rank >= visible:
        raise ConfigError(f"this node shows {visible} GPU(s) but runs training process {local_rank} of it",
                          f"node {socket.gethostname()} (LOCAL_RANK {local_rank})",
                          "give every node as many GPUs as torchrun starts processes per node")


def finish_distributed(info: Distributed, succeeded: bool) -> None:
    if not info.initialised:
        return
    import torch.distributed as dist

    if succeeded:
        dist.barrier()
    dist.destroy_process_group()


def pick_device(requested: str) -> str:
    if requested not in DEVICES:
        raise ConfigError(f"unknown device {requested!r}", "--device", f"use one of {', '.join(DEVICES)}")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("CUDA is not available on this machine", "--device cuda", "use --device cpu or auto")
    return requested


def torch_device(kind: str, info: Distributed) -> torch.device:
    return torch.device(f"cuda:{info.local_rank}" if kind == "cuda" else "cpu")


def wrap_ddp(net: nn.Module, info: Distributed, device: torch.device) -> nn.Module:
    """DDP over ``net`` when several processes train it; ``net`` itself otherwise."""
    if info.world_size <= 1:
        return net
    from torch.nn.parallel import DistributedDataParallel

    # broadcast_buffers=False (as ECT/TCM): a buffer broadcast is a collective on EVERY forward, and the
    # number of no-grad student target passes differs between ranks (zero when all of a rank's r < t').
    # Our buffers are constants (resampling filters, Fourier frequencies), identical on all ranks.
    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


def all_ranks_agree(info: Distributed, value: Any) -> list[Any]:
    """Every rank's ``value`` (a one-element list in a single process)."""
    if info.world_size <= 1:
        return [value]
    import torch.distributed as dist

    found: list[Any] = [None] * info.world_size
    dist.all_gather_object(found, value)
    return found


def sum_over_ranks(info: Distributed, tensor: torch.Tensor) -> torch.Tensor:
    if info.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor
