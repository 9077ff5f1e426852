"""Grids of runs: tasks x methods x harmonizer variants x seeds, resumable, several at once.

A grid is a YAML mapping (or the same dict in Python)::

    out: runs/digits                 # every run goes to <out>/<config hash>/
    base: {steps: 3000, eval_every: 500, backbone: lenet, data_root: ../shared/data}
    tasks:                           # name -> overrides (source, target, sizes, ...)
      mnist->usps: {source: mnist, target: usps, image_size: 28, channels: 1}
    methods: [dann, cdan]            # or name -> overrides: {dann: {method_params: {disc_hidden: 256}}}
    variants:                        # name -> overrides of the harmonizer
      none: {harmonizer: none}
      gh: {harmonizer: gh}
      gh++/align: {harmonizer: gh++, lead: align}
    seeds: [0, 1, 2]

Each run's folder is named by the hash of its resolved configuration (DomainBed style), so a run
is never duplicated: a finished one is skipped, an interrupted one resumes from its checkpoint, and
killing the sweep loses at most the unfinished steps since each run's last checkpoint.  Runs are
ordered seed by seed so that, at any moment, the finished runs form paired comparisons.

The benchmarks' stages are such grids, in ``configs/benchmarks/``.  A sweep writes its run
folders through the engine and :mod:`gradharmony.uda.runs` (labels, recorded failures); reading
them back (statuses, labelled folders, logs) is :mod:`gradharmony.uda.runs`'s too.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from gradharmony.uda.config import ConfigError, TrainConfig
from gradharmony.uda.runs import clear_error, write_error, write_labels
from gradharmony.uda.runs import run_status as folder_status

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
    """The grid mapping of a YAML file (see the module's docstring); :func:`expand` checks it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {path} does not exist")
    grid = yaml.safe_load(path.read_text()) or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"grid file {path} must hold a mapping")
    return grid


def expand(grid: dict[str, Any]) -> list[PlannedRun]:
    """Every run of the grid, seed-major, each with its resolved config and hash-named folder."""
    unknown = set(grid) - set(GRID_KEYS)
    if unknown:
        raise ConfigError(f"unknown grid key(s) {', '.join(sorted(unknown))}; valid: {', '.join(GRID_KEYS)}")
    for key in ("out", "tasks", "methods", "seeds"):
        if not grid.get(key):
            raise ConfigError(f"the grid needs a non-empty {key!r}")
    root = Path(grid["out"])
    base = dict(grid.get("base") or {})
    variants = grid.get("variants") or {"none": {"harmonizer": "none"}}
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
                    cfg = TrainConfig.from_dict(values)
                    cfg = cfg.with_overrides({"out": str(root / cfg.outcome_hash())})
                    runs.append(PlannedRun(task, method, variant, int(seed), cfg))
    return runs


def _label_run(run: PlannedRun) -> None:
    write_labels(run.out, run.task, run.method, run.variant, run.seed)


def _execute(run: PlannedRun) -> tuple[str, str]:
    from gradharmony.uda.engine import train

    _label_run(run)
    clear_error(run.out)
    try:
        result = train(run.config)
        return "done", f"last {100 * result['last_target_acc']:.2f} best {100 * result['best_target_acc']:.2f}"
    except KeyboardInterrupt:
        return "interrupted", ""
    except Exception:  # one broken run must not stop the grid: record it and go on
        write_error(run.out, traceback.format_exc())
        return "failed", traceback.format_exc().strip().splitlines()[-1]


RUNS_PER_PROCESS = 25


def run_grid(
    grid: dict[str, Any],
    workers: int | None = None,
    retry_failed: bool = False,
    runs_per_process: int = RUNS_PER_PROCESS,
) -> dict[str, int]:
    """Run every unfinished run of ``grid`` with ``workers`` processes; returns status counts.

    A worker process runs up to ``runs_per_process`` runs before a fresh one replaces it.  Reuse
    saves the interpreter and torch start-up (several seconds: as long as a whole 500-step run on
    features); each run seeds every generator itself, so a reused worker trains bit for bit the same
    run as a fresh one (tested).  The periodic replacement bounds whatever a long sweep could leak.
    """
    if runs_per_process < 1:
        raise ConfigError(f"runs_per_process must be at least 1, got {runs_per_process}")
    runs = expand(grid)
    statuses = {id(r): folder_status(r.out, r.config.steps) for r in runs}
    todo = [
        r for r in runs if statuses[id(r)] in ("pending", "partial") or (retry_failed and statuses[id(r)] == "failed")
    ]
    workers = workers or int(grid.get("workers") or 1)
    done = sum(s == "done" for s in statuses.values())
    print(
        f"grid: {len(runs)} runs, {done} already done, {len(todo)} to run with {workers} process(es); "
        f"results under {grid['out']}/",
        flush=True,
    )
    for run in todo:
        _label_run(run)
    _prepare_data(todo)
    counts = {"done": done, "failed": sum(s == "failed" for s in statuses.values()) if not retry_failed else 0}
    started = time.perf_counter()
    pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, maxtasksperchild=runs_per_process)
    try:
        for i, (run, (status, note)) in enumerate(zip(todo, pool.imap(_execute, todo)), 1):
            counts[status] = counts.get(status, 0) + 1
            elapsed = (time.perf_counter() - started) / 60
            print(
                f"[{i}/{len(todo)} {elapsed:.1f} min] {run.task} {run.method} {run.variant} seed {run.seed}: "
                f"{status} {note}",
                flush=True,
            )
        pool.close()
    except KeyboardInterrupt:
        # Workers got the signal too (or get SIGTERM now): each finishes its step, saves, exits.
        pool.terminate()
        print("sweep interrupted: running runs saved a checkpoint; run the same command to continue", flush=True)
        raise
    finally:
        pool.join()
    return counts


def _init_worker() -> None:
    """A thread lock for tqdm in each worker: its default multiprocessing lock is a named semaphore,
    which a worker ended by the pool would leave to the resource tracker's "leaked semaphore" warning."""
    tqdm.set_lock(threading.RLock())


def _prepare_data(runs: list[PlannedRun]) -> None:
    """Decode or generate each domain once, before the workers read it from the cache."""
    from gradharmony.uda.engine import load_domains

    seen = set()
    for run in runs:
        c = run.config
        key = (c.source, c.target, c.image_size, c.channels, c.data_root)
        if key not in seen:
            seen.add(key)
            load_domains(c)
