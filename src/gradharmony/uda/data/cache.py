"""On-disk cache of decoded or generated domains (uint8 tensors), written atomically.

Entries are ``<cache_dir>/<name>-<split>-<key>.pt`` where ``key`` hashes everything that
determines the tensor: domain, split, size, channels, seed (for generated domains), ``limit``,
the source files' sizes and modification times, and a version string bumped whenever a
recipe changes.  A file is written to a temporary name in the same folder and moved into place
with ``os.replace``, so an interrupted run leaves either the old entry or none, never half of
one.  An entry that cannot be loaded is reported with a warning and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def is_writable_folder(folder: Path) -> bool:
    """Whether ``folder`` is a folder we may write into.

    For root, ``os.access`` says yes to every folder, so a folder whose permissions grant no
    one write access (a read-only shared data copy) counts as not writable.
    """
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        return False
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return bool(folder.stat().st_mode & 0o222)
    return True


def default_cache_dir(data_root: Path) -> Path:
    """``<data_root>/.cache`` if the data root exists and is writable, else the user cache
    (``$XDG_CACHE_HOME/gradharmony`` or ``~/.cache/gradharmony``)."""
    if is_writable_folder(data_root / ".cache") or is_writable_folder(data_root):
        return data_root / ".cache"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gradharmony"


def cache_key(parts: dict[str, Any]) -> str:
    """A short stable hash of ``parts`` (JSON-serialisable)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def cache_path(cache_dir: Path, name: str, split: str, parts: dict[str, Any]) -> Path:
    return Path(cache_dir) / f"{name}-{split}-{cache_key(parts)}.pt"


def load_cached(path: Path) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """``(images, labels, source)`` from a cache entry, or ``None`` if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        images, labels, source = entry["images"], entry["labels"], entry["source"]
        if not (
            isinstance(images, torch.Tensor)
            and images.dtype == torch.uint8
            and isinstance(labels, torch.Tensor)
            and labels.dtype == torch.int64
            and images.shape[0] == labels.shape[0]
            and isinstance(source, str)
        ):
            raise ValueError("unexpected contents")
    except Exception as exc:  # any failure to read means the entry is rebuilt
        warnings.warn(
            f"cache entry {path} is unreadable ({type(exc).__name__}: {exc}); rebuilding it",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return images, labels, source


def save_cached(path: Path, images: torch.Tensor, labels: torch.Tensor, source: str) -> bool:
    """Write a cache entry atomically; returns False (with a warning) if the folder is not writable."""
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            torch.save({"images": images.contiguous(), "labels": labels.contiguous(), "source": source}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        log.debug("cached %s", path)
        return True
    except OSError as exc:
        warnings.warn(
            f"could not write cache entry {path} ({exc}); continuing without the cache", RuntimeWarning, stacklevel=3
        )
        return False
    finally:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.unlink(tmp_name)
