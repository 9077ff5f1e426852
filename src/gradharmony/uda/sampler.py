"""Endless, resumable mini-batches over an in-memory dataset.

Each pass over the data is a fresh permutation drawn from the sampler's own generator, so the
sequence of batches depends only on the seed, and :meth:`InfiniteBatches.state_dict` captures the
exact position (generator state, current permutation, offset) for an exact resume.

Example:
    >>> b = InfiniteBatches(10, batch_size=4, seed=0)
    >>> first = [b.next_indices().tolist() for _ in range(3)]
    >>> c = InfiniteBatches(10, batch_size=4, seed=0)
    >>> _ = c.next_indices(); state = c.state_dict()
    >>> d = InfiniteBatches(10, batch_size=4, seed=99); d.load_state_dict(state)
    >>> [d.next_indices().tolist() for _ in range(2)] == first[1:]
    True
"""

from __future__ import annotations

from typing import Any

import torch

from gradharmony.uda.config import ConfigError


class InfiniteBatches:
    """Index batches of ``batch_size`` drawn without replacement within each pass (drop-last)."""

    def __init__(self, size: int, batch_size: int, seed: int):
        if size < batch_size:
            raise ConfigError(
                f"a domain of {size} examples cannot fill a batch of {batch_size}: lower --batch-size (or raise the limit)"
            )
        self.size, self.batch_size = size, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.permutation = torch.randperm(size, generator=self.generator)
        self.offset = 0
        self.passes = 0

    def next_indices(self) -> torch.Tensor:
        if self.offset + self.batch_size > self.size:
            self.permutation = torch.randperm(self.size, generator=self.generator)
            self.offset = 0
            self.passes += 1
        batch = self.permutation[self.offset : self.offset + self.batch_size]
        self.offset += self.batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "permutation": self.permutation.clone(),
            "offset": self.offset,
            "passes": self.passes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["permutation"]) != self.size:
            raise ValueError("sampler state is for a dataset of a different size")
        self.generator.set_state(state["generator"])
        self.permutation = state["permutation"].clone()
        self.offset, self.passes = int(state["offset"]), int(state["passes"])
