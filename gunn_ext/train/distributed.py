"""One process or many: the same code runs plain and under ``torchrun``.

``torchrun`` (single- or multi-node) sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; when they are present the
process group is initialised (NCCL on GPUs, gloo on the CPU), otherwise the run
is a single process with no process group at all.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..layers import GUNNLayer, SUNNLayer


@dataclass
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was requested but no CUDA GPU is visible")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def setup(device: str = "auto") -> Context:
    """Join the process group ``torchrun`` describes, or run as one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    context = Context(rank, world_size, local_rank, _pick_device(device, local_rank))
    if context.distributed and not dist.is_initialized():
        backend = "nccl" if context.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                device_id=context.device if backend == "nccl" else None)
        context.owns_group = True
    return context


def teardown(context: Context) -> None:
    if context.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(context: Context, values: torch.Tensor) -> torch.Tensor:
    if context.distributed:
        values = values.clone()
        dist.all_reduce(values)
    return values


def any_rank(context: Context, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (so all ranks stop at the same step)."""
    if not context.distributed:
        return flag
    value = torch.tensor([int(flag)], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_gather_objects(context: Context, obj) -> list:
    if not context.distributed:
        return [obj]
    gathered = [None] * context.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()


def convert_sync_batchnorm(model: nn.Module) -> list[str]:
    """Turn the ``nn.BatchNorm2d`` of the stem, transitions and head into
    ``nn.SyncBatchNorm``; returns the names of those converted.

    The BatchNorms inside GUNN/SUNN layers are left alone: the fused layer
    computes their statistics itself, so they stay per-rank.
    """
    converted = []

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, (GUNNLayer, SUNNLayer)):
                continue
            if isinstance(child, nn.BatchNorm2d):
                setattr(module, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                converted.append(path)
            else:
                visit(child, path + ".")

    visit(model, "")
    return converted
