"""Real SVHN (Netzer et al. 2011): 73,257 train + 26,032 test house-number digits, 32x32 RGB.

Accepted layout (torchvision's, as ``torchvision.datasets.SVHN(<data_root>/svhn, split, download=True)``
writes it): ``<data_root>/svhn/train_32x32.mat`` and ``<data_root>/svhn/test_32x32.mat``, MATLAB
(v5) files with ``X`` uint8 ``[32, 32, 3, N]`` and ``y`` ``[N, 1]`` with labels 1..10, where 10
means the digit 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gradharmony.uda.data.domain import DatasetFormatError
from gradharmony.uda.data.sources import Found, not_found, take

LAYOUTS = (
    "  - <data_root>/svhn/train_32x32.mat and <data_root>/svhn/test_32x32.mat\n"
    "    (format 2, cropped digits: X uint8 [32, 32, 3, N], y [N, 1] with 10 meaning digit 0)"
)
WHERE = (
    "http://ufldl.stanford.edu/housenumbers/ (train_32x32.mat, test_32x32.mat), or "
    "torchvision.datasets.SVHN(<data_root>/svhn, split=..., download=True)"
)


def locate(split: str, data_root: Path) -> Found:
    path = data_root / "svhn" / f"{split}_32x32.mat"
    if path.is_file():
        return Found("svhn-mat", (path,), f"SVHN {split} from {path}", path)
    raise not_found("svhn", [path], LAYOUTS, WHERE)


def read(found: Found, split: str, seed: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io  # imported here: only SVHN needs it

    path = found.payload
    expected = "a MATLAB file with X uint8 [32, 32, 3, N] and y [N, 1] (labels 1..10)"
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
        x, y = mat["X"], np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    except Exception as exc:  # scipy raises many types (ValueError, MatReadError, OSError, KeyError...)
        raise DatasetFormatError(path, expected, exc) from exc
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y) or y.size == 0 or y.min() < 1 or y.max() > 10:
        raise DatasetFormatError(path, f"{expected}; got X {x.shape}, y {y.shape}")
    labels = np.where(y == 10, 0, y)
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8, copy=False)
    return take(images, labels, limit)
