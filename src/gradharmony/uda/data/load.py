"""``load_domain``: find, read (or generate), cache and bring a digit domain into the input space."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from gradharmony.uda.data.cache import cache_path, legacy_cache_dir, load_cached, resolve_cache_dir, save_cached
from gradharmony.uda.data.domain import Domain
from gradharmony.uda.data.office_caltech import FEATURE_DOMAINS, load_feature_domain
from gradharmony.uda.data.registry import DOMAIN_NAMES, DOMAINS, SPLITS, DomainSpec
from gradharmony.uda.data.transforms import RESIZE_FILTERS, to_input_space

log = logging.getLogger(__name__)
CACHE_VERSION = "1"  # bump when the cache format or a shared step (e.g. resizing) changes


def default_data_root() -> Path:
    """``$GRADHARMONY_DATA_ROOT`` if set, else ``./data`` (relative to the working directory)."""
    env = os.environ.get("GRADHARMONY_DATA_ROOT")
    return Path(env).expanduser() if env else Path.cwd() / "data"


def _check_arguments(
    name: str, split: str, image_size: int, channels: int, seed: int, limit: int | None, resize_filter: str
) -> DomainSpec:
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; valid domains: {', '.join(DOMAIN_NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or a positive int, got {limit!r}")
    if resize_filter not in RESIZE_FILTERS:
        raise ValueError(f"unknown resize_filter {resize_filter!r}; valid filters: {', '.join(RESIZE_FILTERS)}")
    return DOMAINS[name]


def _read_native(
    spec: DomainSpec, name: str, found, split: str, seed: int, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = spec.read(found, split, seed, limit)
    expected = (spec.channels, spec.size, spec.size)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
        raise RuntimeError(f"{name} reader returned {images.dtype} {images.shape}, expected uint8 [N, {expected}]")
    labels = np.asarray(labels, dtype=np.int64)
    out_of_range = labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes)
    if labels.shape != (len(images),) or out_of_range:
        raise RuntimeError(f"{name} reader returned labels {labels.shape} outside 0..{spec.num_classes - 1}")
    images = np.ascontiguousarray(images)
    if not images.flags.writeable:  # e.g. np.frombuffer over an IDX file's bytes
        images = images.copy()
    return torch.from_numpy(images), torch.from_numpy(labels)


def _cached(path: Path, legacy: Path) -> tuple[torch.Tensor, torch.Tensor, str] | None:
    """The entry ``path`` of the cache folder, else the same entry in the data root's legacy
    ``.cache`` folder (read only), else ``None``."""
    for candidate in (path, legacy / path.name):
        if candidate.is_file() and (hit := load_cached(candidate)) is not None:
            log.debug("cache hit %s", candidate)
            return hit
    return None


def load_domain(
    name: str,
    split: str = "train",
    data_root: str | Path | None = None,
    image_size: int = 28,
    channels: int = 1,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    *,
    limit: int | None = None,
    use_cache: bool = True,
    resize_filter: str = "bilinear",
) -> Domain:
    """Load one split of a digit domain as uint8 ``[N, channels, image_size, image_size]``.

    Args:
        name: one of ``DOMAIN_NAMES``: ``mnist``, ``usps``, ``mnistm``, ``svhn`` (real data),
            ``mnistm-synth``, ``syndigits``, ``mnist8`` (generated offline), ``uci8`` (real,
            bundled with scikit-learn), ``oc10-{surf,decaf}-{amazon,caltech,dslr,webcam}``
            (Office-Caltech10 features: float ``[N, D]``, size and channels ignored).  Each
            module's docstring gives the source and layout.
        split: ``"train"`` or ``"test"``.
        data_root: folder holding the datasets (default :func:`default_data_root`).
        image_size: output height and width.
        channels: 1 (RGB -> luminance) or 3 (gray repeated).
        seed: seeds the generated domains (``mnistm-synth``, ``syndigits``); ignored by the others.
        cache_dir: where decoded/generated tensors are cached (default
            :func:`~gradharmony.uda.data.cache.default_cache_dir`: ``$GRADHARMONY_CACHE_DIR``, else
            ``$XDG_CACHE_HOME/gradharmony`` or ``~/.cache/gradharmony``).  Nothing is ever written
            into ``data_root``; entries an earlier version left in ``<data_root>/.cache`` are
            still read.
        limit: keep only the first ``limit`` examples of the split (for generated domains: the
            first ``limit`` of the full split, generated alone, so small tests stay fast).
        use_cache: set False to neither read nor write the cache.
        resize_filter: ``bilinear`` (antialiased) or ``bicubic`` (Pillow's, as TLlib's digit
            scripts); see :mod:`gradharmony.uda.data.transforms`.

    Raises:
        ValueError: unknown name or split, or invalid size, channels, seed or limit.
        DatasetNotFoundError: the data is not under ``data_root`` in any accepted layout.
        DatasetFormatError: a data file exists but is corrupt.

    Two cache entries may be written: the native form (e.g. 32x32 RGB for MNIST-M) and the
    requested one, so asking for another size later skips the slow decode.
    """
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    if name in FEATURE_DOMAINS:  # pre-extracted features: no resizing, no cache needed (small .mat files)
        return load_feature_domain(name, split, root)
    spec = _check_arguments(name, split, image_size, channels, seed, limit, resize_filter)
    found = spec.locate(split, root)
    folder = resolve_cache_dir(cache_dir)
    legacy = legacy_cache_dir(root)
    native_parts = {
        "name": name,
        "split": split,
        "seed": seed if spec.seeded else None,
        "limit": limit,
        "layout": found.layout,
        "sources": found.fingerprint(),
        "version": f"{CACHE_VERSION}.{spec.version}",
        "image_size": "native",
        "channels": "native",
    }
    native_path = cache_path(folder, name, split, native_parts)
    is_native = (image_size, channels) == (spec.size, spec.channels)
    resized_parts = {**native_parts, "image_size": image_size, "channels": channels}
    if resize_filter != "bilinear":  # the bilinear entries keep the keys they were written under
        resized_parts["resize_filter"] = resize_filter
    final_path = native_path if is_native else cache_path(folder, name, split, resized_parts)

    def make(images: torch.Tensor, labels: torch.Tensor) -> Domain:
        return Domain(name, split, images, labels, spec.num_classes, found.description)

    if use_cache and (hit := _cached(final_path, legacy)) is not None:
        return make(hit[0], hit[1])
    hit = _cached(native_path, legacy) if use_cache and not is_native else None
    if hit is not None:
        images, labels = hit[0], hit[1]
    else:
        log.info("%s %s: reading %s", name, split, found.description)
        images, labels = _read_native(spec, name, found, split, seed, limit)
        if use_cache:
            save_cached(native_path, images, labels, found.description)
    if not is_native:
        images = to_input_space(images, image_size, channels, resize_filter)
        if use_cache:
            save_cached(final_path, images, labels, found.description)
    return make(images, labels)
