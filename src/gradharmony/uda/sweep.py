"""Grids of runs: tasks x methods x harmonizer variants x seeds, resumable, several at once.

A grid is a YAML mapping (or the same dict in Python)::

    out: runs/digits                 # every run goes to <out>/<config hash>/
    base: {steps: 3000, eval_every: 500, backbone: lenet, data_root: ../shared/data}
    tasks:                           # name -> overrides (source, target, sizes, ...)
      mnist->usps: {source: mnist, target: usps, image_size: 28, channels: 1}
    methods: [dann, cdan]            # or name -> overrides: {dann: {method_params: {disc_hidden: 256}}}
    variants:                        # name -> overrides of the harmonizer (optional: see below)
      none: {harmonizer: none}
      gh: {harmonizer: gh}
      gh++/align: {harmonizer: gh++, lead: align}
    seeds: [0, 1, 2]

Without ``variants`` the grid has one variant: the harmonizer the runs resolve to (the one ``base``
sets, with its settings, or ``none``), named after it.

Each run's folder is named by the hash of its resolved configuration (DomainBed style), so a run
is never duplicated: a finished one is skipped, an interrupted one resumes from its checkpoint, and
killing the sweep loses at most the unfinished steps since each run's last checkpoint.  Runs are
ordered seed by seed so that, at any moment, the finished runs form paired comparisons.

Runs go to worker processes (spawned, ``workers`` at a time, each reused for up to
``runs_per_process`` runs) that end when the sweep ends, however it ends: on SIGINT, SIGTERM or SIGHUP the
sweep asks each worker once to stop the way an interrupted run stops (finish the step, save a
checkpoint, exit), and if the sweep itself is killed (SIGKILL) each worker notices that its parent
is gone and does the same, then exits for good after :data:`ORPHAN_GRACE_S` seconds at the latest.
A run whose folder another live process is training (its writer lock is held) is reported
``busy``, not failed; the next sweep picks it up.  On a SLURM cluster the same runs go to a job
array instead (:mod:`gradharmony.uda.launchers`, ``gradharmony sweep --launcher submitit``).

The benchmarks' stages are such grids, in ``configs/benchmarks/``.  A sweep writes its run
folders through the engine and :mod:`gradharmony.uda.runs` (labels, recorded failures); reading
them back (statuses, labelled folders, logs) is :mod:`gradharmony.uda.runs`'s too.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from gradharmony.uda.config import ConfigError, TrainConfig, yaml_error_line
from gradharmony.uda.runs import RunFolderBusy, RunFolderLock, clear_error, write_error, write_labels
from gradharmony.uda.runs import run_status as folder_status
from gradharmony.uda.stopping import HANGUP, STOP_SIGNALS, detach_from_terminal, handled_stop_signals

GRID_KEYS = ("out", "base", "tasks", "methods", "variants", "seeds", "workers")


@dataclass(frozen=True)
class PlannedRun:
    """One run of a grid: its labels and its resolved config (whose ``out`` is its folder)."""

    task: str
    method: str
    variant: str
    seed: int
    config: TrainConfig

    @property
    def out(self) -> Path:
        """The run's folder, ``<grid out>/<config hash>``."""
        return Path(self.config.out)


def load_grid(path: str | Path) -> dict[str, Any]:
    """The grid mapping of a YAML file (see the module's docstring); :func:`expand` checks it.

    A missing file, invalid YAML or anything but a mapping is a :class:`ConfigError`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {path} does not exist")
    try:
        grid = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"grid file {path} is not valid YAML: {yaml_error_line(e)}") from None
    if not isinstance(grid, dict):
        raise ConfigError(f"grid file {path} must hold a mapping")
    return grid


def expand(grid: dict[str, Any]) -> list[PlannedRun]:
    """Every run of the grid, seed-major, each with its resolved config and hash-named folder.

    A grid without ``variants`` keeps the harmonizer its ``base`` (or a task or method) sets, with
    its settings, and names the single variant after it (``none`` when nothing sets one).
    """
    unknown = set(grid) - set(GRID_KEYS)
    if unknown:
        raise ConfigError(f"unknown grid key(s) {', '.join(sorted(unknown))}; valid: {', '.join(GRID_KEYS)}")
    for key in ("out", "tasks", "methods", "seeds"):
        if not grid.get(key):
            raise ConfigError(f"the grid needs a non-empty {key!r}")
    root = Path(grid["out"])
    base = dict(grid.get("base") or {})
    # Without variants: one variant, the harmonizer the runs resolve to (base's, or none), kept as is.
    variants = grid.get("variants") or {None: {}}
    if not isinstance(variants, dict):
        raise ConfigError("the grid's 'variants' must map variant names to harmonizer overrides")
    if not isinstance(grid["tasks"], dict):
        raise ConfigError("the grid's 'tasks' must map task names to overrides (source, target, ...)")
    methods = grid["methods"]
    if not isinstance(methods, dict):
        methods = {name: {} for name in methods}
    runs = []
    for seed in grid["seeds"]:
        for task, task_overrides in grid["tasks"].items():
            for method, method_overrides in methods.items():
                for variant, variant_overrides in variants.items():
                    values = {
                        **base,
                        **(task_overrides or {}),
                        **(method_overrides or {}),
                        "method": method,
                        **(variant_overrides or {}),
                        "seed": int(seed),
                        "progress": False,
                    }
                    values.setdefault("threads", 1)
                    cfg = TrainConfig.from_dict(copy.deepcopy(values))  # no run shares the grid's dicts
                    # ``out`` is not in the hash and any path is valid: set, not validated a second time
                    cfg.out = str(root / cfg.outcome_hash())
                    name = variant if variant is not None else cfg.harmonizer
                    runs.append(PlannedRun(task, method, name, int(seed), cfg))
    return runs


def _label_run(run: PlannedRun) -> None:
    write_labels(run.out, run.task, run.method, run.variant, run.seed)


#: What a run of a sweep ends as (besides those :func:`gradharmony.uda.runs.run_status` reads back).
OUTCOMES = ("done", "failed", "interrupted", "busy")


def train_planned_run(run: PlannedRun) -> tuple[str, str]:
    """Train one run in this process; returns ``(outcome, note)`` with an outcome of :data:`OUTCOMES`.

    What a sweep's worker process, or a cluster job (:mod:`gradharmony.uda.launchers`), does with
    each run: ``busy`` if another live process holds the run folder's lock, else label it, forget a
    recorded failure and train it (resuming from its checkpoint); an error is recorded in the folder
    (``failed``), an interrupt stops the run as it stops a ``train`` (``interrupted``).
    """
    try:
        from gradharmony.uda.engine import train

        try:  # another live process trains this folder (an orphan of a killed sweep, a second sweep)
            RunFolderLock(run.out).acquire().release()
        except RunFolderBusy as e:
            return "busy", str(e)
        _label_run(run)
        clear_error(run.out)
        try:
            result = train(run.config)
            return "done", f"last {100 * result['last_target_acc']:.2f} best {100 * result['best_target_acc']:.2f}"
        except RunFolderBusy as e:  # taken between the check above and train's own lock
            return "busy", str(e)
        except Exception:  # one broken run must not stop the grid: record it and go on
            write_error(run.out, traceback.format_exc())
            return "failed", traceback.format_exc().strip().splitlines()[-1]
    except KeyboardInterrupt as e:  # the engine says where it stopped and what it saved
        return "interrupted", str(e)


RUNS_PER_PROCESS = 25
#: Seconds a worker whose sweep died has to finish its step and save, before it exits regardless.
ORPHAN_GRACE_S = 10.0
_POLL_S = 0.25  # how often an idle worker, and each worker's watchdog, look around
_STOP = "stop"  # the message that asks a worker to stop (sent once per interrupt of the sweep)


# ------------------------------------------------------------------------------------ worker side
class _WorkerState:
    """What a worker's main thread (training) and its watchdog thread share.

    Stopping a run is one SIGTERM to the worker itself: the engine turns the first SIGINT or SIGTERM
    into "stop after this step, save, return" and a second into "stop now".  A worker blocks SIGINT and
    SIGHUP, so a terminal's Ctrl-C or hang-up (sent to the whole process group) reaches it only
    through the sweep's stop request.  A SIGTERM can still reach it directly as well (a supervisor signalling every
    process of the job), so a request sends a signal only if the worker has received fewer SIGTERMs
    than it has had requests.  They are counted through :func:`signal.set_wakeup_fd` (one byte per
    signal handled, whichever handler is installed), plus one still pending (:func:`signal.sigpending`:
    sent, its handler not run yet).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_run = False
        self.stopping = False
        self.requests = 0
        self.received = 0
        self.wakeup_read: int | None = None
        self.stop_signals = {int(signal.SIGINT), int(signal.SIGTERM)}
        self._counted_pending: set[int] = set()  # pending signals counted before their byte came

    def _count_signals(self) -> None:
        if self.wakeup_read is None:
            return
        pending: set[int] = set()
        with contextlib.suppress(AttributeError, OSError):  # no sigpending here
            pending = {int(s) for s in signal.sigpending()} & self.stop_signals
        handled: list[int] = []
        while True:
            try:
                data = os.read(self.wakeup_read, 256)
            except OSError:  # BlockingIOError: nothing more to read
                break
            if not data:
                break
            handled += [byte for byte in data if byte in self.stop_signals]
        for signum in handled:
            if signum in self._counted_pending:  # counted while it was pending
                self._counted_pending.discard(signum)
            else:
                self.received += 1
        for signum in pending - set(handled) - self._counted_pending:
            self._counted_pending.add(signum)
            self.received += 1

    def count_signals(self) -> None:
        """Read the stop signals received so far (the watchdog does, every tick)."""
        with self.lock:
            self._count_signals()

    def request_stop(self) -> None:
        """Stop: the current run as an interrupt does (one SIGTERM), then the worker.  A hang-up
        pending (blocked here, see :func:`_spawn_worker`) means the terminal is gone: the worker's
        output is detached from it first, as the sweep's is."""
        with contextlib.suppress(AttributeError, OSError):
            if HANGUP is not None and HANGUP in signal.sigpending():
                detach_from_terminal()
        with self.lock:
            self.stopping = True
            self.requests += 1
            self._count_signals()
            send = self.in_run and self.received < self.requests
        if send:
            os.kill(os.getpid(), signal.SIGTERM)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _set_parent_death_signal(signum: int) -> bool:
    """Linux: have the kernel send ``signum`` to this process when its parent dies (``prctl``)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        return libc.prctl(pr_set_pdeathsig, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _arm_signals(state: _WorkerState) -> None:
    """In a worker's main thread: SIGTERM stops like Ctrl-C, each stop signal is counted, and (Linux)
    the parent's death sends SIGTERM at once.  SIGINT and SIGHUP are blocked from the start (see
    :func:`_spawn_worker`)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    with contextlib.suppress(AttributeError, OSError):  # started with SIGINT blocked (see _spawn_worker)
        if signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []):
            state.stop_signals = {int(signal.SIGTERM)}
    try:
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        state.wakeup_read = read
    except (OSError, ValueError):  # not on this platform: requests are then sent unconditionally
        state.wakeup_read = None
    _set_parent_death_signal(signal.SIGTERM)


def _watch(control: Connection, parent_pid: int, state: _WorkerState) -> None:
    """A worker's watchdog thread: stop requests from the sweep, and the sweep's death.

    The sweep is gone when the control pipe closes (the OS closes it when the sweep dies, however it
    dies) or when this process's parent is no longer the sweep (it was re-parented).  Then the worker
    stops as on an interrupt and, if it has not exited :data:`ORPHAN_GRACE_S` seconds later, exits.
    """
    while True:
        message = None
        try:
            if control.poll(_POLL_S):
                message = control.recv()
            orphaned = os.getppid() != parent_pid
        except (EOFError, OSError):
            orphaned = True
        if orphaned:
            time.sleep(0.2)  # a parent-death signal on its way is counted, not doubled
            state.request_stop()
            time.sleep(ORPHAN_GRACE_S)
            os._exit(3)
        if message == _STOP:
            state.request_stop()
        else:
            state.count_signals()  # keeps the wakeup pipe from filling up


def _worker_main(tasks: Connection, control: Connection, parent_pid: int, max_runs: int) -> None:
    """A worker process: train the runs the sweep sends on ``tasks``, answer each with its outcome.

    Ends after ``max_runs`` runs, on ``None``, after an interrupted run, on a stop request, or when
    the sweep is gone.
    """
    state = _WorkerState()
    _arm_signals(state)
    # tqdm's default lock is a multiprocessing semaphore, which a worker ended by a signal would
    # leave to the resource tracker's "leaked semaphore" warning: a thread lock is enough here.
    tqdm.set_lock(threading.RLock())
    threading.Thread(target=_watch, args=(control, parent_pid, state), daemon=True, name="sweep-watchdog").start()
    if os.getppid() != parent_pid:  # the sweep died while this process started
        return
    done = 0
    with contextlib.suppress(KeyboardInterrupt, EOFError, OSError):
        while done < max_runs and not state.stopping:
            if not tasks.poll(_POLL_S):
                continue
            run = tasks.recv()
            if run is None:
                break
            with state.lock:
                state.in_run = not state.stopping
            outcome = train_planned_run(run) if state.in_run else ("interrupted", "")
            with state.lock:
                state.in_run = False
            if outcome[0] == "interrupted":
                state.stopping = True
            done += 1
            tasks.send(outcome)
    # Nothing is left to clean up (the run's files are closed): skip the interpreter's teardown,
    # which takes seconds with torch loaded, so that a stopped worker is gone at once.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


# -------------------------------------------------------------------------------------- sweep side
@dataclass(eq=False)
class _Worker:
    process: mp.process.BaseProcess
    tasks: Connection  # runs out, outcomes in
    control: Connection  # stop requests out; its closing tells the worker the sweep is gone
    run: PlannedRun | None = None
    runs: int = 0
    stop_requests: int = 0

    def send(self, message: Any) -> bool:
        with contextlib.suppress(OSError):
            self.tasks.send(message)
            return True
        return False

    def request_stop(self) -> None:
        self.stop_requests += 1
        with contextlib.suppress(OSError):
            self.control.send(_STOP)

    def outcome(self) -> tuple[str, str] | None:
        """The outcome the worker sent, or ``None`` if it ended without one."""
        try:
            return self.tasks.recv() if self.tasks.poll() else None
        except (EOFError, OSError):
            return None

    def close(self, timeout: float | None = None) -> None:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.tasks.close()
        self.control.close()


class _Interrupts:
    """SIGINT, SIGTERM and SIGHUP (a closed terminal) of the sweep, counted (not raised) and made
    visible to :func:`wait`.

    The handler writes one byte into a pipe whose read end the sweep's :func:`wait` watches, so an
    interrupt wakes the sweep wherever it waits, and never raises half-way through sending a run.
    """

    def __init__(self) -> None:
        self.count = 0
        self._previous: dict[int, Any] = {}
        self.waitable: int | None = None  # None (Windows: wait() takes no pipe): the sweep polls
        self._write: int | None = None
        if os.name == "posix":
            self.waitable, self._write = os.pipe()
            os.set_blocking(self.waitable, False)
            os.set_blocking(self._write, False)

    def __enter__(self) -> _Interrupts:
        for sig in handled_stop_signals():
            with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        if signum == HANGUP:
            detach_from_terminal()
        self.count += 1
        if self._write is not None:
            with contextlib.suppress(OSError):
                os.write(self._write, b"!")

    def drain(self) -> None:
        """Empty the pipe (the interrupts stay counted)."""
        with contextlib.suppress(OSError, TypeError):
            while os.read(self.waitable, 256):
                pass

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        for fd in (self.waitable, self._write):
            if fd is not None:
                os.close(fd)


def _spawn_worker(runs_per_process: int) -> _Worker:
    ctx = mp.get_context("spawn")
    tasks, child_tasks = ctx.Pipe(duplex=True)
    child_control, control = ctx.Pipe(duplex=False)
    process = ctx.Process(
        target=_worker_main,
        args=(child_tasks, child_control, os.getpid(), runs_per_process),
        name="gradharmony-sweep-worker",
    )
    # Started with SIGINT and SIGHUP blocked, which its every thread inherits: a terminal's Ctrl-C or
    # hang-up (sent to the whole process group) reaches the sweep, which asks each worker once to
    # stop; the worker would otherwise get it twice.
    blocked = None
    with contextlib.suppress(AttributeError, ValueError, OSError, ImportError):
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()  # starting it would unblock SIGINT again, half-way
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS) - {signal.SIGTERM})
    try:
        process.start()
    finally:
        if blocked is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    child_tasks.close()  # the worker holds the only other ends: its death closes them
    child_control.close()
    return _Worker(process, tasks, control)


def _run_workers(
    runs: list[PlannedRun], workers: int, runs_per_process: int, interrupts: _Interrupts
) -> Iterator[tuple[PlannedRun, str, str]]:
    """Train ``runs`` on up to ``workers`` processes; yields ``(run, outcome, note)`` as runs end.

    On an interrupt of the sweep no run starts any more and every worker is asked to stop (a second
    interrupt asks again: the engine then stops at once; a third kills the workers); the generator
    ends when every worker has ended.
    """
    pending = deque(runs)
    live: list[_Worker] = []
    retired: list[_Worker] = []
    handled = 0
    try:
        while pending or any(w.run is not None for w in live) or (interrupts.count and live):
            for w in [w for w in retired if not w.process.is_alive()]:
                retired.remove(w)
                w.close()
            if interrupts.count > handled:
                pending.clear()
                handled = interrupts.count
                for w in live:
                    if handled >= 3:
                        w.process.kill()
                    else:
                        w.request_stop()
            while pending and (len(live) < workers or any(w.run is None for w in live)):
                idle = next((w for w in live if w.run is None), None)
                if idle is None:
                    idle = _spawn_worker(runs_per_process)
                    live.append(idle)
                idle.run = pending.popleft()
                if not idle.send(idle.run):  # it ended already: its death is handled below
                    pending.appendleft(idle.run)
                    idle.run = None
            watched: list[Any] = [] if interrupts.waitable is None else [interrupts.waitable]
            for w in live:
                watched += [w.tasks, w.process.sentinel]
            ready = set(wait(watched, timeout=None if interrupts.waitable is not None else _POLL_S))
            if interrupts.waitable in ready:
                interrupts.drain()
            for w in list(live):
                if w.tasks not in ready and w.process.sentinel not in ready:
                    continue
                outcome = w.outcome() if w.run is not None else None
                run, w.run = w.run, None
                if run is not None:
                    if outcome is None and w.process.sentinel in ready:
                        w.process.join()
                        if interrupts.count:
                            outcome = ("interrupted", f"worker ended with exit code {w.process.exitcode}")
                        else:
                            note = f"the worker process died (exit code {w.process.exitcode}) while training this run"
                            write_error(run.out, note + "\n")
                            outcome = ("failed", note)
                    if outcome is None:
                        w.run = run  # woken by something else: still running
                        continue
                    w.runs += 1
                    yield run, *outcome
                if not w.process.is_alive() or w.runs >= runs_per_process or (outcome or ("",))[0] == "interrupted":
                    live.remove(w)  # it ends by itself; joined at the end
                    w.send(None)
                    retired.append(w)
        for w in live:
            w.send(None)
    finally:
        for w in live:  # normally idle workers told to end; after an error, stopped (once) and ended
            if w.run is not None and not w.stop_requests:
                w.request_stop()
        for w in live + retired:
            w.close(timeout=ORPHAN_GRACE_S + 5)


def run_grid(
    grid: dict[str, Any],
    workers: int | None = None,
    retry_failed: bool = False,
    runs_per_process: int = RUNS_PER_PROCESS,
    archived: Collection[str] = (),
) -> dict[str, int]:
    """Run every unfinished run of ``grid`` with ``workers`` processes; returns outcome counts.

    A worker process runs up to ``runs_per_process`` runs before a fresh one replaces it.  Reuse
    saves the interpreter and torch start-up (several seconds: as long as a whole 500-step run on
    features); each run seeds every generator itself, so a reused worker trains bit for bit the same
    run as a fresh one (tested).  The periodic replacement bounds whatever a long sweep could leak.

    Runs named in ``archived`` (finished elsewhere, see :func:`runs_to_train`) are not trained.
    The counts are by outcome: ``done`` (including runs finished before), ``archived``, ``failed`` (an error
    is recorded in the run's folder), ``busy`` (another live process is training the run's folder:
    run the sweep again once it has ended) and, after an interrupt, ``interrupted``.

    Raises:
        ConfigError: an invalid grid or ``runs_per_process``.
        KeyboardInterrupt: the sweep was interrupted (SIGINT, SIGTERM); its running runs stopped
            as an interrupted run stops (a checkpoint saved) and every worker has ended.
    """
    if runs_per_process < 1:
        raise ConfigError(f"runs_per_process must be at least 1, got {runs_per_process}")
    runs = expand(grid)
    statuses, todo = runs_to_train(runs, retry_failed, archived)
    workers = workers or int(grid.get("workers") or 1)
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    counts = status_counts(statuses, retry_failed)
    print(
        f"grid: {len(runs)} runs, {counts['done']} already done, "
        + (f"{counts['archived']} finished elsewhere (archived), " if "archived" in counts else "")
        + f"{len(todo)} to run with {workers} process(es); "
        f"results under {grid['out']}/",
        flush=True,
    )
    for run in todo:
        _label_run(run)
    prepare_data(todo)
    started = time.perf_counter()
    with _Interrupts() as interrupts:
        for i, (run, outcome, note) in enumerate(_run_workers(todo, workers, runs_per_process, interrupts), 1):
            counts[outcome] = counts.get(outcome, 0) + 1
            elapsed = (time.perf_counter() - started) / 60
            print(
                f"[{i}/{len(todo)} {elapsed:.1f} min] {run.task} {run.method} {run.variant} seed {run.seed}: "
                f"{outcome} {note}",
                flush=True,
            )
        interrupted = interrupts.count > 0
    if counts.get("busy"):
        print(
            f"{counts['busy']} run(s) busy: another process is training their folders; "
            "run the same sweep again once it has ended",
            flush=True,
        )
    if interrupted:
        raise KeyboardInterrupt(
            "sweep interrupted: the running runs saved a checkpoint; run the same command to continue"
        )
    return counts


def runs_to_train(
    runs: list[PlannedRun], retry_failed: bool = False, archived: Collection[str] = ()
) -> tuple[list[str], list[PlannedRun]]:
    """Each run's status on disk (:func:`gradharmony.uda.runs.run_status`) and the runs still to train.

    Those are the ``pending`` and ``partial`` runs, and with ``retry_failed`` the ``failed`` ones too
    (a run with a recorded error is otherwise left alone until asked).  A run whose folder name is in
    ``archived`` (finished elsewhere, its results kept: see :func:`read_archived`) and that is not
    done here is ``archived``, not trained.
    """
    statuses = [planned_status(r, archived) for r in runs]
    wanted = ("pending", "partial", "failed") if retry_failed else ("pending", "partial")
    return statuses, [r for r, status in zip(runs, statuses) if status in wanted]


def status_counts(statuses: list[str], retry_failed: bool = False) -> dict[str, int]:
    """The outcome counts a sweep starts from: ``done`` and ``failed`` (unless retried) on disk, and
    ``archived`` where any run is."""
    counts = {"done": statuses.count("done"), "failed": 0 if retry_failed else statuses.count("failed")}
    if "archived" in statuses:
        counts["archived"] = statuses.count("archived")
    return counts


def planned_status(run: PlannedRun, archived: Collection[str] = ()) -> str:
    """The run's status on disk, or ``archived`` if it is not done here and ``archived`` names its folder."""
    status = folder_status(run.out, run.config.steps)
    return "archived" if status != "done" and run.out.name in archived else status


def read_archived(path: str | Path) -> frozenset[str]:
    """The run folder names that a JSON file keeps the results of: its object's keys or its list's items.

    ``benchmarks/digits_parity.py report`` keeps such a file (``docs/digits_parity/runs.json``) so that
    runs finished on another machine, whose folders are gone, are not trained again.

    Raises:
        ConfigError: the file cannot be read or holds neither an object nor a list of names.
    """
    path = Path(path)
    try:
        names = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read the archive of finished runs {path}: {error}") from None
    if isinstance(names, dict):
        names = list(names)
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ConfigError(
            f"{path}: an archive of finished runs is a JSON object keyed by run folder names, or a list of them"
        )
    return frozenset(names)


def prepare_data(runs: list[PlannedRun]) -> None:
    """Decode or generate each domain once, before the workers (or jobs) read it from the cache."""
    from gradharmony.uda.engine import load_domains

    seen = set()
    for run in runs:
        c = run.config
        key = (c.source, c.target, c.image_size, c.channels, c.data_root, c.cache_dir)
        if key not in seen:
            seen.add(key)
            load_domains(c)
