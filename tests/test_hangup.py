"""A closed terminal, ``nohup`` and DataLoader workers: real ``python -m gradharmony`` processes.

* A run or a sweep whose controlling terminal goes away (a pseudo-terminal's master closed: the
  kernel sends SIGHUP, and writing to the terminal then fails with EIO) stops as Ctrl-C stops it:
  the step finishes, a checkpoint is saved, the exit code is 130, and running it again completes it.
* A run started under ``nohup`` (SIGHUP ignored) is not stopped by a hang-up.
* A terminal's Ctrl-C or hang-up reaches a run's DataLoader workers too (the whole process group):
  they leave the stopping to the training process, which finishes its step with their batches.

POSIX only (pseudo-terminals, process groups).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fakes.digits import write_fake_data_root
from fakes.images import write_benchmark_tree
from gradharmony.uda.sweep import expand
from processes import hangup_as_default, python_env
from test_sweep_kill import grid_for

pytest.importorskip("pty")
import pty  # after the skip: Windows has no pseudo-terminals

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals and terminals")

STEPS, EVAL_EVERY = 400, 10  # mid-run when the terminal goes (after the first evaluation); a stop ends it early


def digits_args(tmp_path: Path, out: Path) -> list[str]:
    root = tmp_path / "data"
    if not root.exists():
        write_fake_data_root(root, count=48)
    return [
        "--source", "usps", "--target", "mnistm", "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"),
        "--image-size", "16", "--channels", "1", "--bottleneck-dim", "8", "--batch-size", "16",
        "--source-eval-size", "16", "--steps", str(STEPS), "--eval-every", str(EVAL_EVERY), "--out", str(out),
    ]  # fmt: skip


def evaluations(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def checkpoint_step(out: Path) -> int:
    return int(torch.load(out / "last.pt", weights_only=False, map_location="cpu")["step"])


def in_terminal(args: list[str], cwd: Path) -> tuple[int, int]:
    """``python -m gradharmony ARGS`` with a new pseudo-terminal as its controlling terminal (it leads
    its session and foreground process group); returns its PID and the terminal's master end."""
    env = python_env(PYTHONUNBUFFERED="1")
    pid, master = pty.fork()
    if pid == 0:  # the child: nothing of pytest's may run here
        try:
            hangup_as_default()
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, "-m", "gradharmony", *args], env)
        finally:
            os._exit(127)
    return pid, master


def drain_until(master: int, done, timeout: float = 120.0) -> str:
    """Read the terminal (so that the child never blocks writing to it) until ``done()``."""
    output, deadline = [], time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail("timed out; the terminal showed:\n" + "".join(output))
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            with contextlib.suppress(OSError):
                output.append(os.read(master, 65536).decode(errors="replace"))
    return "".join(output)


def exit_code(pid: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"process {pid} did not end within {timeout} s of the hang-up")


def test_a_run_whose_terminal_goes_away_saves_a_checkpoint_exits_130_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["train", *digits_args(tmp_path, out)]
    pid, master = in_terminal(args, tmp_path)
    drain_until(master, lambda: len(evaluations(out)) >= 1)
    os.close(master)  # the terminal is gone: SIGHUP, and every later write to it fails
    assert exit_code(pid) == 130
    stopped_at = checkpoint_step(out)
    assert EVAL_EVERY <= stopped_at < STEPS
    resumed = subprocess.run(
        [sys.executable, "-m", "gradharmony", *args, "--no-progress"],
        capture_output=True,
        text=True,
        env=python_env(),
        cwd=tmp_path,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert evaluations(out) == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))  # each evaluation once


def test_a_run_under_nohup_trains_on_through_a_hangup(tmp_path):
    out = tmp_path / "run"
    args = ["train", *digits_args(tmp_path, out)]
    args[args.index("--steps") + 1] = "200"
    run = subprocess.Popen(
        [sys.executable, "-m", "gradharmony", *args, "--no-progress"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(),
        cwd=tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # what nohup does
    )
    deadline = time.monotonic() + 120
    while not evaluations(out) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.send_signal(signal.SIGHUP)
    _, err = run.communicate(timeout=300)
    assert run.returncode == 0, err
    assert checkpoint_step(out) == 200 and evaluations(out)[-1] == 200


def test_a_sweep_whose_terminal_goes_away_stops_each_run_once_and_completes_when_run_again(tmp_path):
    grid = grid_for(tmp_path, "runs")  # the kill tests' grid, longer, one variant
    grid["base"].update(steps=STEPS, eval_every=EVAL_EVERY)
    grid["variants"] = {"none": {"harmonizer": "none"}}
    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(yaml.safe_dump(grid))
    runs = expand(grid)
    pid, master = in_terminal(["sweep", str(grid_path), "--workers", "2"], tmp_path)
    drain_until(master, lambda: all(evaluations(run.out) for run in runs), timeout=240)
    os.close(master)
    assert exit_code(pid, timeout=90) == 130
    for run in runs:  # each stopped as one interrupt stops it: a checkpoint at the step it reached
        assert EVAL_EVERY <= checkpoint_step(run.out) < STEPS, run.out
        assert not (run.out / "error.txt").exists(), (run.out / "error.txt").read_text()
    again = subprocess.run(  # the same sweep again, without a terminal
        [sys.executable, "-m", "gradharmony", "sweep", str(grid_path), "--workers", "2"],
        capture_output=True,
        text=True,
        env=python_env(),
        cwd=tmp_path,
        timeout=900,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    for run in runs:
        assert evaluations(run.out) == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)), run.out


@pytest.mark.parametrize("name", ["SIGINT", "SIGHUP"])
def test_ctrl_c_or_a_hangup_reaches_dataloader_workers_which_leave_the_stop_to_the_training_process(tmp_path, name):
    root = tmp_path / "data"
    write_benchmark_tree(root, "office31", domains=["amazon", "webcam"], per_class=1, size=40)
    out = tmp_path / "run"
    args = [
        "train", "--source", "office31:amazon", "--target", "office31:webcam", "--backbone", "resnet18",
        "--resize", "36", "--crop", "32", "--bottleneck-dim", "16", "--batch-size", "4", "--steps", "400",
        "--eval-every", "2", "--source-eval-size", "8", "--data-root", str(root), "--out", str(out),
        "--loader-workers", "1", "--no-progress", "--method-param", "disc_hidden=16",
    ]  # fmt: skip
    run = subprocess.Popen(
        [sys.executable, "-m", "gradharmony", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=python_env(),
        cwd=tmp_path,
        start_new_session=True,  # a process group of its own, as a terminal's foreground job
        preexec_fn=hangup_as_default,
    )
    deadline = time.monotonic() + 180
    while not evaluations(out) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(run.pid, getattr(signal, name))  # what a terminal does: the run and its loader workers get it
    _, err = run.communicate(timeout=180)
    assert run.returncode == 130, err
    assert "exited unexpectedly" not in err and "checkpoint saved" in err, err
    assert 2 <= checkpoint_step(out) < 400
