"""Sweeps through submitit: the same runs as the local launcher, resubmitted by the same command.

The jobs run through submitit's local executor (``--launcher submitit-local``): real processes on
this machine, no SLURM.  One job is killed mid-run (SIGKILL); the same command run again submits
that run alone (the finished one is left untouched), a job still queued or running from an
earlier command is waited for and never submitted twice, and every run ends with the records,
step rows and weights of the local launcher's sweep, in the same hash-named folders.  The SLURM
path itself (the sbatch script, job arrays, ``sacct``) is checked against stand-in ``sbatch``,
``srun`` and ``sacct`` commands.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gradharmony.uda.cli import main
from gradharmony.uda.launchers import SUBMITIT_INSTALL, ClusterOptions, submit_grid
from gradharmony.uda.runs import LOCK_FILE, read_metrics, read_steps, run_status
from gradharmony.uda.sweep import expand, run_grid
from processes import python_env
from test_cli_errors import assert_one_line_error, run_cli
from test_resume import assert_same_run
from test_sweep_kill import EVAL_EVERY, STEPS, grid_for

LAUNCH = ["--launcher", "submitit-local"]


def two_run_grid(tmp_path: Path, out: str) -> tuple[dict, Path]:
    """The sweep-kill grid with one seed (two runs: none and gh), and its YAML file."""
    grid = {**grid_for(tmp_path, out), "seeds": [0]}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(grid))
    return grid, path


def kill_a_job_mid_run(sweep: subprocess.Popen, grid: dict, timeout: float = 120.0) -> Path:
    """SIGKILL the job process of the first run that has evaluated once; returns that run's folder.

    The job process is the run folder's writer: the lock file holds its PID.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sweep.poll() is not None:
            pytest.fail(f"the sweep ended before a job was killed:\n{sweep.stdout.read()}")
        for run in expand(grid):
            metrics = run.out / "metrics.jsonl"
            if metrics.exists() and metrics.stat().st_size:
                pid = int((run.out / LOCK_FILE).read_text())
                os.kill(pid, signal.SIGKILL)
                return run.out
        time.sleep(0.01)
    sweep.kill()
    pytest.fail("no run started training in time")


def test_a_killed_job_is_resubmitted_by_the_same_command_and_every_run_matches_the_local_launcher(tmp_path, capsys):
    reference, _ = two_run_grid(tmp_path, "local")
    assert run_grid(reference, workers=2) == {"done": 2, "failed": 0}
    grid, path = two_run_grid(tmp_path, "submitit")

    # (a) submitted; one job killed mid-run: the command waits for the other, reports the killed one
    sweep = subprocess.Popen(
        [sys.executable, "-m", "gradharmony", "sweep", str(path), *LAUNCH],
        cwd=tmp_path,
        env=python_env(PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    killed = kill_a_job_mid_run(sweep, grid)
    output = sweep.communicate(timeout=300)[0]
    assert sweep.returncode == 1, output
    assert "submitted 2 run(s)" in output, output
    assert "'done': 1, 'failed': 1" in output, output
    assert "the job ended without a result" in output, output
    logs = [line.split()[0] for line in output.splitlines() if line.startswith("  ") and "_log.err" in line]
    assert len(logs) == 1 and Path(logs[0]).is_file(), output  # the killed job's stderr
    assert run_status(killed, STEPS) != "done"
    finished = next(r.out for r in expand(grid) if r.out != killed)
    untouched = (finished / "last.pt").stat().st_mtime_ns

    # (b) resubmitted without waiting: only the killed run is submitted
    capsys.readouterr()
    assert main(["sweep", str(path), *LAUNCH, "--no-wait"]) == 0
    out = capsys.readouterr().out
    assert "1 already done, 1 to submit" in out and "'submitted': 1" in out, out

    # (c) the same command again: waits for that job (still running: not submitted twice)
    assert main(["sweep", str(path), *LAUNCH]) == 0
    out = capsys.readouterr().out
    assert "0 to submit, 1 queued or running from an earlier submission" in out, out
    assert "submitted" not in out and "'done': 2, 'failed': 0" in out, out

    # every run finished once, in the local launcher's folders, with its records and weights
    assert (finished / "last.pt").stat().st_mtime_ns == untouched
    assert sorted(r.out.name for r in expand(grid)) == sorted(r.out.name for r in expand(reference))
    for run, local in zip(expand(grid), expand(reference)):
        assert [r["step"] for r in read_metrics(run.out)] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
        assert [r["step"] for r in read_steps(run.out)] == list(range(STEPS))
        assert_same_run(local.out, run.out)


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """``sbatch``, ``srun`` and ``sacct`` stand-ins on PATH: ``sbatch`` keeps each script and answers
    job ids 100, 101, ...; ``sacct`` answers the rows of ``sacct_rows.txt``.  Returns their folder."""
    submitit = pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "sbatch": 'n=$(ls "$0.d" 2>/dev/null | wc -l); mkdir -p "$0.d"; cp "$1" "$0.d/$((100 + n)).sh"\n'
        'echo "Submitted batch job $((100 + n))"\n',
        "srun": "exit 0\n",
        "sacct": 'echo "JobID|State|NodeList"; cat "$(dirname "$0")/sacct_rows.txt" 2>/dev/null; exit 0\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    submitit.SlurmJob.watcher.clear()
    yield bin_dir
    submitit.SlurmJob.watcher.clear()


def test_slurm_submission_is_one_array_and_a_queued_job_is_not_submitted_twice(tmp_path, fake_slurm, capsys):
    grid, _ = two_run_grid(tmp_path, "slurm")
    options = ClusterOptions(
        partition="gpu", time_min=90, gpus_per_job=1, cpus_per_task=4, mem_gb=16, array_parallelism=1, qos="q"
    )
    assert submit_grid(grid, options, wait=False, job_name="gradharmony-stage1") == {
        "done": 0,
        "failed": 0,
        "submitted": 2,
    }
    script = (fake_slurm / "sbatch.d" / "100.sh").read_text()
    for line in (
        "--array=0-1%1",
        "--partition=gpu",
        "--time=90",
        "--gpus-per-node=1",
        "--cpus-per-task=4",
        "--qos=q",
        "--job-name=gradharmony-stage1",
    ):
        assert f"#SBATCH {line}\n" in script, script
    ledger = json.loads((Path(grid["out"]) / "submitit_jobs.json").read_text())
    first, second = (r.out.name for r in expand(grid))
    assert (ledger[first]["job_id"], ledger[second]["job_id"]) == ("100_0", "100_1")

    # one task still running, the other cancelled: only the cancelled run is submitted again
    (fake_slurm / "sacct_rows.txt").write_text("100_0|RUNNING|node1\n100_1|CANCELLED by 0|node1\n")
    counts = submit_grid(grid, options, wait=False)
    assert counts == {"done": 0, "failed": 0, "submitted": 1, "queued": 1}
    assert "submitted 1 run(s) as SLURM job 101" in capsys.readouterr().out
    ledger = json.loads((Path(grid["out"]) / "submitit_jobs.json").read_text())
    assert (ledger[first]["job_id"], ledger[second]["job_id"]) == ("100_0", "101")
    assert sorted(p.name for p in (fake_slurm / "sbatch.d").iterdir()) == ["100.sh", "101.sh"]


def test_a_cluster_flag_with_the_local_launcher_is_a_one_line_error(tmp_path, capsys):
    _, path = two_run_grid(tmp_path, "flags")
    code, err = run_cli(["sweep", path, "--slurm-partition", "gpu"], capsys)
    assert_one_line_error(code, err, "--slurm-partition applies to --launcher submitit only")
    code, err = run_cli(["sweep", path, "--launcher", "local", "--no-wait"], capsys)
    assert_one_line_error(code, err, "--no-wait applies to --launcher submitit only")
    code, err = run_cli(["sweep", path, "--launcher", "submitit", "--workers", "2"], capsys)
    assert_one_line_error(code, err, "--workers applies to --launcher local only")
    code, err = run_cli(["sweep", path, "--launcher", "submitit", "--slurm-time", "0"], capsys)
    assert_one_line_error(code, err, "--slurm-time", "at least 1")
    assert not Path(yaml.safe_load(path.read_text())["out"]).exists()  # nothing submitted or written


def test_without_submitit_the_launcher_says_what_to_install(tmp_path, capsys, monkeypatch):
    _, path = two_run_grid(tmp_path, "missing")
    monkeypatch.setitem(sys.modules, "submitit", None)  # ``import submitit`` raises ImportError
    code, err = run_cli(["sweep", path, "--launcher", "submitit", "--slurm-partition", "gpu"], capsys)
    assert_one_line_error(code, err, SUBMITIT_INSTALL)
