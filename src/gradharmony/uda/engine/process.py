"""Process setup: joining torch.distributed, synchronised batch norm, TensorBoard."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from gradharmony.uda.config import ConfigError
from gradharmony.uda.methods import Method


def summary_writer(folder: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the package is an optional extra
        raise ConfigError(
            "--tensorboard needs the tensorboard package: pip install 'gradharmony[tensorboard]'"
        ) from None
    return SummaryWriter(folder)


def synchronised_batch_norm(model: Method, device: torch.device) -> Method:
    """Every BatchNorm normalising with the statistics of the global batch (PyTorch's SyncBatchNorm).

    Without it each process normalises with its own batch, as plain DDP does.  The harmonizer's
    probes run backward through the synchronised layers on every process alike and are averaged
    as DDP averages gradients, so GH sees the global batch's gradients (a CUDA-only path: not
    exercised by the CPU test suite).
    """
    if device.type != "cuda":
        raise ConfigError(
            "sync_batchnorm needs CUDA devices: PyTorch's SyncBatchNorm does not run on "
            f"{device.type}; drop --sync-batchnorm (each process then keeps its own statistics)"
        )
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """``(rank, world size, whether we created the process group)``; under torchrun it joins."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return 0, 1, False
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), created
