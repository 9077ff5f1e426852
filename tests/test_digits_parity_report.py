"""``benchmarks/digits_parity.py report`` on hand-written run folders whose answers are known: the
parity row (last, label-free pick, best, best at TLlib's epoch ends, gap to the published number),
GH on top (paired deltas against ``none`` of the same seed), the cheap scopes (step-time ratio, share
of the full-scope delta, paired delta against the full scope, mean weights), and unfinished runs
listed as such.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark_scripts import load_benchmark
from gradharmony.uda.runs import write_labels


@pytest.fixture
def parity(monkeypatch):
    return load_benchmark("digits_parity", monkeypatch)


def fake_run(
    root: Path,
    variant: str,
    seed: int,
    accuracies: dict[int, float],
    *,
    method: str = "dann",
    steps: int = 5000,
    seconds_per_step: float | dict[int, float] = 0.1,
    cpu_seconds_per_step: dict[int, float] | None = None,
    mixval: dict[int, float] | None = None,
    machine: str | None = None,
) -> None:
    """A run folder with one evaluation record per ``step -> accuracy`` (in %); the times are one
    value for every record or one per step, the CPU times only where given."""
    folder = root / f"{method}-{variant}-{seed}"
    write_labels(folder, "mnist->usps", method, variant, seed)
    lines = []
    for step, accuracy in accuracies.items():
        record = {
            "step": step,
            "target_acc": accuracy / 100,
            "seconds_per_step": seconds_per_step[step] if isinstance(seconds_per_step, dict) else seconds_per_step,
            "config": {"steps": steps, "validators": ["mixval"] if mixval else []},
            "harmonizer": {"conflict_rate": 0.25, "mean_angle": 95.0, "mean_w_align": 1.0, "mean_w_cls": 1.0},
        }
        if cpu_seconds_per_step and step in cpu_seconds_per_step:
            record["cpu_seconds_per_step"] = cpu_seconds_per_step[step]
        if mixval:
            record["validators"] = {"mixval": mixval[step]}
        if machine:
            record["machine"] = {
                "cpu": machine,
                "cpu_capability": "AVX2",
                "torch": "2.14.1",
                "threads": 1,
                "device": "cpu",
            }
        lines.append(json.dumps(record))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_the_parity_gh_and_scope_tables_from_known_runs(tmp_path, parity):
    runs = tmp_path / "runs"
    # DANN none, two seeds: best at TLlib's epoch ends (2500, 5000) is 92 and 90; the mid-epoch 95 of
    # seed 0 counts only for "best over evaluations"; seed 1's validator picks its step 2500
    fake_run(runs, "none", 0, {1000: 95.0, 2500: 92.0, 5000: 91.0}, mixval={1000: 0.1, 2500: 0.3, 5000: 0.2})
    fake_run(runs, "none", 1, {2500: 90.0, 5000: 89.0}, mixval={2500: 0.5, 5000: 0.4})
    # GH++: +2 and +1 on the last evaluation, at 1.5x the step time
    fake_run(runs, "gh++", 0, {2500: 92.0, 5000: 93.0}, seconds_per_step=0.15)
    fake_run(runs, "gh++", 1, {2500: 90.0, 5000: 90.0}, seconds_per_step=0.15)
    # a cheap scope: +1 and +0.5 (half the full scope's mean delta), at 1.1x
    fake_run(runs, "gh++@heads", 0, {5000: 92.0}, seconds_per_step=0.11)
    fake_run(runs, "gh++@heads", 1, {5000: 89.5}, seconds_per_step=0.11)
    fake_run(runs, "gh++@features", 0, {1000: 80.0}, seconds_per_step=0.11)  # stopped at step 1000
    text = parity.report(runs, tmp_path / "docs")
    assert (tmp_path / "docs" / "report.md").read_text() == text
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4]): line for line in text.splitlines()}
    parity_row = rows[("mnist->usps", "dann", "2")]
    # last 91 / 89; pick 92 (step 2500) / 90; best 95 / 90; epoch ends 92 / 90, 91.0 - 91.7 = -0.70
    assert "| 90.00 +- 1.41 | 91.00 +- 1.41 (mixval, 2) | 92.50 +- 3.54 | 91.00 +- 1.41 | 91.7 | -0.70 |" in parity_row
    gh_row = next(line for line in text.splitlines() if "| dann | gh++ | 2 |" in line)
    assert "| +1.50 +- 0.71 (2/2 up) |" in gh_row  # last: 93 - 91, 90 - 89
    assert "| 25.0 +- 0.0 | 95.0 +- 0.0 |" in gh_row  # the geometry means
    assert "| 1.50 (wall) |" in gh_row  # 0.15 / 0.10 s per step
    heads_row = next(line for line in text.splitlines() if "| gh++@heads |" in line)
    # the full scope's +2 and +1 are not significant (p 0.205): no share; against the full scope of
    # the same seed: 92 - 93 and 89.5 - 90
    assert (
        "| 1.10 (wall) | +0.75 +- 0.35 (2/2 up) | no full-scope effect | -0.75 +- 0.35 (0/2 up) | 0.205 |" in heads_row
    )
    assert "| 1.000 +- 0.000 | 1.000 +- 0.000 |" in heads_row  # its mean weights
    features_row = next(line for line in text.splitlines() if "| gh++@features |" in line)
    assert "| 0 |" in features_row and "seed 0 at step 1000 of 5000" in features_row


def test_the_share_of_a_significant_full_scope_delta(tmp_path, parity):
    """Full scope +2.0, +2.2, +1.8 (p 0.004); the cheap scope keeps +1.0, +1.1, +0.9: half of it."""
    runs = tmp_path / "runs"
    for seed, (full, cheap) in enumerate([(2.0, 1.0), (2.2, 1.1), (1.8, 0.9)]):
        fake_run(runs, "none", seed, {5000: 90.0})
        fake_run(runs, "gh", seed, {5000: 90.0 + full})
        fake_run(runs, "gh@heads", seed, {5000: 90.0 + cheap})
    heads_row = next(line for line in parity.report(runs, None).splitlines() if "| gh@heads |" in line)
    assert "| +1.00 +- 0.10 (3/3 up) | 0.50 | -1.00 +- 0.10 (0/3 up) |" in heads_row


def test_the_step_time_ratio_is_the_fastest_interval_by_cpu_time_where_every_run_has_it(tmp_path, parity):
    """Seed 1 of both shared the machine throughout (wall 0.4-0.5 s); seed 0 had a quiet interval.
    By CPU time: 0.099 / 0.090; once one record lacks it, by the wall clock: 0.12 / 0.10."""
    runs = tmp_path / "runs"
    accuracies = {2500: 90.0, 5000: 91.0}
    fake_run(
        runs,
        "none",
        0,
        accuracies,
        seconds_per_step={2500: 0.3, 5000: 0.1},
        cpu_seconds_per_step={2500: 0.092, 5000: 0.09},
    )
    fake_run(runs, "none", 1, accuracies, seconds_per_step=0.4, cpu_seconds_per_step={2500: 0.095, 5000: 0.094})
    fake_run(runs, "gh", 0, accuracies)
    cpu = {2500: 0.1, 5000: 0.099}
    fake_run(runs, "gh@heads", 0, accuracies, seconds_per_step={2500: 0.2, 5000: 0.12}, cpu_seconds_per_step=cpu)
    fake_run(runs, "gh@heads", 1, accuracies, seconds_per_step=0.5, cpu_seconds_per_step=cpu)

    def ratio() -> str:
        row = next(line for line in parity.report(runs, None).splitlines() if "| gh@heads |" in line)
        return row.split("|")[5].strip()

    assert ratio() == "1.10 (cpu)"
    fake_run(runs, "gh@heads", 1, accuracies, seconds_per_step=0.5, cpu_seconds_per_step={5000: 0.099})
    assert ratio() == "1.20 (wall)"


def test_report_without_runs_is_one_line_and_exit_2(tmp_path, parity, capsys):
    assert parity.main(["report", "--runs", str(tmp_path / "missing"), "--out", str(tmp_path / "docs")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert not (tmp_path / "docs").exists()


def test_run_help_lists_the_stages_and_trains_nothing(parity, capsys):
    """``run --help`` reaches the stage runner (the ``run`` subcommand does not swallow it)."""
    with pytest.raises(SystemExit) as exit_info:
        parity.main(["run", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python benchmarks/digits_parity.py run [--stage N ...]")
    assert "configs/benchmarks/digits_parity_stage4.yaml" in text


def test_the_report_outlives_its_runs_folder_through_the_archive(tmp_path, parity):
    """A report written with --out keeps each finished run in runs.json; a later report from a fresh
    runs folder (another machine) holds both machines' runs, and an unfinished restart of an archived
    run does not replace its finished summary."""
    docs, first, second = tmp_path / "docs", tmp_path / "machine1", tmp_path / "machine2"
    fake_run(first, "none", 0, {2500: 90.0, 5000: 91.0})
    fake_run(first, "gh", 0, {5000: 1.0}, steps=10000)  # unfinished: not archived
    parity.report(first, docs)
    archived = json.loads((docs / "runs.json").read_text())
    assert list(archived) == ["dann-none-0"]
    assert archived["dann-none-0"]["summary"]["curve"] == [[2500, 90.0], [5000, 91.0]]
    assert archived["dann-none-0"]["summary"]["pick"] is None  # NaN (no validator) as null

    fake_run(second, "none", 0, {500: 10.0}, steps=5000)  # the same run started again, at step 500
    fake_run(second, "gh", 0, {2500: 92.0, 5000: 93.0})
    text = parity.report(second, docs)
    gh_row = next(line for line in text.splitlines() if "| dann | gh | 1 |" in line)
    assert "| +2.00 (1/1 up) |" in gh_row  # 93 (machine 2) - 91 (machine 1, archived)
    assert set(json.loads((docs / "runs.json").read_text())) == {"dann-none-0", "dann-gh-0"}
    # without a runs folder at all, the archive alone makes the same tables
    assert parity.main(["report", "--runs", str(tmp_path / "gone"), "--out", str(docs)]) == 0
    assert (docs / "report.md").read_text().split("\n", 3)[3] == text.split("\n", 3)[3]


def test_a_finished_run_in_the_runs_folder_replaces_its_archived_summary(tmp_path, parity):
    docs, runs = tmp_path / "docs", tmp_path / "runs"
    fake_run(runs, "none", 0, {5000: 91.0})
    parity.report(runs, docs)
    fake_run(runs, "none", 0, {5000: 88.0})  # trained again to the end, e.g. after a fix
    parity.report(runs, docs)
    assert json.loads((docs / "runs.json").read_text())["dann-none-0"]["summary"]["last"] == 88.0


def test_a_corrupt_archive_is_one_line_and_exit_2_and_left_as_it_was(tmp_path, parity, capsys):
    docs, runs = tmp_path / "docs", tmp_path / "runs"
    fake_run(runs, "none", 0, {5000: 91.0})
    docs.mkdir()
    (docs / "runs.json").write_text('{"dann-none-0": {"labels": {"task": "mnist->usps"}}}')
    assert parity.main(["report", "--runs", str(runs), "--out", str(docs)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "runs.json" in error
    assert (docs / "runs.json").read_text() == '{"dann-none-0": {"labels": {"task": "mnist->usps"}}}'
    assert not (docs / "report.md").exists()


def test_the_gh_table_counts_the_seed_pairs_trained_on_one_machine(tmp_path, parity):
    """Seed 0: both on machine A; seed 1: on A and B; seed 2: `none` from before records named it."""
    docs, runs = tmp_path / "docs", tmp_path / "runs"
    for seed, (plain, harmonized) in enumerate([("A", "A"), ("A", "B"), (None, "A")]):
        fake_run(runs, "none", seed, {5000: 90.0}, machine=plain)
        fake_run(runs, "gh", seed, {5000: 91.0}, machine=harmonized)
    for _ in range(2):  # from the runs folder, then with the archive it wrote
        row = next(line for line in parity.report(runs, docs).splitlines() if "| dann | gh |" in line)
        assert "| 1/3 (1 unrecorded) |" in row
    archived = json.loads((docs / "runs.json").read_text())
    assert archived["dann-gh-1"]["summary"]["machine"] == "B, AVX2, torch 2.14.1, 1 thread(s), cpu"
    assert archived["dann-none-2"]["summary"]["machine"] is None
