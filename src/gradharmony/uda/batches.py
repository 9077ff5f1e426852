"""Endless training batches from a domain: in-memory tensors, or a Dataset read by a DataLoader.

Both draw index batches from :class:`gradharmony.uda.sampler.InfiniteBatches` (a fresh seeded
permutation per pass), so the order depends only on the seed, and both save and restore their
position.  ``TensorBatches`` resumes exactly.  ``LoaderBatches`` resumes the exact order of images;
random augmentations are also exact with ``workers=0`` (they draw from the process RNG, which the
engine checkpoints), and only approximately with worker processes (their RNGs are not saved).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from gradharmony.uda.sampler import InfiniteBatches
from gradharmony.uda.stopping import leave_stopping_to_the_main_process


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float inputs in [-1, 1]; float tensors (features, transformed
    images) pass through."""
    if images.dtype != torch.uint8:
        return images.float()
    return images.float().div_(127.5).sub_(1.0)


class _Shard:
    """This process's share of a global batch: process ``rank`` of ``world`` takes slice ``rank``.

    All processes draw the same global permutation (same seed), so together they see exactly the
    batches a single process with ``world`` times the batch size would see.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int, world: int):
        self.sampler = InfiniteBatches(size, batch_size * world, seed=seed)
        self.part = slice(rank * batch_size, (rank + 1) * batch_size)

    def next_indices(self) -> torch.Tensor:
        return self.sampler.next_indices()[self.part]


class TensorBatches:
    """Batches of a domain held as tensors (images ``[N, C, H, W]`` or features ``[N, D]``)."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, rank: int = 0, world: int = 1
    ):
        self.images, self.labels = images, labels
        self.shard = _Shard(len(labels), batch_size, seed, rank, world)
        self.sampler = self.shard.sampler

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.shard.next_indices().to(self.images.device)
        return to_input(self.images[index]), self.labels[index]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class _IndexStream:
    """An endless batch sampler for DataLoader (which may read ahead of what is consumed)."""

    def __init__(self, shard: _Shard):
        self.shard = shard

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.shard.next_indices().tolist()


class LoaderBatches:
    """Batches of a Dataset through a DataLoader with ``workers`` processes."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        workers: int = 0,
        device: torch.device | None = None,
        rank: int = 0,
        world: int = 1,
    ):
        self.dataset, self.workers = dataset, workers
        self.device = device if device is not None else torch.device("cpu")
        self.shard = _Shard(len(dataset), batch_size, seed, rank, world)
        self.sampler = self.shard.sampler
        self._restart()

    def _restart(self) -> None:
        # The loader reads ahead, so the position is "where the iterator started + consumed".
        self.start = self.sampler.state_dict()
        self.consumed = 0
        loader = DataLoader(
            self.dataset,
            batch_sampler=_IndexStream(self.shard),
            num_workers=self.workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            worker_init_fn=leave_stopping_to_the_main_process if self.workers else None,
        )
        self.iterator = iter(loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = next(self.iterator)
        self.consumed += 1
        return to_input(images.to(self.device, non_blocking=True)), labels.to(self.device, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["start"])
        for _ in range(int(state["consumed"])):  # index arithmetic only: no image is read
            self.sampler.next_indices()
        self._restart()
