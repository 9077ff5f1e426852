"""Every method x benchmark recipe in configs/ expands to valid runs and trains in CI-sized form."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fakes.images import write_benchmark_tree
from gradharmony.uda.engine import train
from gradharmony.uda.sweep import expand

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# One recipe per method and image benchmark; configs/benchmarks/ holds the benchmark stages (several
# methods per grid, on real data), tested in test_benchmark_grids.py.
IMAGE_BENCHMARKS = ("office31", "officehome", "visda2017", "domainnet")
RECIPES = sorted(p for benchmark in IMAGE_BENCHMARKS for p in (CONFIGS / benchmark).glob("*.yaml"))
# CI-sized: a small random-init backbone on 32x32 crops of generated images, two steps.
TINY = {
    "backbone": "resnet18",
    "pretrained": None,
    "resize": 36,
    "crop": 32,
    "batch_size": 4,
    "steps": 2,
    "eval_every": 2,
    "loader_workers": 0,
    "device": "cpu",
    "source_eval_size": 4,
    "bottleneck_dim": 16,
    "progress": False,
}


def test_there_is_a_recipe_per_method_and_benchmark():
    from gradharmony.uda.methods import METHODS

    names = {(p.parent.name, p.stem) for p in RECIPES}
    for benchmark in IMAGE_BENCHMARKS:
        for method in METHODS:
            assert (benchmark, method) in names, (benchmark, method)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    for benchmark in IMAGE_BENCHMARKS:
        write_benchmark_tree(
            root, benchmark, per_class=1 if benchmark != "domainnet" else 2, size=36, lists=benchmark == "domainnet"
        )
    return root


@pytest.mark.parametrize("recipe", RECIPES, ids=[f"{p.parent.name}/{p.stem}" for p in RECIPES])
def test_recipe_runs_end_to_end_on_generated_images(recipe, data_root, tmp_path):
    grid = yaml.safe_load(recipe.read_text())
    runs = expand({**grid, "out": str(tmp_path / "runs")})
    assert len(runs) == len(grid["tasks"]) * len(grid["variants"]) * len(grid["seeds"])
    last = runs[len(grid["variants"]) - 1]  # the first task, the last variant (GH++ where there is one)
    cfg = last.config.with_overrides(
        {
            **TINY,
            "data_root": str(data_root),
            "out": str(tmp_path / "run"),
            "method_params": {**last.config.method_params, **_tiny_heads(last.method)},
        }
    )
    result = train(cfg)
    assert result["steps"] == 2 and 0.0 <= result["last_target_acc"] <= 1.0


def _tiny_heads(method: str) -> dict:
    return {"disc_hidden": 16} if method in ("dann", "cdan", "cdan+e", "gvb") else {}
