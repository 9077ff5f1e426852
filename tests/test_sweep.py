"""Sweeps and reports: hash-keyed runs, skipping finished ones, paired tables."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from fakes.digits import write_fake_data_root
from gradharmony.uda.cli import main
from gradharmony.uda.config import ConfigError, TrainConfig
from gradharmony.uda.report import (
    Cell,
    collect,
    paired,
    summary_markdown,
    summary_rows,
    table_rows,
    task_families,
    variant_comparison_markdown,
)
from gradharmony.uda.runs import (
    TIMING_FIELDS,
    RunFolderLock,
    labelled_runs,
    read_config,
    read_labels,
    run_status,
    write_error,
    write_labels,
)
from gradharmony.uda.sweep import expand, read_archived, run_grid


def tiny_grid(tmp_path):
    root = write_fake_data_root(tmp_path / "data", count=24)
    return {
        "out": str(tmp_path / "runs"),
        "base": {
            "steps": 2,
            "eval_every": 2,
            "batch_size": 8,
            "image_size": 16,
            "channels": 1,
            "bottleneck_dim": 8,
            "data_root": str(root),
            "cache_dir": str(tmp_path / "cache"),
        },
        "tasks": {"usps->mnistm": {"source": "usps", "target": "mnistm"}},
        "methods": ["mcc"],
        "variants": {"none": {"harmonizer": "none"}, "gh": {"harmonizer": "gh"}},
        "seeds": [0, 1],
    }


def test_expand_is_seed_major_and_hash_keyed(tmp_path):
    runs = expand(tiny_grid(tmp_path))
    assert [(r.seed, r.variant) for r in runs] == [(0, "none"), (0, "gh"), (1, "none"), (1, "gh")]
    assert len({r.out for r in runs}) == 4
    assert all(r.out.name == r.config.outcome_hash() for r in runs)
    assert expand(tiny_grid(tmp_path))[0].out == runs[0].out  # stable across calls


def test_methods_may_carry_their_own_overrides(tmp_path):
    grid = {**tiny_grid(tmp_path), "methods": {"dann": {"method_params": {"disc_hidden": 16}}, "mcc": None}}
    runs = expand(grid)
    by_method = {r.method: r.config for r in runs}
    assert by_method["dann"].method_params == {"disc_hidden": 16}
    assert by_method["mcc"].method_params == {}
    plain = expand({**tiny_grid(tmp_path), "methods": ["dann"]})[0]
    assert plain.out != next(r for r in runs if r.method == "dann").out  # the override is in the hash


def test_grid_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="unknown grid key"):
        expand({**tiny_grid(tmp_path), "seedz": [0]})
    with pytest.raises(ConfigError, match="seeds"):
        expand({**tiny_grid(tmp_path), "seeds": []})
    with pytest.raises(ConfigError, match="unknown config key"):
        expand({**tiny_grid(tmp_path), "base": {"lr_rate": 1}})


def test_a_grid_without_variants_keeps_the_base_harmonizer(tmp_path):
    grid = {k: v for k, v in tiny_grid(tmp_path).items() if k != "variants"}
    grid["base"] = {**grid["base"], "harmonizer": "gh++", "lead": "align", "max_weight": 5.0}
    runs = expand(grid)
    assert [(r.variant, r.seed) for r in runs] == [("gh++", 0), ("gh++", 1)]
    assert all((r.config.harmonizer, r.config.lead, r.config.max_weight) == ("gh++", "align", 5.0) for r in runs)
    plain = expand({**grid, "base": tiny_grid(tmp_path)["base"]})  # no harmonizer anywhere: none
    assert [r.variant for r in plain] == ["none", "none"] and plain[0].config.harmonizer == "none"
    assert expand({**grid, "variants": {}})[0].out == runs[0].out  # an empty mapping is no variants
    with pytest.raises(ConfigError, match="'variants' must map"):
        expand({**grid, "variants": ["none", "gh"]})


def test_report_on_a_folder_without_runs_says_so(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{empty} holds no run records (metrics.jsonl); nothing to report")
    assert len(err.splitlines()) == 1
    write_labels(empty / "abc", "t", "dann", "none", 0)  # labelled but never started: still nothing
    assert main(["report", str(empty)]) == 2
    assert sorted(p.name for p in empty.iterdir()) == ["abc"]  # no report written
    with pytest.raises(ConfigError, match="nothing to report"):
        collect(empty)


def test_a_run_whose_folder_is_being_written_is_busy_not_failed(tmp_path):
    grid = {**tiny_grid(tmp_path), "seeds": [0]}
    taken = expand(grid)[0]
    with RunFolderLock(taken.out):  # as an orphan of a killed sweep would hold it
        counts = run_grid(grid, workers=1)
    assert counts == {"done": 1, "failed": 0, "busy": 1}
    assert not (taken.out / "error.txt").exists()
    assert run_status(taken.out, taken.config.steps) == "pending"
    assert run_grid(grid, workers=1) == {"done": 2, "failed": 0}  # the next sweep picks it up
    assert run_status(taken.out, taken.config.steps) == "done"


def test_sweep_runs_once_then_skips_and_reports(tmp_path):
    grid = tiny_grid(tmp_path)
    counts = run_grid(grid, workers=2)
    assert counts == {"done": 4, "failed": 0}
    assert all(run_status(r.out, r.config.steps) == "done" for r in expand(grid))
    labelled = {(labels["variant"], labels["seed"]): folder for labels, folder in labelled_runs(grid["out"])}
    assert labelled == {(r.variant, r.seed): r.out for r in expand(grid)}
    first = expand(grid)[0]
    assert TrainConfig.from_dict(read_config(first.out)).outcome_hash() == first.out.name
    mtimes = [(r.out / "last.pt").stat().st_mtime_ns for r in expand(grid)]
    assert run_grid(grid, workers=2)["done"] == 4  # nothing re-run
    assert mtimes == [(r.out / "last.pt").stat().st_mtime_ns for r in expand(grid)]
    cells = collect(grid["out"])
    assert set(cells) == {("usps->mnistm", "mcc", "none"), ("usps->mnistm", "mcc", "gh")}
    assert sorted(cells[("usps->mnistm", "mcc", "gh")].last) == [0, 1]


def _finished_record(step: int, acc: float) -> str:
    return (
        json.dumps(
            {"step": step, "target_acc": acc, "best_target_acc": acc, "config": {"steps": step}, "harmonizer": {}}
        )
        + "\n"
    )


def test_run_status_and_labels_are_read_from_the_folder(tmp_path):
    folder = tmp_path / "abc"
    assert run_status(folder, 10) == "pending"
    write_labels(folder, "t", "dann", "gh", 3)
    assert read_labels(folder) == {"task": "t", "method": "dann", "variant": "gh", "seed": 3}
    assert [(labels["seed"], path) for labels, path in labelled_runs(tmp_path)] == [(3, folder)]
    (folder / "last.pt").write_bytes(b"")
    assert run_status(folder, 10) == "partial"
    (folder / "metrics.jsonl").write_text(_finished_record(5, 0.5))
    assert run_status(folder, 10) == "partial"
    write_error(folder, "Traceback: boom")
    assert run_status(folder, 10) == "failed"
    (folder / "metrics.jsonl").write_text(_finished_record(5, 0.5) + _finished_record(10, 0.6))
    # killed between its final evaluation and its final checkpoint: the checkpoint is older
    os.utime(folder / "last.pt", ns=(1, 1))
    assert run_status(folder, 10) == "partial"
    (folder / "last.pt").write_bytes(b"")  # the final checkpoint, saved after the final evaluation
    assert run_status(folder, 10) == "done"


def test_two_folders_with_the_same_labels_are_reported(tmp_path):
    for name, acc in (("a", 0.5), ("b", 0.7)):
        write_labels(tmp_path / name, "t", "dann", "none", 0)
        (tmp_path / name / "metrics.jsonl").write_text(_finished_record(10, acc))
    with pytest.warns(UserWarning, match="both labelled"):
        cells = collect(tmp_path)
    assert cells[("t", "dann", "none")].last == {0: 70.0}


def test_a_reused_worker_trains_the_same_runs_as_fresh_ones(tmp_path):
    fresh = {**tiny_grid(tmp_path), "out": str(tmp_path / "fresh")}
    reused = {**tiny_grid(tmp_path), "out": str(tmp_path / "reused")}
    run_grid(fresh, workers=2, runs_per_process=1)
    run_grid(reused, workers=1, runs_per_process=4)  # one process trains all four, one after another
    for a, b in zip(expand(fresh), expand(reused)):
        records = [(r.out / "metrics.jsonl").read_text().splitlines() for r in (a, b)]
        drop_paths = [
            [{k: v for k, v in json.loads(line).items() if k not in ("config", *TIMING_FIELDS)} for line in lines]
            for lines in records
        ]
        assert drop_paths[0] == drop_paths[1]
    with pytest.raises(ConfigError, match="runs_per_process"):
        run_grid(fresh, runs_per_process=0)


def test_sweep_and_report_commands(tmp_path, capsys):
    grid = tiny_grid(tmp_path)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    assert main(["sweep", str(path), "--workers", "1", "--dry-run"]) == 0
    assert "pending" in capsys.readouterr().out
    assert main(["sweep", str(path), "--workers", "1"]) == 0
    assert (
        main(["report", grid["out"], "--plots", "--tsne", "--tsne-samples", "12", "--out", str(tmp_path / "report")])
        == 0
    )
    text = capsys.readouterr().out
    assert "| mcc | gh | 2 |" in text and "(" in text
    assert (tmp_path / "report" / "usps_to_mnistm_mcc.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "report.csv").exists()
    assert main(["report", grid["out"], "--compare", "gh", "none", "--out", str(tmp_path / "report")]) == 0
    assert "| usps->mnistm | mcc | " in capsys.readouterr().out.split("gh minus none")[1]
    assert main(["report", grid["out"], "--compare", "gh", "gh++", "--out", str(tmp_path / "report")]) == 2
    assert "no method has both variants 'gh' and 'gh++'" in capsys.readouterr().err
    assert (tmp_path / "report" / "tsne_usps_to_mnistm_mcc_gh.png").stat().st_size > 10_000


def test_two_variants_are_paired_seed_by_seed():
    cells = {
        ("t", "mdd", "gh++/align"): Cell("t", "mdd", "gh++/align", last={0: 60.0, 1: 62.0, 2: 61.0}),
        ("t", "mdd", "gh++/cls"): Cell("t", "mdd", "gh++/cls", last={0: 57.0, 1: 58.0}),
        ("t", "dann", "gh++/align"): Cell("t", "dann", "gh++/align", last={0: 70.0}),
    }
    table = variant_comparison_markdown(cells, "gh++/align", "gh++/cls")
    assert "| t | mdd | +3.50 +- 0.71 (2/2 up) |" in table
    assert "dann" not in table  # no classification-leading runs to pair with
    reverse = variant_comparison_markdown(
        {**cells, ("t", "mdd", "none"): Cell("t", "mdd", "none", last={0: 50.0})}, "none", "gh++/align"
    )
    assert "| t | mdd | -10.00 (0/1 up) | - |" in reverse  # the baseline may be the first variant too


def test_paired_delta_uses_common_seeds_only():
    base = Cell("t", "dann", "none", last={0: 70.0, 1: 72.0, 2: 71.0})
    gh = Cell("t", "dann", "gh", last={0: 71.0, 1: 74.0, 3: 99.0})
    p = paired(gh, base)
    assert p.seeds == [0, 1] and p.deltas == [1.0, 2.0]
    assert p.summary == "+1.50 +- 0.71 (2/2 up)"
    assert 0.0 < p.p_value < 1.0
    assert math.isnan(paired(base, base).p_value)


def test_unfinished_runs_are_listed_not_averaged():
    cells = {
        ("t", "dann", "none"): Cell(
            "t", "dann", "none", last={0: 70.0}, best={0: 71.0}, unfinished={2: (0, 3000), 1: (500, 3000), 3: (0, 3000)}
        )
    }
    row = table_rows(cells)[0]
    assert row["seeds"] == 1 and row["last"] == "70.00"
    assert row["unfinished"] == "not started: seeds 2, 3; seed 1 at step 500/3000"


def test_average_over_tasks_pairs_each_task_then_tests_across_tasks():
    cells = {}
    deltas = [1.0, 2.0, -0.5, 1.5, 0.5, 3.0]
    for i, delta in enumerate(deltas):
        task = f"task{i}"
        cells[(task, "dann", "none")] = Cell(task, "dann", "none", last={0: 60.0 + i, 1: 62.0 + i})
        cells[(task, "dann", "gh")] = Cell(task, "dann", "gh", last={0: 60.0 + i + delta, 1: 62.0 + i + delta})
    cells[("task6", "dann", "gh")] = Cell("task6", "dann", "gh", last={0: 99.0})  # no baseline: not paired
    rows = {r["variant"]: r for r in summary_rows(cells)}
    gh, none = rows["gh"], rows["none"]
    assert gh["tasks"] == 6 and (gh["tasks_up"], gh["tasks_down"]) == (5, 1)
    assert gh["mean_delta"] == pytest.approx(sum(deltas) / 6)
    assert gh["baseline_mean_acc"] == pytest.approx(none["mean_acc"]) == pytest.approx(61.0 + 2.5)
    assert 0.0 < gh["p"] < 0.2 and math.isnan(none["p"])
    assert "| dann | gh | 6 |" in summary_markdown(list(rows.values()))


def test_task_families_split_on_the_first_word():
    assert task_families(["surf A->W", "decaf D->W", "surf C->A"]) == {
        "decaf": ["decaf D->W"],
        "surf": ["surf A->W", "surf C->A"],
    }
    assert task_families(["mnist->usps", "mnist->mnistm"]) == {"all": ["mnist->mnistm", "mnist->usps"]}


def test_runs_archived_elsewhere_are_not_trained_again(tmp_path, capsys):
    """A JSON archive keyed by run folder names (as digits_parity.py report keeps) marks those runs
    finished elsewhere: the dry run lists them as archived and the sweep trains only the others."""
    grid = tiny_grid(tmp_path)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    kept, *others = expand(grid)
    archive = tmp_path / "runs.json"
    archive.write_text(json.dumps({kept.out.name: {"summary": {"last": 90.0}}}))
    assert main(["sweep", str(path), "--dry-run", "--skip-archived", str(archive)]) == 0
    listed = {Path(line.split()[-1]).name: line.split()[0] for line in capsys.readouterr().out.splitlines()}
    assert listed == {kept.out.name: "archived", **{r.out.name: "pending" for r in others}}
    assert run_grid(grid, workers=1, archived=read_archived(archive)) == {"done": 3, "failed": 0, "archived": 1}
    assert not (kept.out / "last.pt").exists()
    assert all(run_status(r.out, r.config.steps) == "done" for r in others)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"a name"'])
def test_an_unreadable_archive_is_one_line_and_exit_2(tmp_path, capsys, text):
    grid = tiny_grid(tmp_path)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    archive = tmp_path / "runs.json"
    archive.write_text(text)
    assert main(["sweep", str(path), "--skip-archived", str(archive)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "runs.json" in error
    assert not Path(grid["out"]).exists()
