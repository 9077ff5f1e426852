"""Real UCI optical-recognition handwritten digits (Alpaydin & Kaynak 1998), 8x8 gray.

Read with ``sklearn.datasets.load_digits`` (bundled with scikit-learn, no download): the 1,797
test-set images of the UCI "optdigits" collection, each an 8x8 grid of counts 0..16 (the number
of "on" pixels in each 4x4 block of a 32x32 bitmap).  Counts are scaled to bytes as
``round(count * 255 / 16)``.

The collection has no official split here, so a fixed stratified split is made: for each digit,
30 % of its images (rounded) go to ``test`` and the rest to ``train``, chosen by
``numpy.random.default_rng(0)`` whatever the ``seed`` argument, and kept in the original order.
That gives 1,258 train and 539 test images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gradharmony.uda.data.photos import package_dir
from gradharmony.uda.data.sources import Found, not_found, take

TEST_FRACTION = 0.3
SPLIT_SEED = 0


def counts_to_bytes(counts: np.ndarray) -> np.ndarray:
    """Block counts 0..16 -> uint8 0..255."""
    return np.rint(np.asarray(counts, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)


def stratified_test_mask(labels: np.ndarray, fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> np.ndarray:
    """Boolean mask selecting ``round(fraction * n_c)`` random images of every class ``c``."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for digit in np.unique(labels):
        members = np.flatnonzero(labels == digit)
        mask[rng.permutation(members)[: round(fraction * len(members))]] = True
    return mask


def locate(split: str, data_root: Path) -> Found:
    sklearn_dir = package_dir("sklearn")
    csv = sklearn_dir / "datasets" / "data" / "digits.csv.gz" if sklearn_dir else None
    if csv is None or not csv.is_file():
        raise not_found(
            "uci8",
            [csv or Path("<site-packages>/sklearn/datasets/data/digits.csv.gz")],
            "  - scikit-learn's bundled digits (sklearn.datasets.load_digits)",
            "pip install scikit-learn",
        )
    return Found("sklearn-digits", (csv,), f"UCI digits {split} from sklearn.datasets.load_digits", csv)


def read(found: Found, split: str, seed: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    labels = np.asarray(digits.target, dtype=np.int64)
    keep = stratified_test_mask(labels)
    if split == "train":
        keep = ~keep
    images = counts_to_bytes(digits.images[keep])[:, None]
    return take(images, labels[keep], limit)
