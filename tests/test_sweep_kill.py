"""A sweep's workers end with the sweep, however it ends; a sweep started again at once loses nothing.

Real ``python -m gradharmony sweep`` subprocesses on fake digits.  Killed with SIGKILL mid-run, the
workers notice that their parent is gone and end; the same sweep started again at once then
completes, and every run folder holds each evaluation and each step once: the records of an
uninterrupted sweep of the same grid.  Stopped with SIGTERM, or with a terminal's Ctrl-C or hang-up
(SIGINT or SIGHUP to the whole process group), each worker stops its run once (step finished, checkpoint saved) and
ends.  Linux only: the workers are found through ``/proc``.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fakes.digits import write_fake_data_root
from gradharmony.uda.runs import TIMING_FIELDS
from gradharmony.uda.sweep import expand, run_grid
from processes import hangup_as_default, python_env

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through /proc")

STEPS, EVAL_EVERY = 40, 10
GONE_WITHIN_S = 20.0  # the workers' grace (ORPHAN_GRACE_S) plus start-up slack


def grid_for(tmp_path: Path, out: str) -> dict:
    root = tmp_path / "data"
    if not root.exists():
        write_fake_data_root(root, count=48)
    return {
        "out": str(tmp_path / out),
        "base": {
            "steps": STEPS,
            "eval_every": EVAL_EVERY,
            "batch_size": 16,
            "image_size": 16,
            "channels": 1,
            "bottleneck_dim": 8,
            "source_eval_size": 16,
            "data_root": str(root),
            "cache_dir": str(tmp_path / "cache"),
        },
        "tasks": {"usps->mnistm": {"source": "usps", "target": "mnistm"}},
        "methods": ["dann"],
        "variants": {"none": {"harmonizer": "none"}, "gh": {"harmonizer": "gh"}},
        "seeds": [0, 1],
    }


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, parent PID)`` of a process, or None if it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")  # a zombie has ended (its reaper may be slow)


def workers_of(pid: int) -> list[int]:
    """The sweep's worker processes: its children started by multiprocessing's spawn."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is None or stat[1] != pid:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def start_sweep(grid_path: Path, tmp_path: Path, own_group: bool = False) -> subprocess.Popen:
    """``python -m gradharmony sweep GRID --workers 2`` (in a process group of its own if asked)."""
    env = python_env(PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "gradharmony", "sweep", str(grid_path), "--workers", "2"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=own_group,
        preexec_fn=hangup_as_default,
    )


def wait_until_training(sweep: subprocess.Popen, grid: dict, timeout: float = 120.0) -> list[int]:
    """Wait until a run has its first evaluation (the runs are then mid-run); returns the workers."""
    folders = [r.out for r in expand(grid)]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sweep.poll() is not None:
            pytest.fail(f"the sweep ended before it was stopped:\n{sweep.stdout.read()}")
        if any((f / "metrics.jsonl").exists() and (f / "metrics.jsonl").stat().st_size for f in folders):
            workers = workers_of(sweep.pid)
            if workers:
                return workers
        time.sleep(0.01)
    sweep.kill()
    pytest.fail("no run started training in time")


def wait_gone(pids: list[int], timeout: float = GONE_WITHIN_S) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def records(folder: Path) -> tuple[list[dict], list[int]]:
    """A run's evaluation records (without timings and paths) and the steps of its step rows."""
    evaluations = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for record in evaluations:
        for key in (*TIMING_FIELDS, "config"):
            record.pop(key, None)
    with (folder / "steps.csv").open(newline="") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f)]
    return evaluations, steps


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The grid swept once, uninterrupted: ``(tmp folder, {run folder name: records})``."""
    tmp_path = tmp_path_factory.mktemp("sweep-kill")
    grid = grid_for(tmp_path, "reference")
    counts = run_grid(grid, workers=2)
    assert counts == {"done": len(expand(grid)), "failed": 0}
    return tmp_path, {r.out.name: records(r.out) for r in expand(grid)}


def stop_mid_run(tmp_path: Path, out: str, how: str) -> tuple[dict, Path, subprocess.Popen, str]:
    """Start the grid's sweep, and stop it with ``how`` once a run has evaluated; returns the grid,
    its file, the ended sweep and its output, after checking that no worker outlived it."""
    grid = grid_for(tmp_path, out)
    grid_path = tmp_path / f"{out}.yaml"
    grid_path.write_text(yaml.safe_dump(grid))
    sweep = start_sweep(grid_path, tmp_path, own_group=how in ("Ctrl-C", "hang-up"))
    workers = wait_until_training(sweep, grid)
    if how == "Ctrl-C":  # what a terminal does: SIGINT to the whole foreground process group
        os.killpg(sweep.pid, signal.SIGINT)
    elif how == "hang-up":  # a closed terminal or dropped SSH session: SIGHUP to the process group
        os.killpg(sweep.pid, signal.SIGHUP)
    else:
        os.kill(sweep.pid, getattr(signal, how))
    try:
        output = sweep.communicate(timeout=GONE_WITHIN_S + 10)[0]
    except subprocess.TimeoutExpired:
        sweep.kill()
        pytest.fail(f"the sweep did not end after {how}:\n{sweep.communicate()[0]}")
    assert wait_gone(workers) == [], f"workers alive {GONE_WITHIN_S} s after {how} of the sweep:\n{output}"
    return grid, grid_path, sweep, output


def test_a_killed_sweep_stops_its_workers_and_a_rerun_loses_nothing(reference):
    tmp_path, expected = reference
    # (a) SIGKILL mid-run: the workers notice that the sweep is gone, save and end
    grid, grid_path, _, _ = stop_mid_run(tmp_path, "killed", "SIGKILL")
    # (b) the same sweep started again at once completes: no orphan holds a run folder
    again = start_sweep(grid_path, tmp_path)
    try:
        output = again.communicate(timeout=300)[0]
    except subprocess.TimeoutExpired:
        again.kill()
        pytest.fail(f"the second sweep did not end:\n{again.communicate()[0]}")
    assert again.returncode == 0, output
    assert "busy" not in output, output
    # (c) each evaluation and each step once per run, and the records of the uninterrupted sweep
    for run in expand(grid):
        evaluations, steps = records(run.out)
        assert [r["step"] for r in evaluations] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)), run.out
        assert steps == list(range(STEPS)), run.out
    for run in expand(grid):
        assert records(run.out) == expected[run.out.name], run.out


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C", "hang-up"])
def test_an_interrupted_sweep_stops_each_worker_once(reference, how):
    """SIGTERM of the sweep, or SIGINT or SIGHUP to its whole process group (which the workers
    receive as well): each running run stops as one interrupt stops it (step finished, checkpoint saved), never
    as a second interrupt does (at once), and the sweep exits with 130 once its workers have ended."""
    tmp_path, _ = reference
    grid, _, sweep, output = stop_mid_run(tmp_path, f"stopped-{how.lower()}", how)
    assert sweep.returncode == 130, output
    assert "sweep interrupted" in output, output
    assert "stopped at once" not in output, output  # a run got a second signal
    assert "checkpoint saved" in output, output
    started = [r for r in expand(grid) if (r.out / "metrics.jsonl").exists()]
    assert started and all((r.out / "last.pt").exists() for r in started), output
