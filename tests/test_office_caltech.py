"""Office-Caltech10 feature domains: layouts, preprocessing, errors, and a short MLP run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from gradharmony.uda.config import ConfigError, TrainConfig
from gradharmony.uda.data import DatasetFormatError, DatasetNotFoundError, load_domain
from gradharmony.uda.engine import train

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write_features(root: Path, n: int = 40, dim: int = 20, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10 + 1).reshape(-1, 1)
    surf = root / "office_caltech10" / "surf"
    decaf = root / "office_caltech10" / "decaf6_partial"
    surf.mkdir(parents=True)
    decaf.mkdir(parents=True)
    for _domain, file in [("amazon", "amazon_SURF_L10.mat"), ("webcam", "webcam_SURF_L10.mat")]:
        counts = rng.integers(0, 5, (n, dim)).astype(np.uint8)
        counts[np.arange(n), labels.ravel() - 1] += 20  # class-specific words
        scipy.io.savemat(surf / file, {"fts": counts, "labels": labels})
    scipy.io.savemat(decaf / "webcam.mat", {"feas": rng.random((n, 30)), "labels": labels})
    return root


def test_surf_and_decaf_domains_load_and_are_standardised(tmp_path):
    root = write_features(tmp_path)
    surf = load_domain("oc10-surf-amazon", "train", data_root=root)
    assert surf.images.shape == (40, 20) and surf.images.dtype == torch.float32
    assert surf.labels.tolist()[:3] == [0, 1, 2]
    assert torch.allclose(surf.images.mean(0), torch.zeros(20), atol=1e-5)
    decaf = load_domain("oc10-decaf-webcam", "test", data_root=root)
    assert decaf.images.shape == (40, 30)


def test_missing_and_corrupt_feature_files_are_reported(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"amazon_SURF_L10\.mat"):
        load_domain("oc10-surf-amazon", "train", data_root=tmp_path)
    root = write_features(tmp_path)
    (root / "office_caltech10" / "surf" / "webcam_SURF_L10.mat").write_bytes(b"\x00" * 64)
    with pytest.raises(DatasetFormatError, match=r"webcam_SURF_L10\.mat"):
        load_domain("oc10-surf-webcam", "train", data_root=root)


def test_mlp_trains_on_features_and_rejects_images(tmp_path):
    root = write_features(tmp_path)
    cfg = TrainConfig(
        method="dann",
        harmonizer="gh",
        source="oc10-surf-amazon",
        target="oc10-surf-webcam",
        backbone="mlp",
        bottleneck_dim=16,
        steps=30,
        eval_every=15,
        batch_size=8,
        data_root=str(root),
        out=str(tmp_path / "run"),
        progress=False,
        method_params={"disc_hidden": 16},
    )
    result = train(cfg)
    assert result["last_target_acc"] > 0.3  # class-specific words make this easy; chance is 0.1
    with pytest.raises(ConfigError, match="feature vectors"):
        train(cfg.with_overrides({"backbone": "lenet", "out": str(tmp_path / "run2")}))


@pytest.mark.data
def test_shared_copies_have_the_standard_sizes():
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not here")
    sizes = {d: len(load_domain(f"oc10-surf-{d}", data_root=SHARED)) for d in ("amazon", "caltech", "dslr", "webcam")}
    assert sizes == {"amazon": 958, "caltech": 1123, "dslr": 157, "webcam": 295}
    assert load_domain("oc10-decaf-dslr", data_root=SHARED).images.shape == (157, 4096)
