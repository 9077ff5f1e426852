"""Real USPS (Hull 1994): 7,291 train + 2,007 test handwritten digits, 16x16 gray.

Two accepted layouts under the data root, tried in this order:

1. torchvision's files ``<data_root>/usps.bz2`` (train) and ``<data_root>/usps.t.bz2`` (test), the
   LIBSVM-datasets copy that ``torchvision.datasets.USPS(root, download=True)`` fetches: one
   bzip2-compressed text line per image, ``"<label> 1:<v> 2:<v> ... 256:<v>"``, label 1..10
   meaning digit 0..9, values in [-1, 1], pixels row-major.  Absent indices count as 0 (sparse
   format), i.e. mid-gray.
2. the compact HDF5 copy ``<data_root>/usps/usps.h5`` (Kaggle "bistaumanga/usps-dataset"):
   datasets ``train/data`` and ``test/data`` float32 ``[N, 256]`` in [0, 1] (row-major 16x16) and
   ``train/target``, ``test/target`` int ``[N]`` with digits 0..9.
"""

from __future__ import annotations

import bz2
from pathlib import Path

import numpy as np

from gradharmony.uda.data.domain import DatasetFormatError
from gradharmony.uda.data.sources import Found, not_found, take

LIBSVM_NAME = {"train": "usps.bz2", "test": "usps.t.bz2"}
LAYOUTS = (
    "  - <data_root>/usps.bz2 and <data_root>/usps.t.bz2  (LIBSVM format, torchvision.datasets.USPS)\n"
    "  - <data_root>/usps/usps.h5  (HDF5 with train/data, train/target, test/data, test/target)"
)
WHERE = (
    "torchvision.datasets.USPS(<data_root>, download=True), or "
    "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass.html#usps, "
    "or the Kaggle dataset bistaumanga/usps-dataset (usps.h5)"
)


def locate(split: str, data_root: Path) -> Found:
    libsvm = data_root / LIBSVM_NAME[split]
    h5 = data_root / "usps" / "usps.h5"
    if libsvm.is_file():
        return Found("usps-libsvm-bz2", (libsvm,), f"USPS {split} from {libsvm}", libsvm)
    if h5.is_file():
        return Found("usps-h5", (h5,), f"USPS {split} from {h5}", h5)
    raise not_found("usps", [libsvm, h5], LAYOUTS, WHERE)


def read_libsvm(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Pixels in [-1, 1] as ``float32 [N, 256]`` and digits 0..9 from a bzip2 LIBSVM file."""
    rows, labels = [], []
    try:
        with bz2.open(path, "rt") as fh:
            for line in fh:
                parts = line.split()
                if not parts:
                    continue
                row = np.zeros(256, dtype=np.float32)
                for item in parts[1:]:
                    index, value = item.split(":")
                    row[int(index) - 1] = float(value)
                labels.append(int(float(parts[0])) - 1)
                rows.append(row)
    except (OSError, EOFError, ValueError, IndexError) as exc:
        raise DatasetFormatError(path, "bzip2-compressed LIBSVM lines '<label> 1:<v> ... 256:<v>'", exc) from exc
    if not rows:
        raise DatasetFormatError(path, "at least one LIBSVM line")
    return np.stack(rows), np.asarray(labels, dtype=np.int64)


def read_h5(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Pixels in [0, 1] as ``float32 [N, 256]`` and digits 0..9 from the HDF5 copy."""
    import h5py  # imported here: only this layout needs it

    try:
        with h5py.File(path, "r") as f:
            data = np.asarray(f[f"{split}/data"][()], dtype=np.float32)
            target = np.asarray(f[f"{split}/target"][()]).astype(np.int64)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:  # what h5py raises on bad files
        raise DatasetFormatError(path, f"HDF5 with datasets {split}/data [N, 256] and {split}/target [N]", exc) from exc
    if data.ndim != 2 or data.shape[1] != 256 or len(data) == 0 or target.shape != (len(data),):
        raise DatasetFormatError(
            path,
            f"{split}/data of shape [N, 256] and {split}/target of shape [N], N > 0; "
            f"got {data.shape} and {target.shape}",
        )
    return data, target


def read(found: Found, split: str, seed: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    if found.layout == "usps-libsvm-bz2":
        pixels, labels = read_libsvm(found.payload)
        pixels = (pixels + 1.0) / 2.0
    else:
        pixels, labels = read_h5(found.payload, split)
    if labels.min() < 0 or labels.max() > 9:
        raise DatasetFormatError(found.payload, f"labels of digits 0..9, got {labels.min()}..{labels.max()}")
    images = np.rint(pixels * 255.0).clip(0, 255).astype(np.uint8).reshape(-1, 1, 16, 16)
    return take(images, labels, limit)
