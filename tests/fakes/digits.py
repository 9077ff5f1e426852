"""Tiny datasets written in every layout the loaders accept, for tests and smoke runs.

The images are not digits: each is a random-intensity rectangle on a dark, noisy background
(so every image has "ink" with a bounding box), with a label chosen at random.  They exercise the
file formats, shapes, orders and labels, not learning.

Example::

    root = write_fake_data_root(tmp_path, count=20)
    load_domain("usps", "test", data_root=root)      # reads root/usps.t.bz2
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
from pathlib import Path

import numpy as np


def fake_images(count: int, size: int, channels: int = 1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 [count, size, size] or [count, size, size, 3], int64 [count])``."""
    rng = np.random.default_rng(seed)
    shape = (count, size, size) if channels == 1 else (count, size, size, channels)
    images = rng.integers(0, 40, shape, dtype=np.uint8)
    for i in range(count):
        top, left = rng.integers(1, size // 3, 2)
        bottom, right = rng.integers(size // 2, size - 1, 2)
        images[i, top:bottom, left:right] = rng.integers(150, 256, channels if channels > 1 else None)
    return images, rng.integers(0, 10, count).astype(np.int64)


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """An IDX file of unsigned bytes (``.gz`` appended when ``compress``)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path = Path(f"{path}.gz") if compress else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_mnist_idx(root: Path, split: str, images: np.ndarray, labels: np.ndarray, compress: bool = True) -> None:
    """``<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (torchvision's layout)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    raw = Path(root) / "MNIST" / "raw"
    write_idx(raw / f"{prefix}-images-idx3-ubyte", images, compress)
    write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8), compress)


def write_usps_libsvm(root: Path, split: str, images: np.ndarray, labels: np.ndarray) -> Path:
    """``<root>/usps.bz2`` or ``usps.t.bz2``: LIBSVM lines, label + 1, pixels mapped to [-1, 1]."""
    values = images.reshape(len(images), -1).astype(np.float64) / 255.0 * 2.0 - 1.0
    lines = [
        " ".join([str(int(y) + 1)] + [f"{j + 1}:{v:.6f}" for j, v in enumerate(row)]) for row, y in zip(values, labels)
    ]
    path = Path(root) / ("usps.bz2" if split == "train" else "usps.t.bz2")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    return path


def write_usps_h5(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """``<root>/usps/usps.h5`` with ``<split>/data`` float32 [N, 256] in [0, 1] and ``<split>/target``."""
    import h5py

    path = Path(root) / "usps" / "usps.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for split, (images, labels) in splits.items():
            f[f"{split}/data"] = images.reshape(len(images), -1).astype(np.float32) / 255.0
            f[f"{split}/target"] = labels.astype(np.int32)
    return path


def _write_mnistm_labels(folder: Path, split: str, labels: np.ndarray) -> list[str]:
    names = [f"{i:08d}.png" for i in range(len(labels))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"mnist_m_{split}_labels.txt").write_text("".join(f"{n} {int(y)}\n" for n, y in zip(names, labels)))
    return names


def write_mnistm_pngs(root: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """``<root>/mnist_m/mnist_m_<split>/*.png`` + ``mnist_m_<split>_labels.txt``; images [N, 32, 32, 3]."""
    from PIL import Image

    folder = Path(root) / "mnist_m"
    names = _write_mnistm_labels(folder, split, labels)
    png_dir = folder / f"mnist_m_{split}"
    png_dir.mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, images):
        Image.fromarray(image).save(png_dir / name)


def write_mnistm_npy_xz(root: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """``<root>/mnist_m/mnist_m_<split>_x.npy.xz`` + labels file; images ``[N, 32, 32, 3]``."""
    folder = Path(root) / "mnist_m"
    _write_mnistm_labels(folder, split, labels)
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(images, dtype=np.uint8))
    (folder / f"mnist_m_{split}_x.npy.xz").write_bytes(lzma.compress(buffer.getvalue(), preset=1))


def write_svhn_mat(root: Path, split: str, images: np.ndarray, labels: np.ndarray) -> Path:
    """``<root>/svhn/<split>_32x32.mat``: ``X`` [32, 32, 3, N], ``y`` [N, 1] with 10 for digit 0."""
    import scipy.io

    path = Path(root) / "svhn" / f"{split}_32x32.mat"
    path.parent.mkdir(parents=True, exist_ok=True)
    y = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)
    scipy.io.savemat(path, {"X": np.ascontiguousarray(images.transpose(1, 2, 3, 0)), "y": y})
    return path


def write_fake_data_root(root: str | Path, count: int = 20, seed: int = 0) -> Path:
    """A data root with ``count`` fake images per split of mnist (IDX), usps (LIBSVM), mnistm
    (PNG folders) and svhn (.mat); returns ``root``."""
    root = Path(root)
    for offset, split in enumerate(("train", "test")):
        s = seed * 10 + offset
        write_mnist_idx(root, split, *fake_images(count, 28, 1, s))
        write_usps_libsvm(root, split, *fake_images(count, 16, 1, s + 2))
        write_mnistm_pngs(root, split, *fake_images(count, 32, 3, s + 4))
        write_svhn_mat(root, split, *fake_images(count, 32, 3, s + 6))
    return root


def listing(root: str | Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` (relative path -> size and modification time in ns):
    equal before and after iff nothing under ``root`` was created, changed or removed."""
    root = Path(root)
    out = {}
    for path in sorted(root.rglob("*")):
        stat = path.lstat()
        out[str(path.relative_to(root))] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns)
    return out


def truncate_file(path: str | Path, keep: float = 0.5) -> Path:
    """Cut ``path`` to the first ``keep`` share of its bytes (a download that stopped half-way)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path
