"""The digit domains ``load_domain`` knows: how to find each, read it, and its native form."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradharmony.uda.data import mnist, mnist8, mnistm, mnistm_synth, svhn, syndigits, uci8, usps
from gradharmony.uda.data.sources import Found


@dataclass(frozen=True)
class DomainSpec:
    """One domain.

    Attributes:
        locate: ``(split, data_root) -> Found``; raises ``DatasetNotFoundError``.
        read: ``(found, split, seed, limit) -> (uint8 [N, C, H, W], int64 [N])`` in native form.
        size, channels: the native image size and channel count ``read`` returns.
        seeded: whether ``seed`` changes the data (generated domains).
        version: bumped when the recipe changes, so old cache entries are not reused.
    """

    locate: Callable[[str, Path], Found]
    read: Callable[[Found, str, int, int | None], tuple[np.ndarray, np.ndarray]]
    size: int
    channels: int
    seeded: bool = False
    version: str = "1"
    num_classes: int = 10


DOMAINS: dict[str, DomainSpec] = {
    "mnist": DomainSpec(mnist.locate, mnist.read, 28, 1),
    "usps": DomainSpec(usps.locate, usps.read, 16, 1),
    "mnistm": DomainSpec(mnistm.locate, mnistm.read, 32, 3),
    "svhn": DomainSpec(svhn.locate, svhn.read, 32, 3),
    "mnistm-synth": DomainSpec(mnistm_synth.locate, mnistm_synth.read, 32, 3, seeded=True, version="2"),
    "syndigits": DomainSpec(syndigits.locate, syndigits.read, 32, 3, seeded=True),
    "uci8": DomainSpec(uci8.locate, uci8.read, 8, 1),
    "mnist8": DomainSpec(mnist8.locate, mnist8.read, 8, 1, version="2"),
}
# Feature domains (float vectors, no image size or channels) are read by office_caltech.py.
from gradharmony.uda.data.office_caltech import FEATURE_DOMAINS  # noqa: E402

DOMAIN_NAMES: tuple[str, ...] = tuple(DOMAINS) + FEATURE_DOMAINS
SPLITS: tuple[str, ...] = ("train", "test")
