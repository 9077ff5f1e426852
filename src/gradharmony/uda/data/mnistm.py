"""Real MNIST-M (Ganin & Lempitsky 2015): 59,001 train + 9,001 test digits, 32x32 RGB.

MNIST digits blended with BSDS500 colour patches, as released with DANN.  Two accepted layouts
under ``<data_root>/mnist_m/``, tried in this order:

1. the usual distribution: folders ``mnist_m_train/`` and ``mnist_m_test/`` of PNGs plus
   ``mnist_m_train_labels.txt`` / ``mnist_m_test_labels.txt`` with lines ``"00000000.png 5"``
   (the label file fixes the order).
2. the compact copy: ``mnist_m_{train,test}_x.npy.xz``, an xz-compressed ``numpy.save`` of a
   uint8 array ``[N, 32, 32, 3]`` (HWC, RGB) in label-file order, next to the same label files.
   Decompressing the train array takes ~10 s, hence the cache.

The cache key sees the PNG folder's modification time (files added or removed), not each PNG's.
"""

from __future__ import annotations

import lzma
from pathlib import Path

import numpy as np

from gradharmony.uda.data.domain import DatasetFormatError
from gradharmony.uda.data.sources import Found, not_found, take

LAYOUTS = (
    "  - <data_root>/mnist_m/mnist_m_{train,test}/*.png\n"
    "    + <data_root>/mnist_m/mnist_m_{train,test}_labels.txt\n"
    "    (label lines '<file name> <digit>'; the DANN release)\n"
    "  - <data_root>/mnist_m/mnist_m_{train,test}_x.npy.xz + the same label files\n"
    "    (xz-compressed numpy.save of uint8 [N, 32, 32, 3])"
)
WHERE = (
    "the MNIST-M release of Ganin & Lempitsky (DANN, http://yaroslav.ganin.net/), e.g. via "
    "github.com/fungtion/DANN (mnist_m.tar.gz); unpack it into <data_root>/mnist_m/"
)


def locate(split: str, data_root: Path) -> Found:
    folder = data_root / "mnist_m"
    labels = folder / f"mnist_m_{split}_labels.txt"
    png_dir = folder / f"mnist_m_{split}"
    packed = folder / f"mnist_m_{split}_x.npy.xz"
    if labels.is_file() and png_dir.is_dir():
        return Found("mnistm-png", (labels, png_dir), f"MNIST-M {split} from PNGs in {png_dir}", (labels, png_dir))
    if labels.is_file() and packed.is_file():
        return Found("mnistm-npy-xz", (labels, packed), f"MNIST-M {split} from {packed}", (labels, packed))
    raise not_found("mnistm", [labels, png_dir, packed], LAYOUTS, WHERE)


def read_labels(path: Path) -> tuple[list[str], np.ndarray]:
    """File names and digits from a label file of ``"<file name> <digit>"`` lines."""
    names, digits = [], []
    try:
        for line in path.read_text().splitlines():
            if line.strip():
                name, digit = line.split()
                names.append(name)
                digits.append(int(digit))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetFormatError(path, "lines '<file name> <digit>'", exc) from exc
    labels = np.asarray(digits, dtype=np.int64)
    if labels.size == 0 or labels.min() < 0 or labels.max() > 9:
        raise DatasetFormatError(path, "one or more lines '<file name> <digit 0..9>'")
    return names, labels


def read_pngs(png_dir: Path, names: list[str]) -> np.ndarray:
    from PIL import Image

    images = np.empty((len(names), 32, 32, 3), dtype=np.uint8)
    for i, name in enumerate(names):
        path = png_dir / name
        try:
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB"))
        except FileNotFoundError as exc:
            raise DatasetFormatError(png_dir, f"the image {name} listed in the label file", exc) from exc
        except OSError as exc:
            raise DatasetFormatError(path, "a 32x32 RGB PNG", exc) from exc
        if pixels.shape != (32, 32, 3):
            raise DatasetFormatError(path, f"a 32x32 RGB image, got shape {pixels.shape}")
        images[i] = pixels
    return images


def read_npy_xz(path: Path, count: int) -> np.ndarray:
    try:
        with lzma.open(path, "rb") as fh:
            images = np.load(fh, allow_pickle=False)
    except (OSError, EOFError, ValueError, lzma.LZMAError) as exc:
        raise DatasetFormatError(path, "an xz-compressed .npy of uint8 [N, 32, 32, 3]", exc) from exc
    if images.dtype != np.uint8 or images.shape != (count, 32, 32, 3):
        raise DatasetFormatError(
            path, f"uint8 [{count}, 32, 32, 3] (one image per label line), got {images.dtype} {images.shape}"
        )
    return images


def read(found: Found, split: str, seed: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    label_path, data_path = found.payload
    names, labels = read_labels(label_path)
    if found.layout == "mnistm-png":
        if limit is not None:
            names, labels = names[:limit], labels[:limit]
        images = read_pngs(data_path, names)
    else:
        images = read_npy_xz(data_path, len(names))
    images, labels = take(images, labels, limit)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), labels
