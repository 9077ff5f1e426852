"""Training on image benchmarks (generated trees in the real layouts) through the engine and CLI."""

from __future__ import annotations

import pytest
import torch

from fakes.images import write_benchmark_tree
from gradharmony.uda.config import ConfigError, TrainConfig
from gradharmony.uda.engine import Trainer, train
from gradharmony.uda.runs import read_metrics
from trainer_faults import sigint_during_step


def image_config(tmp_path, root, **overrides) -> TrainConfig:
    values = dict(
        method="dann",
        harmonizer="gh",
        source="office31:amazon",
        target="office31:webcam",
        backbone="resnet18",
        resize=36,
        crop=32,
        bottleneck_dim=16,
        batch_size=4,
        steps=4,
        eval_every=2,
        source_eval_size=8,
        data_root=str(root),
        out=str(tmp_path / "run"),
        progress=False,
        method_params={"disc_hidden": 16},
    )
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def office31(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_benchmark_tree(root, "office31", domains=["amazon", "webcam"], per_class=1, size=40)
    return root


def test_office31_trains_evaluates_and_resumes_exactly(tmp_path, office31):
    result = train(image_config(tmp_path / "a", office31))
    assert result["steps"] == 4
    records = read_metrics(tmp_path / "a" / "run")
    assert [r["step"] for r in records] == [2, 4] and len(records[-1]["target_per_class_acc"]) == 31
    resumed = image_config(tmp_path / "b", office31)
    trainer = Trainer(resumed)
    sigint_during_step(trainer, 2)  # the third step
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert train(resumed)["last_target_acc"] == result["last_target_acc"]
    a = torch.load(tmp_path / "a" / "run" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items() if isinstance(v, torch.Tensor))


def test_image_domain_names_are_checked(tmp_path, office31):
    with pytest.raises(ConfigError, match="office31:amazon"):
        image_config(tmp_path, office31, target="mnist")
    with pytest.raises(ConfigError, match="ofice31"):
        image_config(tmp_path, office31, source="ofice31:amazon")


def test_missing_benchmark_folder_says_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="Office-31"):
        train(image_config(tmp_path, tmp_path / "nothing"))


def test_visda_reports_mean_per_class_accuracy(tmp_path):
    root = tmp_path / "data"
    write_benchmark_tree(root, "visda2017", per_class=1, size=36)
    cfg = image_config(tmp_path, root, source="visda2017:synthetic", target="visda2017:real", steps=2)
    train(cfg)
    last = read_metrics(cfg.out)[-1]
    assert last["target_metric"] == "mean_class_accuracy"
    assert last["target_acc"] == last["target_mean_class_acc"]
