"""Distributed helpers. Mode is detected from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

One node, 8 GPUs:
    torchrun --standalone --nproc_per_node=8 -m reslab train --arch resnet50 --data folder --data-dir /imagenet ...
Two nodes (run on each; node_rank 0 and 1; MASTER is node 0's address):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=MASTER:29500 \
        -m reslab train ...
CPU processes use gloo, GPUs NCCL. The recipe's batch is the GLOBAL batch: each rank gets batch / world.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(requested: str | None = None) -> torch.device:
    if requested and requested != "auto":
        try:
            dev = torch.device(requested)
        except RuntimeError as e:
            raise ValueError(f"--device {requested!r} is not a device ({e}); use auto, cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: no CUDA device here; use --device cpu (or auto)")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"--device {requested}: reslab runs on cpu or cuda")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init(device: str | None = None) -> DistInfo:
    """Join the process group if torchrun started us; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = pick_device(device)
    if world == 1:
        return DistInfo(device=dev)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP and torch.compile wrappers: its state dict has no module./_orig_mod. prefix."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
