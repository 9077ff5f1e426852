"""On-disk cache of decoded or generated domains (uint8 tensors), written atomically.

The cache folder is never inside a data root (data roots are read-only to the toolkit): it is the
``cache_dir`` given (``TrainConfig.cache_dir``, ``--cache-dir``), else :func:`default_cache_dir`
(``$GRADHARMONY_CACHE_DIR``, ``$XDG_CACHE_HOME/gradharmony`` or ``~/.cache/gradharmony``).  Entries
that earlier versions wrote into ``<data_root>/.cache`` are still read when present, never written.

Entries are ``<cache_dir>/<name>-<split>-<key>.pt`` where ``key`` hashes everything that
determines the tensor: domain, split, size, channels, seed (for generated domains), ``limit``,
the source files' sizes and modification times, and a version string bumped whenever a
recipe changes.  A file is written to a temporary name in the same folder and moved into place
with ``os.replace``, so an interrupted run leaves either the old entry or none, never half of
one.  Entries are read with ``torch.load(..., weights_only=True)`` (tensors and plain values only,
nothing in a file runs); an entry that cannot be loaded is reported with a warning and rebuilt.
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


#: Environment variable naming the cache folder (see :func:`default_cache_dir`).
CACHE_DIR_ENV = "GRADHARMONY_CACHE_DIR"
#: The folder inside a data root where earlier versions wrote their cache: read, never written.
LEGACY_CACHE_NAME = ".cache"


def default_cache_dir() -> Path:
    """The cache folder used when none is given: never inside a data root.

    ``$GRADHARMONY_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/gradharmony``, else
    ``~/.cache/gradharmony``.

    Example:
        >>> from unittest import mock
        >>> with mock.patch.dict("os.environ", {"GRADHARMONY_CACHE_DIR": "/tmp/gh-cache"}):
        ...     print(default_cache_dir())
        /tmp/gh-cache
    """
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "gradharmony"


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    """``cache_dir`` (``~`` expanded) if given, else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def legacy_cache_dir(data_root: Path) -> Path:
    """``<data_root>/.cache``, where earlier versions cached: entries found there are still read
    (a cache is a cache), but nothing is ever written into a data root."""
    return Path(data_root) / LEGACY_CACHE_NAME


def cache_key(parts: dict[str, Any]) -> str:
    """A short stable hash of ``parts`` (JSON-serialisable)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def cache_path(cache_dir: Path, name: str, split: str, parts: dict[str, Any]) -> Path:
    """The entry ``<cache_dir>/<name>-<split>-<key of parts>.pt``."""
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
