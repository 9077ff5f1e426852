"""Sweeps on a SLURM cluster: a grid's unfinished runs as one job array, submitted through submitit.

``gradharmony sweep grid.yaml --launcher submitit --slurm-partition P --slurm-time 60`` expands the
grid exactly as the local launcher does (:func:`gradharmony.uda.sweep.expand`: the same hash-named
run folders) and submits one job array per grid file, one array task per run still to train.  Each
task trains its run with :func:`gradharmony.uda.sweep.train_planned_run`, as a worker of the local
pool does, so a run resumes from its checkpoint, records each evaluation and step once, and reports
``busy`` if another live process holds its folder.

Running the same command again is how a cancelled, killed or timed-out job is resubmitted: finished
runs are skipped before anything is submitted, runs whose folder another live process holds are
counted ``busy``, and runs whose job from an earlier command is still queued or running (recorded
in ``<out>/submitit_jobs.json`` and looked up with ``sacct``) are waited for, never submitted twice.

A job that SLURM stops (``scancel``, its time limit, preemption) stops its run as an interrupted
``train`` stops: the step finishes, a checkpoint is saved, the job ends.  SLURM's ``SIGTERM`` does
this directly; submitit's warning signal before the time limit (``SIGUSR2``) is turned into the
same request.

submitit is an optional dependency (the ``slurm`` extra) imported only here, and only when a
cluster launcher is used.  ``--launcher submitit-local`` runs the same jobs as processes on this
machine through submitit's local executor: it is for testing, not for real sweeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from gradharmony.uda.config import ConfigError
from gradharmony.uda.runs import ERROR_FILE, RunFolderBusy, RunFolderLock, atomic_write_bytes, run_status, write_labels
from gradharmony.uda.sweep import PlannedRun, expand, prepare_data, runs_to_train, status_counts, train_planned_run

SUBMITIT_INSTALL = "pip install 'gradharmony[slurm]'"
#: The ``--launcher`` names that submit through submitit, and the submitit cluster each selects.
CLUSTERS = {"submitit": "slurm", "submitit-local": "local"}
#: A job's time limit when none is given (SLURM's own default would be submitit's 5 minutes).
DEFAULT_TIME_MIN = 60
#: Which job trains each submitted run: ``{run folder name: {"job_id", "folder", "cluster"}}``.
LEDGER_FILE = "submitit_jobs.json"
#: SLURM job states of a job that has not ended yet (``sacct``'s first word).
ACTIVE_SLURM_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
    }
)
#: Seconds between two looks at the jobs while waiting, per cluster (submitit paces ``sacct`` itself).
POLL_S = {"slurm": 10.0, "local": 0.5}


class SubmititMissing(ConfigError):
    """A cluster launcher was asked for, but submitit is not installed."""


def import_submitit() -> ModuleType:
    """The ``submitit`` module, or :class:`SubmititMissing` saying which extra installs it."""
    try:
        import submitit
    except ImportError:
        raise SubmititMissing(
            f"the submitit launcher needs submitit, which is not installed: {SUBMITIT_INSTALL}"
        ) from None
    return submitit


@dataclass(frozen=True)
class ClusterOptions:
    """Where and with what resources each run's job runs; ``None`` leaves a setting to SLURM.

    ``cluster`` is ``"slurm"``, or ``"local"`` for submitit's local executor (testing).  ``folder``
    holds submitit's pickles and the jobs' logs (default ``<grid out>/submitit``).
    """

    cluster: str = "slurm"
    partition: str | None = None
    time_min: int = DEFAULT_TIME_MIN
    gpus_per_job: int | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    array_parallelism: int | None = None
    account: str | None = None
    qos: str | None = None
    folder: Path | None = None

    def executor_parameters(self, job_name: str) -> dict[str, Any]:
        """The parameters of ``submitit.AutoExecutor.update_parameters`` (``None``: not set)."""
        return {
            "name": job_name,
            "timeout_min": self.time_min,
            "nodes": 1,
            "tasks_per_node": 1,
            "gpus_per_node": self.gpus_per_job,
            "cpus_per_task": self.cpus_per_task,
            "mem_gb": self.mem_gb,
            "slurm_partition": self.partition,
            "slurm_array_parallelism": self.array_parallelism,
            "slurm_account": self.account,
            "slurm_qos": self.qos,
        }


# ----------------------------------------------------------------------------------- job side
def _stop_after_this_step(signum: int, frame: Any) -> None:
    """submitit's warning before the time limit: ask the engine to stop as on SIGTERM."""
    signal.raise_signal(signal.SIGTERM)


def train_in_job(run: PlannedRun) -> tuple[str, str]:
    """The body of one array task: train ``run``; returns ``(outcome, note)`` as the local pool does.

    submitit's own handler of its warning signal would end a run that cannot be requeued with an
    error (a ``failed`` run); here the signal stops the run after its step, with a checkpoint, so the
    next sweep resumes it.
    """
    with contextlib.suppress(AttributeError, ValueError):  # no SIGUSR2 here, or not the main thread
        signal.signal(signal.SIGUSR2, _stop_after_this_step)
    return train_planned_run(run)


# --------------------------------------------------------------------------------- sweep side
def _local_job_alive(pid: int) -> bool:
    """Whether the controller process of a local job (testing mode) still runs.

    On Linux an ended process that no one has reaped yet (a zombie), or a recycled PID that is not
    submitit's, is not alive.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: not ours
        return False
    proc = Path(f"/proc/{pid}")
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        command = (proc / "cmdline").read_bytes()
    except (OSError, IndexError):  # no /proc here: the PID is all we know
        return True
    return state not in ("Z", "X") and b"submitit" in command


@dataclass(eq=False)
class _SubmittedRun:
    """A run and the submitit job that trains it (submitted now, or by an earlier command)."""

    run: PlannedRun
    job: Any
    cluster: str
    earlier: bool = False  # found in the ledger, submitted by an earlier command

    def finished(self) -> bool:
        if self.job.paths.result_pickle.exists():
            return True
        if self.cluster == "local" and self.earlier:  # not this process's child: submitit cannot poll it
            return not _local_job_alive(int(self.job.job_id))
        return self.job.done()

    @property
    def log(self) -> Path:
        """The job's stderr file."""
        return Path(self.job.paths.stderr)

    def outcome(self) -> tuple[str, str]:
        """``(outcome, note)`` of the ended job: what the run reported, else what its folder says."""
        if self.job.paths.result_pickle.exists():
            try:
                outcome, note = self.job.result()
                return outcome, note
            except Exception:  # the job itself failed, outside the run (e.g. an import error on the node)
                return "failed", f"the job raised an error; log: {self.log}"
        if run_status(self.run.out, self.run.config.steps) == "done":
            return "done", "finished"
        return "failed", f"the job ended without a result (killed, cancelled or out of time); log: {self.log}"


def _read_ledger(root: Path) -> dict[str, dict[str, str]]:
    path = root / LEDGER_FILE
    try:
        ledger = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):  # none yet, or unreadable: nothing is known to be queued
        return {}
    return ledger if isinstance(ledger, dict) else {}


def _record_jobs(root: Path, submitted: list[_SubmittedRun], folder: Path) -> None:
    ledger = _read_ledger(root)  # read again: another stage of the same out may have written meanwhile
    for item in submitted:
        ledger[item.run.out.name] = {"job_id": str(item.job.job_id), "folder": str(folder), "cluster": item.cluster}
    atomic_write_bytes(root / LEDGER_FILE, json.dumps(ledger, indent=1, sort_keys=True).encode())


def _jobs_still_active(submitit: ModuleType, runs: list[PlannedRun], root: Path) -> dict[Path, _SubmittedRun]:
    """The runs whose job from an earlier command is still queued or running, with that job."""
    ledger = _read_ledger(root)
    found: list[_SubmittedRun] = []
    for run in runs:
        entry = ledger.get(run.out.name)
        if not isinstance(entry, dict) or entry.keys() < {"cluster", "folder", "job_id"}:
            continue
        if entry["cluster"] not in CLUSTERS.values():
            continue
        job_class = submitit.SlurmJob if entry["cluster"] == "slurm" else submitit.LocalJob
        job = job_class(folder=entry["folder"], job_id=str(entry["job_id"]))
        found.append(_SubmittedRun(run, job, entry["cluster"], earlier=True))
    if any(item.cluster == "slurm" for item in found):
        submitit.SlurmJob.watcher.update()  # one sacct call for every job recorded
    active = {}
    for item in found:
        if item.job.paths.result_pickle.exists():
            continue
        if item.cluster == "slurm":
            state = item.job.watcher.get_state(item.job.job_id, mode="cache").split()
            alive = bool(state) and state[0].upper() in ACTIVE_SLURM_STATES
        else:
            alive = _local_job_alive(int(item.job.job_id))
        if alive:
            active[item.run.out] = item
    return active


def _is_busy(run: PlannedRun) -> bool:
    try:
        RunFolderLock(run.out).acquire().release()
    except RunFolderBusy:
        return True
    return False


def _submit(
    submitit: ModuleType, runs: list[PlannedRun], options: ClusterOptions, folder: Path, job_name: str
) -> list[Any]:
    """Submit ``runs`` as one job array; returns their jobs, in order."""
    executor = submitit.AutoExecutor(folder=folder, cluster=options.cluster)
    executor.update_parameters(**options.executor_parameters(job_name))
    from submitit.core.utils import FailedJobError

    try:
        return executor.map_array(train_in_job, runs)
    except FailedJobError as error:  # sbatch refused the array (partition, account, time, ...)
        reason = " ".join(str(error).split()) or "no reason given"
        raise ConfigError(f"SLURM refused the job array: {reason}") from None


def submit_grid(
    grid: dict[str, Any],
    options: ClusterOptions,
    wait: bool = True,
    retry_failed: bool = False,
    job_name: str = "gradharmony-sweep",
    archived: Collection[str] = (),
) -> dict[str, int]:
    """Submit every unfinished run of ``grid`` as one job array; returns outcome counts.

    Runs that are done are skipped; runs whose folder another live process holds count as
    ``busy``; runs whose job from an earlier command is still queued or running are not submitted
    again.  With ``wait`` (the default) this waits for every job, printing each run's outcome, and
    the counts are those of :func:`gradharmony.uda.sweep.run_grid` (``done``, ``failed``, ``busy``,
    ``interrupted``); a job that ended without reporting (killed, cancelled, out of time) counts as
    ``failed`` and its run, still partial, is submitted again by the next command.  Without
    ``wait`` the counts say what was ``submitted`` now and what is ``queued`` from before.

    Raises:
        ConfigError: an invalid grid, submitit missing (:class:`SubmititMissing`), no ``sbatch``/``srun``,
            or SLURM refusing the array.
        KeyboardInterrupt: interrupted while waiting; the jobs keep running.
    """
    if options.cluster not in CLUSTERS.values():
        raise ConfigError(f"unknown submitit cluster {options.cluster!r}; valid: {', '.join(CLUSTERS.values())}")
    submitit = import_submitit()
    runs = expand(grid)
    root = Path(grid["out"])
    folder = Path(options.folder) if options.folder is not None else root / "submitit"
    statuses, todo = runs_to_train(runs, retry_failed, archived)
    active = _jobs_still_active(submitit, todo, root)
    busy = {r.out for r in todo if r.out not in active and _is_busy(r)}
    to_submit = [r for r in todo if r.out not in active and r.out not in busy]
    counts = status_counts(statuses, retry_failed)
    if busy:
        counts["busy"] = len(busy)
    print(
        f"grid: {len(runs)} runs, {counts['done']} already done, {len(to_submit)} to submit, "
        f"{len(active)} queued or running from an earlier submission, {len(busy)} busy; results under {root}/",
        flush=True,
    )
    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
    if to_submit and options.cluster == "slurm" and missing:
        raise ConfigError(
            f"--launcher submitit submits to SLURM, but this machine's PATH has no {' and no '.join(missing)}; "
            "run the sweep on a SLURM login node"
        )
    for run in to_submit:
        write_labels(run.out, run.task, run.method, run.variant, run.seed)
    prepare_data(to_submit)
    submitted: list[_SubmittedRun] = []
    if to_submit:
        jobs = _submit(submitit, to_submit, options, folder, job_name)
        submitted = [_SubmittedRun(run, job, options.cluster) for run, job in zip(to_submit, jobs)]
        _record_jobs(root, submitted, folder)
        if options.cluster == "slurm":
            where = f"SLURM job {'array ' if len(jobs) > 1 else ''}{str(jobs[0].job_id).split('_')[0]}"
        else:
            where = f"local job(s) (testing mode), PIDs {', '.join(str(job.job_id) for job in jobs)}"
        print(f"submitted {len(jobs)} run(s) as {where}; job logs in {folder}/", flush=True)
    if not wait:
        counts["submitted"] = len(submitted)
        if active:
            counts["queued"] = len(active)
        return counts
    _wait_for(submitted + list(active.values()), counts, POLL_S[options.cluster])
    return counts


def _wait_for(in_flight: list[_SubmittedRun], counts: dict[str, int], poll_s: float) -> None:
    """Wait until every job has ended, printing each run's outcome and counting it in ``counts``."""
    waiting = list(in_flight)
    failed_logs: list[str] = []
    started = time.perf_counter()
    ended = 0
    try:
        while waiting:
            for item in [item for item in waiting if item.finished()]:
                waiting.remove(item)
                outcome, note = item.outcome()
                counts[outcome] = counts.get(outcome, 0) + 1
                ended += 1
                run = item.run
                elapsed = (time.perf_counter() - started) / 60
                print(
                    f"[{ended}/{len(in_flight)} {elapsed:.1f} min] {run.task} {run.method} {run.variant} "
                    f"seed {run.seed}: {outcome} {note}",
                    flush=True,
                )
                if outcome != "done":
                    error = run.out / ERROR_FILE
                    recorded = f", error: {error}" if error.exists() else ""
                    failed_logs.append(
                        f"  {item.log} ({run.task} {run.method} {run.variant} seed {run.seed}: {outcome}{recorded})"
                    )
            if waiting:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"stopped waiting; {len(waiting)} job(s) may still be queued or running: run the same command "
            "again to wait for them (they are not submitted twice)"
        ) from None
    if failed_logs:
        print(f"{len(failed_logs)} job(s) did not finish their run; their logs (stderr):", flush=True)
        print("\n".join(failed_logs), flush=True)
