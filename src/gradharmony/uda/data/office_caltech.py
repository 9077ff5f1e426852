"""Office-Caltech10 as pre-extracted features: SURF bag-of-words (800-d) and DeCAF6 (4096-d).

Layout under the data root (the public distribution of Gong et al., CVPR 2012, and the DeCAF6
files of the same benchmark as redistributed with common domain-adaptation code)::

    office_caltech10/surf/{amazon,Caltech10,dslr,webcam}_SURF_L10.mat     keys fts (N x 800), labels
    office_caltech10/decaf6_partial/{dslr,webcam}.mat                     keys feas (N x 4096), labels
    (a folder named decaf6/ with amazon.mat and caltech.mat as well is read the same way)

Domains: ``oc10-surf-{amazon,caltech,dslr,webcam}`` and ``oc10-decaf-{amazon,caltech,dslr,webcam}``
(10 classes; 958 / 1123 / 157 / 295 samples).  As is standard for this benchmark there is no split:
"train" and "test" are the whole domain (the target is adapted to without labels and evaluated
on all its samples).  SURF features get the usual preprocessing (each histogram divided by its
sum, then z-scored per feature within the domain); DeCAF6 features are z-scored the same way.

Example::

    domain = load_feature_domain("oc10-surf-amazon", "train", data_root="../shared/data")
    domain.images.shape     # torch.Size([958, 800]), float32
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
import torch

from gradharmony.uda.data.domain import DatasetFormatError, DatasetNotFoundError, Domain

SURF_FILES = {
    "amazon": "amazon_SURF_L10.mat",
    "caltech": "Caltech10_SURF_L10.mat",
    "dslr": "dslr_SURF_L10.mat",
    "webcam": "webcam_SURF_L10.mat",
}
DECAF_FOLDERS = ("decaf6", "decaf6_partial")
FEATURE_DOMAINS: tuple[str, ...] = tuple(f"oc10-{kind}-{domain}" for kind in ("surf", "decaf") for domain in SURF_FILES)
WHERE = (
    "Office-Caltech10 features: the SURF_L10 .mat files of Gong et al. (CVPR 2012, GFK) and the "
    "DeCAF6 .mat files redistributed with public domain-adaptation code (e.g. the 'transferlearning' "
    "repository's TCA/BDA data folders)"
)


def _candidates(kind: str, domain: str, root: Path) -> list[Path]:
    base = root / "office_caltech10"
    if kind == "surf":
        return [base / "surf" / SURF_FILES[domain]]
    return [base / folder / f"{domain}.mat" for folder in DECAF_FOLDERS]


def _preprocess(kind: str, features: np.ndarray) -> np.ndarray:
    features = features.astype(np.float64)
    if kind == "surf":  # bag-of-words counts -> frequencies
        features = features / np.maximum(features.sum(1, keepdims=True), 1e-12)
    return (features - features.mean(0)) / (features.std(0) + 1e-12)


def load_feature_domain(name: str, split: str = "train", data_root: str | Path | None = None) -> Domain:
    """One Office-Caltech10 feature domain as a :class:`Domain` with float32 ``images [N, D]``."""
    if name not in FEATURE_DOMAINS:
        raise ValueError(f"unknown feature domain {name!r}; valid: {', '.join(FEATURE_DOMAINS)}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; valid splits: train, test")
    _, kind, domain = name.split("-")
    root = Path(data_root).expanduser() if data_root is not None else Path("data")
    candidates = _candidates(kind, domain, root)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        looked = "\n".join(f"  {p} (missing)" for p in candidates)
        raise DatasetNotFoundError(
            f"{name}: no feature file found. Looked at:\n{looked}\n"
            f"Put {WHERE} there (see gradharmony.uda.data.office_caltech)."
        )
    expected = "a MATLAB file with 'fts' or 'feas' (features [N, D]) and 'labels' (N labels in 1..10)"
    try:
        mat = scipy.io.loadmat(path)
        features = np.asarray(mat["fts"] if "fts" in mat else mat["feas"])
        labels = np.asarray(mat["labels"]).ravel().astype(np.int64) - 1
    except Exception as e:  # truncated or foreign file: scipy raises many types
        raise DatasetFormatError(path, expected, e) from e
    if features.ndim != 2 or len(features) == 0 or not np.issubdtype(features.dtype, np.number):
        raise DatasetFormatError(path, f"{expected}; got features {features.dtype} {features.shape}")
    if len(features) != len(labels) or labels.min() < 0 or labels.max() > 9:
        raise DatasetFormatError(
            path, f"one label in 1..10 per feature row; got {len(features)} rows and {len(labels)} labels"
        )
    images = torch.from_numpy(_preprocess(kind, features).astype(np.float32))
    return Domain(name, split, images, torch.from_numpy(labels), 10, f"{path} ({kind})")
