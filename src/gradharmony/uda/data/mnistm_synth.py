"""MNIST-M rebuilt offline by the DANN recipe (Ganin & Lempitsky 2015): |photo patch - digit|.

For every MNIST digit (train: the 60,000 training digits, test: the 10,000 test digits, in
MNIST order and with MNIST's labels) the gray digit is resized to 32x32 (bilinear) and repeated
over 3 channels; a 32x32 patch is cut at a uniformly random position of a random photograph
(see :mod:`gradharmony.uda.data.photos` for which photos, and how train and test photos are kept
apart) shown at a random one of the scales ``PHOTO_SCALES``, flipped left-right with
probability 1/2, and the image is ``|patch - digit|`` per channel (uint8).  The scales give a
handful of photos the variety of texture that 500 BSDS500 photos have (patches of a photo at
full size are mostly smooth).  Everything random comes from ``numpy.random.default_rng`` seeded by
``(seed, split)``, drawn for the whole split up front, so the same seed gives an identical tensor
and ``limit=n`` gives the first ``n`` images of the full split.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from gradharmony.uda.data import mnist
from gradharmony.uda.data.photos import PhotoSet, find_photos, load_photos
from gradharmony.uda.data.sources import Found
from gradharmony.uda.data.transforms import resize

log = logging.getLogger(__name__)
SIZE = 32
PHOTO_SCALES = (1.0, 0.7, 0.5, 0.35)
SPLIT_STREAM = {"train": 0, "test": 1}


def locate(split: str, data_root: Path) -> Found:
    digits = mnist.locate(split, data_root)
    photos = find_photos(split, data_root)
    return Found(
        "mnistm-synth",
        digits.files + photos.files,
        f"MNIST-M recipe: {digits.description}; photos: {photos.source}",
        (digits, photos),
    )


def blend(
    digits: np.ndarray, photos: list[np.ndarray], rng: np.random.Generator, limit: int | None = None
) -> np.ndarray:
    """``|patch - digit|`` as uint8 ``[n, 3, 32, 32]`` for gray digits ``[N, H, W]``.

    The random choices are drawn for all ``N`` digits, then only the first ``limit`` are made.
    """
    count = len(digits)
    which = rng.integers(0, len(photos), count)
    heights = np.array([p.shape[0] - SIZE + 1 for p in photos])
    widths = np.array([p.shape[1] - SIZE + 1 for p in photos])
    rows = (rng.random(count) * heights[which]).astype(np.int64)
    cols = (rng.random(count) * widths[which]).astype(np.int64)
    flips = rng.random(count) < 0.5
    n = count if limit is None else min(limit, count)

    digits32 = resize(torch.from_numpy(np.array(digits[:n]))[:, None], SIZE).numpy()
    out = np.empty((n, 3, SIZE, SIZE), dtype=np.uint8)
    for k, photo in enumerate(photos):
        idx = np.flatnonzero(which[:n] == k)
        if idx.size == 0:
            continue
        windows = sliding_window_view(photo, (SIZE, SIZE), axis=(0, 1))  # [h, w, 3, 32, 32], a view
        patches = windows[rows[idx], cols[idx]]
        patches = np.where(flips[idx, None, None, None], patches[..., ::-1], patches)
        out[idx] = np.abs(patches.astype(np.int16) - digits32[idx].astype(np.int16)).astype(np.uint8)
    return out


def read(found: Found, split: str, seed: int, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    digit_source, photo_set = found.payload
    photo_set: PhotoSet
    digits, labels = mnist.read_gray(digit_source, split)
    photos = load_photos(photo_set, SIZE, PHOTO_SCALES)
    log.info("mnistm-synth %s: photos from %s", split, photo_set.source)
    rng = np.random.default_rng([seed, SPLIT_STREAM[split], 0x4D4D])
    images = blend(digits, photos, rng, limit)
    return images, labels[: len(images)]
