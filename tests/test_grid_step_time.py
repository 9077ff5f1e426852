"""``benchmarks/grid_step_time.py``: which runs of a grid it times, its table, and a bad grid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from benchmark_scripts import load_benchmark
from fakes.digits import write_fake_data_root


@pytest.fixture
def step_time(monkeypatch):
    return load_benchmark("grid_step_time", monkeypatch)


def write_grid(tmp_path: Path, **changes) -> Path:
    grid = {
        "out": str(tmp_path / "runs"),
        "base": {
            "steps": 100,
            "batch_size": 4,
            "image_size": 16,
            "channels": 1,
            "bottleneck_dim": 8,
            "data_root": str(tmp_path / "elsewhere"),
            "cache_dir": str(tmp_path / "cache"),
        },
        "tasks": {"usps->mnistm": {"source": "usps", "target": "mnistm"}},
        "methods": {"dann": {}},
        "variants": {"none": {"harmonizer": "none", "measure_every": 10}, "gh++@heads": {"harmonizer": "gh++"}},
        "seeds": [3, 4],
        **changes,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def test_each_variant_of_the_first_seed_after_plain_training(tmp_path, step_time):
    cells = step_time.variants_by_cell([str(write_grid(tmp_path))], str(tmp_path / "data"))
    variants = cells[("usps->mnistm", "dann")]
    assert list(variants) == [step_time.PLAIN, "none", "gh++@heads"]
    assert {config.seed for config in variants.values()} == {3}
    assert {config.data_root for config in variants.values()} == {str(tmp_path / "data")}
    plain, measured = variants[step_time.PLAIN], variants["none"]
    assert (plain.harmonizer, plain.measure_every) == ("none", 0)
    assert (measured.harmonizer, measured.measure_every) == ("none", 10)
    assert variants["gh++@heads"].harmonizer == "gh++"


def test_prints_a_row_per_variant_with_plain_at_one(tmp_path, step_time, capsys):
    data = write_fake_data_root(tmp_path / "data", count=16)
    code = step_time.main([str(write_grid(tmp_path)), "--data-root", str(data), "--repeats", "1", "--steps", "1"])
    assert code == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| usps->mnistm")]
    assert [row.split(" | ")[2] for row in rows] == [step_time.PLAIN, "none", "gh++@heads"]
    assert rows[0].endswith("| 1.00x |")


def test_a_bad_grid_is_one_line_and_exit_2(tmp_path, step_time, capsys):
    code = step_time.main([str(write_grid(tmp_path, epochs=3))])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: unknown grid key(s) epochs; valid: out, base, tasks, methods, variants, seeds, workers"
    ]
