"""Checkpoints: written atomically and durably, read safely.

:func:`save_checkpoint` writes ``last.pt.tmp``, forces it to disk, then renames it over
``last.pt``: a process killed at any moment (even mid-write) leaves the previous checkpoint whole,
and a leftover ``.tmp`` is simply overwritten by the next save.

A checkpoint holds tensors and plain Python values only (numbers, strings, lists, dicts), and is
read with ``torch.load(..., weights_only=True)``: a file that needs anything else to unpickle (a
checkpoint from elsewhere carrying code, or a corrupt file) is refused with a
:class:`CheckpointError` naming the file, and nothing in it runs.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from gradharmony.uda.config import ConfigError


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: missing, truncated, foreign, or carrying code."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` so that a crash mid-write never leaves a truncated file in place.

    The state goes to ``<path>.tmp``, is flushed to disk (``fsync``), then replaces ``path`` in one
    rename: ``path`` is always either the previous checkpoint or the new one, whole.
    """
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state saved by :func:`save_checkpoint`, read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = _named_global(str(e))
        if code is not None:
            raise CheckpointError(
                f"refusing to load checkpoint {path}: it asks to run {code}, and a checkpoint "
                f"holds only tensors and plain values; load only checkpoints you trust"
            ) from None
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated or not a checkpoint") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, IndexError, KeyError):
        raise CheckpointError(f"cannot read checkpoint {path}: the file is truncated or not a checkpoint") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a gradharmony run state")
    return state


def _named_global(message: str) -> str | None:
    """The global (a function or class) that a refused pickle asked for, from torch's message."""
    match = re.search(r"GLOBAL ([\w.]+)", message)
    return match.group(1) if match else None
