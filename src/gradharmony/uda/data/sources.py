"""What a domain's locate step found on disk, and the "not found" message every loader shares.

Each domain module has two steps: ``locate(split, data_root) -> Found`` (cheap: checks which
accepted layout is present, raises :class:`DatasetNotFoundError` if none) and
``read(found, split, seed, limit) -> (images, labels)`` (expensive: decodes or generates).
The split keeps cache look-ups cheap: the cache key is made from :meth:`Found.fingerprint`
without reading any data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradharmony.uda.data.domain import DatasetNotFoundError


@dataclass(frozen=True)
class Found:
    """The files a domain will be read from.

    Attributes:
        layout: which accepted layout was found (e.g. ``"usps-h5"``).
        files: the files (or folders) whose size and modification time identify the data.
        description: one line for ``Domain.source`` and logs.
        payload: whatever the domain's ``read`` step needs (paths, nested ``Found`` objects).
    """

    layout: str
    files: tuple[Path, ...]
    description: str
    payload: Any = None

    def fingerprint(self) -> list[list[Any]]:
        out = []
        for path in self.files:
            st = Path(path).stat()
            out.append([str(path), st.st_size, st.st_mtime_ns])
        return out


def first_existing(*candidates: Path) -> Path | None:
    """The first of ``candidates`` that is a file, or ``None``."""
    return next((p for p in candidates if p.is_file()), None)


def not_found(domain: str, looked_at: list[Path], layouts: str, where: str) -> DatasetNotFoundError:
    """A :class:`DatasetNotFoundError` naming the domain, the paths tried, the layouts and a source."""
    tried = "\n".join(f"  {p}  ({'present' if p.exists() else 'missing'})" for p in looked_at)
    return DatasetNotFoundError(
        f"dataset for domain {domain!r} not found. Looked at:\n{tried}\n"
        f"Accepted layouts:\n{layouts}\nWhere to get it: {where}\n"
        "Pass data_root=... to load_domain or set $GRADHARMONY_DATA_ROOT."
    )


def take(images: np.ndarray, labels: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` examples (all when ``limit`` is None)."""
    if limit is None:
        return images, labels
    return images[:limit], labels[:limit]
