"""Real colour photographs for the offline MNIST-M recipe, with train and test kept apart.

Sources, in order of preference:

1. BSDS500 (the photos the DANN paper used), when ``<data_root>/BSDS500/**/*.jpg`` exists.  Photos
   whose path has a folder named ``test`` serve the test split, all others (``train``, ``val``)
   the train split: disjoint photos.
2. Otherwise the colour photographs bundled (no download) with scikit-image (``astronaut``,
   ``coffee``, ``chelsea``, ``rocket``, ``motorcycle_left``) and scikit-learn's
   ``load_sample_images`` (``china``, ``flower``): 7 natural photos of 300-741 px, about the
   scale of BSDS500 (481x321).  With so few photos, each is split into disjoint regions: the
   left 75 % of its columns serves train, the right 25 % test, so no test patch shares a pixel
   with a train patch.  (Gray, microscopy, astronomy and synthetic images in ``skimage.data`` are
   left out: DANN blended natural scenes.)

BSDS500 photos are also split by region if they are not arranged in train/val/test folders.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradharmony.uda.data.domain import DatasetFormatError

SKIMAGE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
TRAIN_FRACTION = 0.75  # of each photo's columns, when photos are split by region


@dataclass(frozen=True)
class PhotoSet:
    """Photos for one split: each used within columns ``[start, stop)`` as fractions of its width."""

    source: str
    files: tuple[Path, ...]
    columns: tuple[float, float]


def package_dir(name: str) -> Path | None:
    """An installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_photo_files() -> list[Path]:
    files = []
    skimage_dir, sklearn_dir = package_dir("skimage"), package_dir("sklearn")
    if skimage_dir is not None:
        files += [skimage_dir / "data" / name for name in SKIMAGE_PHOTOS]
    if sklearn_dir is not None:
        files += [sklearn_dir / "datasets" / "images" / name for name in SKLEARN_PHOTOS]
    return [f for f in files if f.is_file()]


def region_split(files: list[Path], split: str, source: str) -> PhotoSet:
    columns = (0.0, TRAIN_FRACTION) if split == "train" else (TRAIN_FRACTION, 1.0)
    return PhotoSet(
        f"{source}, {split} = columns {columns[0]:.0%}-{columns[1]:.0%} of each photo", tuple(files), columns
    )


def find_photos(split: str, data_root: Path) -> PhotoSet:
    """The photos for ``split``: BSDS500 under the data root if present, else the bundled ones."""
    bsds = sorted((data_root / "BSDS500").rglob("*.jpg")) if (data_root / "BSDS500").is_dir() else []
    if bsds:
        test = [p for p in bsds if "test" in p.relative_to(data_root).parts[:-1]]
        train = [p for p in bsds if p not in frozenset(test)]
        if test and train:
            chosen = train if split == "train" else test
            return PhotoSet(
                f"BSDS500 {split} photos ({len(chosen)}) from {data_root / 'BSDS500'}", tuple(chosen), (0.0, 1.0)
            )
        return region_split(bsds, split, f"BSDS500 ({len(bsds)} photos)")
    bundled = bundled_photo_files()
    if not bundled:
        raise FileNotFoundError(
            "no photographs for mnistm-synth: scikit-image and scikit-learn "
            f"bundled photos are missing and {data_root / 'BSDS500'} does not exist"
        )
    return region_split(bundled, split, f"{len(bundled)} photos bundled with scikit-image/scikit-learn")


def load_photos(photos: PhotoSet, min_size: int, scales: tuple[float, ...] = (1.0,)) -> list[np.ndarray]:
    """Each photo's column range as uint8 ``[H, W, 3]``, once per scale (Pillow's antialiased
    bilinear resize); regions smaller than ``min_size`` in either dimension are dropped."""
    from PIL import Image

    out = []
    for path in photos.files:
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except OSError as exc:
            raise DatasetFormatError(path, "a colour photograph readable by Pillow", exc) from exc
        width = rgb.width
        start, stop = (round(f * width) for f in photos.columns)
        region = rgb.crop((start, 0, stop, rgb.height))
        for scale in scales:
            size = (round(region.width * scale), round(region.height * scale))
            if min(size) < min_size:
                continue
            scaled = region if size == region.size else region.resize(size, Image.BILINEAR)
            out.append(np.asarray(scaled))
    if not out:
        raise ValueError(f"no photo region of at least {min_size}x{min_size} pixels in {photos.source}")
    return out
