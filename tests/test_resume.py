"""Runs lose nothing: exact resume after a kill at any moment, finished runs untouched, one writer
and one configuration per run folder, and divergence that never saves a non-finite state.

Records are compared with the timing fields (``seconds_per_step``, ``validate_seconds``) removed
(wall-clock time differs between any two runs) and with the ``out`` path removed from their config (see
``test_engine.without_timing``); ``steps.csv`` is compared byte for byte, weights bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gradharmony.uda.config import ConfigError
from gradharmony.uda.engine import Trainer, TrainingDiverged, train
from gradharmony.uda.engine import checkpoint as checkpoint_module
from gradharmony.uda.runs import RunFolderBusy, RunFolderLock, RunLog, read_metrics, read_steps
from processes import python_env
from test_engine import config, tiny_domains, without_timing
from trainer_faults import nan_cls_loss_from, sigint_during_step

TESTS = Path(__file__).resolve().parent

# A process that imports the toolkit once, then forks one training child per request (so a killed
# child costs no import time).  Each request is a JSON line [folder, overrides]; the zygote answers
# the child's PID, then its wait status once it ended (finished, failed, or killed).
ZYGOTE = r"""
import json, os, sys, traceback
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import torch
from test_engine import config, tiny_domains
from gradharmony.uda.engine import train
torch.set_num_threads(1)
print("ready", flush=True)
for line in sys.stdin:
    folder, overrides = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            train(config(Path(folder), **overrides), tiny_domains())
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        os._exit(code)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""

# Long enough to be killed at many different points: evaluations every 5 steps and checkpoints
# every 10, so some kills land between an evaluation and the checkpoint that would cover it.
RUN = dict(steps=40, eval_every=5, checkpoint_every=10, threads=1)


class Zygote:
    """The forking training process of :data:`ZYGOTE` (see there)."""

    def __init__(self, log: Path):
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, str(TESTS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            env=python_env(),
        )
        assert self._line() == "ready", self.errors()

    def _line(self) -> str:
        line = self.proc.stdout.readline().strip()
        if not line:
            raise AssertionError(f"the training process ended: {self.errors()}")
        return line

    def errors(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def start(self, folder: Path, **overrides) -> int:
        """Fork a child training ``config(folder, **overrides)``; its PID."""
        self.proc.stdin.write(json.dumps([str(folder), overrides]) + "\n")
        self.proc.stdin.flush()
        return int(self._line())

    def wait(self) -> str:
        """How the last child ended: ``finished``, ``killed`` or ``failed``."""
        status = int(self._line())
        if os.WIFSIGNALED(status):
            assert os.WTERMSIG(status) == signal.SIGKILL, status
            return "killed"
        return "finished" if os.WEXITSTATUS(status) == 0 else "failed"

    def train(self, folder: Path, **overrides) -> None:
        """Train to the end in a child."""
        self.start(folder, **overrides)
        assert self.wait() == "finished", self.errors()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote") / "stderr.txt")
    yield z
    z.close()


@pytest.fixture
def one_thread():
    """Train on one thread (as the children do), and give the test process its threads back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it already ended
        os.kill(pid, signal.SIGKILL)


def weights(folder: Path) -> dict[str, object]:
    """The final model state of a run, flattened: ``{"key/sub/...": tensor or value}``."""

    def flat(value, prefix):
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}/{key}").items()}
        return {prefix: value}

    return flat(torch.load(folder / "last.pt", weights_only=False)["model"], "model")


def assert_same_run(reference: Path, other: Path) -> None:
    """Same evaluation records (timings and paths removed), same step rows (bytes), same weights."""
    assert without_timing(read_metrics(other)) == without_timing(read_metrics(reference))
    assert (other / "steps.csv").read_bytes() == (reference / "steps.csv").read_bytes()
    a, b = weights(reference), weights(other)
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key], key


# ----------------------------------------------------------------------------- killed subprocesses
def test_a_run_killed_after_its_first_checkpoint_resumes_exactly(tmp_path, zygote):
    zygote.train(tmp_path / "straight", **RUN)
    folder = tmp_path / "killed" / "run"
    pid = zygote.start(tmp_path / "killed", **RUN)
    deadline = time.monotonic() + 120
    while not (folder / "last.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.002)
    kill(pid)
    assert zygote.wait() == "killed", "the run ended before it could be killed"
    assert torch.load(folder / "last.pt", weights_only=False)["step"] < RUN["steps"]
    zygote.train(tmp_path / "killed", **RUN)
    assert [m["step"] for m in read_metrics(folder)] == list(range(5, 41, 5))
    assert_same_run(tmp_path / "straight" / "run", folder)


def test_a_run_killed_at_random_moments_ends_as_an_uninterrupted_one(tmp_path, zygote):
    started = time.monotonic()
    zygote.train(tmp_path / "straight", **RUN)
    duration = time.monotonic() - started
    delays = random.Random(16).sample(range(1000), 5)  # seeded moments, in thousandths of a run
    # On a loaded machine a restart can outrun the timed run and finish before its kill; once it has
    # finished there is nothing left to kill, so a round without a kill starts again in a new folder
    # with the moments halved.
    for round_ in range(4):
        folder = tmp_path / f"killed{round_}"
        outcomes = _kill_at(zygote, folder, [duration / 2**round_ * delay / 1000 for delay in delays])
        if "killed" in outcomes:
            break
    assert "killed" in outcomes, "every run finished before its kill, in four rounds"
    zygote.train(folder, **RUN)
    assert_same_run(tmp_path / "straight" / "run", folder / "run")


def _kill_at(zygote: Zygote, folder: Path, moments: list[float]) -> list[str]:
    """Start the run in ``folder`` and kill it ``moments[i]`` seconds in, restart after restart, until
    one finishes; how each start ended."""
    outcomes = []
    for moment in moments:
        pid = zygote.start(folder, **RUN)
        time.sleep(moment)
        kill(pid)
        outcomes.append(zygote.wait())
        assert outcomes[-1] != "failed", zygote.errors()
        if outcomes[-1] == "finished":
            break
    return outcomes


# ----------------------------------------------------------------------------- kill points, in process
class Killed(Exception):
    """Stands for SIGKILL at a chosen point (the process dies: its lock goes with it)."""


def _kill_after_evaluation(monkeypatch, step):
    original = RunLog.add_evaluation

    def add_then_die(self, record):
        original(self, record)
        if record["step"] == step:
            raise Killed

    monkeypatch.setattr(RunLog, "add_evaluation", add_then_die)


def _kill_before_evaluation(monkeypatch, step):
    original = Trainer.evaluation_record

    def die(self):
        if self.step == step:
            raise Killed
        return original(self)

    monkeypatch.setattr(Trainer, "evaluation_record", die)


def _kill_during_checkpoint_write(monkeypatch, step):
    real_replace = os.replace

    def replace(src, dst):
        if str(src).endswith("last.pt.tmp") and torch.load(src, weights_only=False)["step"] == step:
            raise Killed  # the new checkpoint is whole in last.pt.tmp, last.pt is the previous one
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", replace)


@pytest.mark.parametrize(
    "kill_point, overrides",
    [
        (_kill_before_evaluation, {}),  # between the step and its evaluation
        (_kill_after_evaluation, {}),  # between the evaluation record and the checkpoint
        (_kill_during_checkpoint_write, {}),
        (_kill_after_evaluation, {"checkpoint_every": 12}),  # before the first checkpoint
    ],
    ids=["before-evaluation", "after-evaluation", "during-checkpoint-write", "before-first-checkpoint"],
)
def test_a_run_killed_at_each_point_resumes_exactly(tmp_path, monkeypatch, one_thread, kill_point, overrides):
    straight = config(tmp_path / "straight", **overrides)
    train(straight, tiny_domains())
    killed = config(tmp_path / "killed", **overrides)
    with monkeypatch.context() as patch:
        kill_point(patch, step=8)
        with pytest.raises(Killed):
            train(killed, tiny_domains())
    train(killed, tiny_domains())
    assert [m["step"] for m in read_metrics(killed.out)] == [4, 8, 12]
    assert_same_run(Path(straight.out), Path(killed.out))
    assert sorted(p.name for p in Path(killed.out).iterdir() if p.name != "last.pt.tmp") == sorted(
        p.name for p in Path(straight.out).iterdir()
    )


def test_a_checkpoint_that_does_not_record_its_coverage_resumes_exactly(tmp_path, monkeypatch, one_thread):
    """Checkpoints of earlier versions: the evaluations up to their step are kept, the rows before it."""
    straight = config(tmp_path / "straight")
    train(straight, tiny_domains())
    killed = config(tmp_path / "killed")
    with monkeypatch.context() as patch:
        _kill_after_evaluation(patch, step=8)
        with pytest.raises(Killed):
            train(killed, tiny_domains())
    path = Path(killed.out) / "last.pt"
    state = torch.load(path, weights_only=False)
    del state["records"]
    torch.save(state, path)
    train(killed, tiny_domains())
    assert_same_run(Path(straight.out), Path(killed.out))


def test_a_run_stopped_by_a_second_signal_resumes_exactly(tmp_path, one_thread):
    """A second Ctrl-C during an evaluation stops at once and saves nothing: the resumed run redoes it."""
    straight = config(tmp_path / "straight")
    train(straight, tiny_domains())
    killed = config(tmp_path / "killed")
    trainer = Trainer(killed, tiny_domains())
    original = trainer.evaluation_record

    def interrupted_twice():
        if trainer.step == 8:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return original()

    trainer.evaluation_record = interrupted_twice
    with pytest.raises(KeyboardInterrupt, match="checkpoint, of step 4"):
        trainer.run()
    assert torch.load(Path(killed.out) / "last.pt", weights_only=False)["step"] == 4
    train(killed, tiny_domains())
    assert_same_run(Path(straight.out), Path(killed.out))


# ----------------------------------------------------------------------------- finished runs
def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (the validators' predictions and picks included): bytes and mtime."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_finished_run_started_again_changes_no_file(tmp_path, one_thread):
    cfg = config(tmp_path)
    first = train(cfg, tiny_domains())
    before = _snapshot(Path(cfg.out))
    assert {"config.yaml", "metrics.jsonl", "steps.csv", "last.pt"} <= before.keys()
    again = train(config(tmp_path, device="cpu", threads=1), tiny_domains())  # other non-outcome fields
    assert _snapshot(Path(cfg.out)) == before
    assert again == {**first, "already_finished": True}
    assert first["already_finished"] is False and first["steps"] == 12


# ----------------------------------------------------------------------------- one writer, one configuration
def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    cfg = config(tmp_path)
    with RunFolderLock(cfg.out), pytest.raises(RunFolderBusy, match=f"PID {os.getpid()}"):
        train(cfg, tiny_domains())
    assert sorted(p.name for p in Path(cfg.out).iterdir()) == [".lock"]  # nothing written
    train(cfg, tiny_domains())  # the lock went with its holder
    with RunFolderLock(cfg.out):  # and the run released its own
        pass


def test_a_folder_belongs_to_the_configuration_that_first_wrote_it(tmp_path, monkeypatch):
    cfg = config(tmp_path, checkpoint_every=12)
    with monkeypatch.context() as patch:  # records of steps 4 and 8, no checkpoint
        _kill_after_evaluation(patch, step=8)
        with pytest.raises(Killed):
            train(cfg, tiny_domains())
    folder = Path(cfg.out)
    assert not (folder / "last.pt").exists() and len(read_metrics(folder)) == 2
    before = _snapshot(folder)
    other = config(tmp_path, seed=1)
    with pytest.raises(ConfigError, match=r"different configuration.*--overwrite"):
        train(other, tiny_domains())
    assert _snapshot(folder) == before
    # config.yaml alone is enough to claim the folder
    (folder / "metrics.jsonl").unlink()
    with pytest.raises(ConfigError, match="different configuration"):
        train(other, tiny_domains())
    # overwrite: start over as the other configuration
    result = train(config(tmp_path, seed=1, overwrite=True), tiny_domains())
    assert result["steps"] == 12
    assert [m["step"] for m in read_metrics(folder)] == [4, 8, 12]
    assert {m["config_hash"] for m in read_metrics(folder)} == {other.outcome_hash()}
    assert [r["step"] for r in read_steps(folder)] == list(range(12))
    assert "seed: 1" in (folder / "config.yaml").read_text()
    # recorded as false: training again from the saved config.yaml resumes, it never deletes the run
    assert "overwrite: false" in (folder / "config.yaml").read_text()
    assert not any(m["config"]["overwrite"] for m in read_metrics(folder))


def test_config_yaml_is_written_first_and_kept(tmp_path, monkeypatch, one_thread):
    cfg = config(tmp_path, checkpoint_every=12)
    written = []
    original = RunLog.add_evaluation

    def add(self, record):
        written.append(sorted(p.name for p in Path(cfg.out).iterdir()))
        original(self, record)

    monkeypatch.setattr(RunLog, "add_evaluation", add)
    interrupted = Trainer(cfg, tiny_domains())
    sigint_during_step(interrupted, 5)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    assert written[0] == [".lock", "config.yaml"]
    first = (Path(cfg.out) / "config.yaml").read_bytes()
    train(config(tmp_path, checkpoint_every=12, threads=1, device="cpu"), tiny_domains())  # same outcome hash
    assert (Path(cfg.out) / "config.yaml").read_bytes() == first


# ----------------------------------------------------------------------------- divergence
def _all_finite(state) -> bool:
    if isinstance(state, torch.Tensor):
        return not state.is_floating_point() or bool(torch.isfinite(state).all())
    if isinstance(state, dict):
        return all(_all_finite(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return all(_all_finite(v) for v in state)
    return True


@pytest.mark.parametrize(
    "overrides, checkpointed",
    [
        (dict(eval_every=1), True),  # checkpoints after every step: the message names the last one
        (dict(eval_every=4), False),  # diverges before the first checkpoint
        (dict(method="mcd", method_params={"num_k": 2}, eval_every=1), False),  # at step 0
    ],
)
def test_a_huge_learning_rate_stops_at_the_step_that_made_the_model_non_finite(tmp_path, overrides, checkpointed):
    cfg = config(tmp_path, lr=1e30, steps=20, **overrides)
    trainer = Trainer(cfg, tiny_domains())
    with pytest.raises(TrainingDiverged) as error:
        trainer.run()
    failed = trainer.step - 1
    assert failed < 10  # at once, not after ten skipped steps
    rows = read_steps(cfg.out)
    assert [r["step"] for r in rows] == list(range(failed + 1))
    assert "nonfinite_state" in rows[-1]["guards"]
    assert f"step {failed} made the model non-finite" in str(error.value)
    checkpoint = Path(cfg.out) / "last.pt"
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=False)
        assert _all_finite(state["model"]) and _all_finite(state["optimizers"])
        assert f"the last checkpoint, of step {state['step']}, is {checkpoint}" in str(error.value)
    else:
        assert "there is no checkpoint" in str(error.value)
    assert checkpoint.exists() == checkpointed


def test_a_run_that_diverged_is_retried_from_its_last_checkpoint_exactly(tmp_path, one_thread):
    """Ten skipped steps stop the run naming its real checkpoint; the rows flushed up to the failure
    are not kept past that checkpoint when the run is started again."""
    cfg = config(tmp_path, steps=20, eval_every=4)
    trainer = Trainer(cfg, tiny_domains())
    nan_cls_loss_from(trainer, 6)
    with pytest.raises(TrainingDiverged, match=r"the last checkpoint, of step 12, is") as error:
        trainer.run()
    assert "10 consecutive steps with non-finite losses" in str(error.value)
    assert [r["step"] for r in read_steps(cfg.out)] == list(range(16))  # flushed up to the 10th skipped step
    assert torch.load(Path(cfg.out) / "last.pt", weights_only=False)["step"] == 12
    diverged_rows = (Path(cfg.out) / "steps.csv").read_bytes()
    train(cfg, tiny_domains())  # the cause removed: resumes from step 12
    assert [m["step"] for m in read_metrics(cfg.out)] == [4, 8, 12, 16, 20]
    assert [r["step"] for r in read_steps(cfg.out)] == list(range(20))
    rows = (Path(cfg.out) / "steps.csv").read_bytes()
    covered = diverged_rows.split(b"\n")[:13]  # the header and the rows of steps 0-11
    assert rows.split(b"\n")[:13] == covered and rows != diverged_rows


# ----------------------------------------------------------------------------- distributed
def _distributed_worker(rank: int, world: int, port: int, cfg, queue) -> None:
    from test_distributed import exit_without_finalization

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    try:
        Trainer(cfg, tiny_domains()).run()
        queue.put((rank, None, ""))
    except Exception as e:
        queue.put((rank, type(e).__name__, str(e)))
    exit_without_finalization(queue)


def test_in_a_distributed_run_process_zero_takes_the_lock_and_every_process_hears_why_it_stops(tmp_path):
    import torch.multiprocessing as mp

    from test_distributed_engine import _free_port

    cfg = config(tmp_path, steps=2, eval_every=2)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with RunFolderLock(cfg.out):  # another writer holds the folder
        port = _free_port()
        procs = [ctx.Process(target=_distributed_worker, args=(r, 2, port, cfg, queue)) for r in range(2)]
        for p in procs:
            p.start()
        results = sorted(queue.get(timeout=180) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    assert [(rank, error) for rank, error, _ in results] == [(0, "RunFolderBusy"), (1, "RunFolderBusy")]
    assert all(f"PID {os.getpid()}" in message for _, _, message in results)
    assert results[1][2].startswith("process 0: ")
    assert sorted(p.name for p in Path(cfg.out).iterdir()) == [".lock"]


def test_the_finiteness_check_is_exact_for_huge_finite_values(tmp_path):
    trainer = Trainer(config(tmp_path), tiny_domains())
    huge = [torch.full((3, 4), 1e30), torch.ones(5)]  # finite, though their 2-norms overflow
    assert trainer._all_finite(huge)
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not trainer._all_finite([torch.ones(3), torch.tensor([1.0, bad])])


def test_a_state_with_a_non_finite_optimizer_buffer_is_never_saved(tmp_path):
    cfg = config(tmp_path)
    trainer = Trainer(cfg, tiny_domains())
    original = trainer.train_step

    def step_then_poison():
        record = original()
        if trainer.step == 8:  # a momentum buffer goes bad just before a checkpoint; the weights are finite
            buffer = next(s["momentum_buffer"] for opt in trainer.optimizers.values() for s in opt.state.values())
            buffer.view(-1)[0] = float("nan")
        return record

    trainer.train_step = step_then_poison
    with pytest.raises(TrainingDiverged, match=r"at step 8 .* not saved.*the last checkpoint, of step 4"):
        trainer.run()
    assert torch.load(Path(cfg.out) / "last.pt", weights_only=False)["step"] == 4


def test_records_removed_behind_a_checkpoint_are_reported_not_silently_resumed(tmp_path, monkeypatch):
    cfg = config(tmp_path)
    with monkeypatch.context() as patch:
        _kill_after_evaluation(patch, step=8)
        with pytest.raises(Killed):
            train(cfg, tiny_domains())
    (Path(cfg.out) / "metrics.jsonl").write_text("")  # the record of step 4, covered by last.pt, is gone
    with pytest.raises(ConfigError, match=r"metrics\.jsonl no longer holds the 1 record.*--overwrite"):
        train(cfg, tiny_domains())
