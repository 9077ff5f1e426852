"""The in-memory form of one split of one domain, and the errors a loader raises.

A :class:`Domain` holds every image of a split as one ``uint8`` tensor ``[N, C, H, W]`` already
in the model's input space (size and channels chosen by :func:`gradharmony.uda.data.load_domain`), so
source and target domains can be stacked, batched and normalised the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


class DatasetNotFoundError(FileNotFoundError):
    """A domain's files are not where the loader looked.

    The message names the domain, every path looked at, the accepted layouts and where to get
    the data.
    """


class DatasetFormatError(ValueError):
    """A dataset file exists but cannot be read (truncated, corrupt or of another format)."""

    def __init__(self, path: str | Path, expected: str, cause: BaseException | None = None) -> None:
        detail = f": {type(cause).__name__}: {cause}" if cause is not None else ""
        super().__init__(
            f"cannot read {path} (expected {expected}){detail}. "
            "The file may be truncated or corrupt; download it again."
        )
        self.path = Path(path)


@dataclass
class Domain:
    """One split of one domain, in the shared input space.

    Attributes:
        name: the domain's name, one of ``DOMAIN_NAMES`` (e.g. ``"mnist"``).
        split: ``"train"`` or ``"test"``.
        images: ``uint8`` tensor ``[N, C, H, W]`` at the requested size and channels, or for a
            feature domain (Office-Caltech10) a ``float32`` tensor ``[N, D]``.
        labels: ``int64`` tensor ``[N]`` with values in ``0 .. num_classes - 1``.
        num_classes: 10 for every digit domain.
        source: where the data came from (files, layout, or for generated domains the recipe and
            e.g. which photographs were used).
    """

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    source: str = ""

    def __post_init__(self) -> None:
        is_image = self.images.dtype == torch.uint8 and self.images.dim() == 4
        is_feature = self.images.dtype == torch.float32 and self.images.dim() == 2
        if not (is_image or is_feature):
            raise ValueError(
                f"images must be uint8 [N, C, H, W] (or float32 [N, D] features), got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be int64 [N] with N={self.images.shape[0]}, got "
                f"{self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def __repr__(self) -> str:
        n, *shape = self.images.shape
        return (
            f"Domain(name={self.name!r}, split={self.split!r}, n={n}, shape={shape}, "
            f"num_classes={self.num_classes}, source={self.source!r})"
        )
