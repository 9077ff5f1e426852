"""Run records: everything a run folder holds besides its checkpoint, written and read here only.

A run folder (``<out>/`` of one training run) holds:

* ``config.yaml``: the resolved configuration, written first (atomically, by :func:`write_config`)
  and never rewritten: the folder belongs to that configuration until it is started over;
* ``metrics.jsonl``: one JSON line per evaluation, and ``steps.csv``: one row per step; the training
  engine writes both through :class:`RunLog` (their only writer), append-only.  Each checkpoint
  records how far both files reached when it was written (:meth:`RunLog.coverage`); on resume
  :meth:`RunLog.restore` cuts them back to exactly that, so a resumed run holds each record once;
* ``last.pt``: the checkpoint (written and read by :mod:`gradharmony.uda.engine.checkpoint`);
* ``predictions/``: with validators (label-free model selection), the softmax predictions of the
  fixed target subset at each evaluation, float16 ``[N, C]``, one ``step_<step>.npy`` per
  evaluation (named in its record), and ``target_index.npy``: which samples of the target train
  split they are (:func:`write_predictions`, :func:`read_predictions`);
* ``selected/<validator>/step_<step>.pt``: the checkpoint each validator of ``select`` picked so far
  (the model's weights and config, read by ``gradharmony eval --select``); the run checkpoint
  records which step each pick is, and files it does not record are pruned
  (:func:`prune_selection_files`);
* ``.lock``: the writer lock (:class:`RunFolderLock`), holding the PID of the last writer;
* in a sweep, ``run.json``: the run's labels (task, method, variant, seed), written by
  :func:`write_labels`, and ``error.txt``: the traceback of a run that failed (:func:`write_error`).

Sweeps write through the engine and the two functions above; reports, plots and the command line
only read, through :func:`read_metrics`, :func:`read_steps`, :func:`read_config`,
:func:`labelled_runs` and :func:`run_status`.  This module imports nothing else of the package.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

METRICS_FILE = "metrics.jsonl"
STEPS_FILE = "steps.csv"
CONFIG_FILE = "config.yaml"
CHECKPOINT_FILE = "last.pt"
LABELS_FILE = "run.json"
ERROR_FILE = "error.txt"
LOCK_FILE = ".lock"
PREDICTIONS_DIR = "predictions"
SELECTED_DIR = "selected"
TARGET_INDEX_FILE = "target_index.npy"
#: What a run writes into its folder (besides the lock and a sweep's labels); ``--overwrite`` deletes
#: these, and their temporary files, before starting over (and :data:`RUN_DIRS`' files).
RUN_FILES = (CONFIG_FILE, METRICS_FILE, STEPS_FILE, CHECKPOINT_FILE, ERROR_FILE)
#: Folders of per-evaluation files: the validators' predictions and the kept picks.
RUN_DIRS = (PREDICTIONS_DIR, SELECTED_DIR)
_STEP_FILE = re.compile(r"step_(\d+)\.(npy|pt)(\.tmp)?")
LABEL_KEYS = ("task", "method", "variant", "seed")
#: What :func:`run_status` answers.
STATUSES = ("done", "partial", "failed", "pending")

#: Fields of an evaluation record that hold measured times: the only ones two runs of one
#: configuration may differ in (a resumed run and an uninterrupted one included).
TIMING_FIELDS = ("seconds_per_step", "cpu_seconds_per_step", "validate_seconds")

STEP_FIELDS = ("step", "loss_cls", "loss_align", "cos", "angle", "w_align", "w_cls", "conflict", "measured", "guards")


def json_safe(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, so that no reader sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_config(folder: str | Path, values: dict[str, Any]) -> Path:
    """Write a run's resolved configuration to ``<folder>/config.yaml``, atomically.

    The engine writes it once, before any record; :func:`read_config` reads it back.
    """
    path = Path(folder) / CONFIG_FILE
    atomic_write_bytes(path, yaml.safe_dump(values, sort_keys=False).encode())
    return path


def remove_run_files(folder: str | Path) -> list[Path]:
    """Delete what a run wrote into ``folder`` (:data:`RUN_FILES` and their ``.tmp`` files).

    What ``--overwrite`` does, under the writer lock, before a run starts over; the sweep's labels
    (``run.json``) and the lock file stay.  Returns the files deleted.
    """
    removed = []
    for name in RUN_FILES:
        for path in (Path(folder) / name, Path(folder) / (name + ".tmp")):
            if path.is_file():
                path.unlink()
                removed.append(path)
    return removed + remove_selection_files(folder)


# ---------------------------------------------------------------------------------------- validation files
def predictions_path(folder: str | Path, step: int) -> Path:
    """Where the target subset's predictions of the evaluation at ``step`` are stored."""
    return Path(folder) / PREDICTIONS_DIR / f"step_{step:07d}.npy"


def selected_path(folder: str | Path, validator: str, step: int) -> Path:
    """Where the checkpoint that ``validator`` picked at ``step`` is kept."""
    return Path(folder) / SELECTED_DIR / validator / f"step_{step:07d}.pt"


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_predictions(folder: str | Path, step: int, probs: np.ndarray) -> Path:
    """Store one evaluation's predictions (``.npy``, atomically: the same bytes for the same array)."""
    path = predictions_path(folder, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, _npy_bytes(np.ascontiguousarray(probs)))
    return path


def write_target_index(folder: str | Path, index: np.ndarray) -> Path:
    """Store which target train samples the predictions are of, once per run folder.

    The subset is drawn with a fixed seed from the run's configuration, and a folder holds one
    configuration (its lock and hash check see to it), so an existing file already holds this index:
    it is neither read back nor rewritten at later evaluations.
    """
    path = Path(folder) / PREDICTIONS_DIR / TARGET_INDEX_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, _npy_bytes(np.asarray(index, dtype=np.int64)))
    return path


def read_predictions(folder: str | Path, step: int) -> np.ndarray:
    """The float16 ``[N, C]`` target predictions of the evaluation at ``step`` (``FileNotFoundError`` if none)."""
    return np.load(predictions_path(folder, step), allow_pickle=False)


def read_target_index(folder: str | Path) -> np.ndarray | None:
    """The target train indices the stored predictions are of, or ``None`` if the run stored none."""
    path = Path(folder) / PREDICTIONS_DIR / TARGET_INDEX_FILE
    return np.load(path, allow_pickle=False) if path.is_file() else None


def _step_files(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    return [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_FILE.fullmatch(p.name))]


def prune_selection_files(folder: str | Path, last_step: int, picks: Mapping[str, int]) -> list[Path]:
    """Cut the validation files back to a checkpoint of ``last_step`` whose kept picks are ``picks``.

    Deletes the predictions of evaluations after ``last_step`` (a resumed run writes them again)
    and every kept checkpoint under ``selected/`` but the step of each validator in ``picks``
    (``validator -> step``).  Returns the files deleted.
    """
    folder = Path(folder)
    removed = []
    for step, path in _step_files(folder / PREDICTIONS_DIR):
        if step > last_step or path.name.endswith(".tmp"):
            path.unlink()
            removed.append(path)
    selected = folder / SELECTED_DIR
    if selected.is_dir():
        for directory in sorted(p for p in selected.iterdir() if p.is_dir()):
            for step, path in _step_files(directory):
                if picks.get(directory.name) != step or path.name.endswith(".tmp"):
                    path.unlink()
                    removed.append(path)
            if not any(directory.iterdir()):
                directory.rmdir()
    return removed


def remove_selection_files(folder: str | Path) -> list[Path]:
    """Delete every stored prediction and kept pick (a run starting over); returns the files deleted."""
    folder = Path(folder)
    removed = prune_selection_files(folder, -1, {})
    for name in (TARGET_INDEX_FILE, TARGET_INDEX_FILE + ".tmp"):
        path = folder / PREDICTIONS_DIR / name
        if path.is_file():
            path.unlink()
            removed.append(path)
    for name in RUN_DIRS:
        directory = folder / name
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
    return removed


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's writer lock."""


class RunFolderLock:
    """The exclusive writer lock of a run folder: one process at a time trains into it.

    An OS lock (``flock``) on ``<folder>/.lock``, which holds the holder's PID: the operating system
    releases it when the process ends, however it ends, so a lock is never stale.  A second writer
    gets :class:`RunFolderBusy` naming the holder's PID.  Where ``fcntl`` does not exist (Windows),
    the lock is not taken.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> with RunFolderLock(folder):
        ...     try:
        ...         RunFolderLock(folder).acquire()
        ...     except RunFolderBusy as e:
        ...         print("busy")
        busy
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunFolderLock:
        try:
            import fcntl
        except ImportError:  # no POSIX locks here: nothing to hold
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderBusy(
                f"{self.folder} is being written by another process (PID {holder}); wait for it to end, "
                f"or stop it, before starting this run again"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunLog:
    """Appends evaluation records to ``metrics.jsonl`` and per-step records to ``steps.csv``.

    Step records are queued and appended by :meth:`flush_steps` (before each checkpoint);
    evaluation records are appended at once.  :meth:`coverage` says how far both files reach (after
    a flush): a checkpoint stores it, and :meth:`restore` cuts the files back to it on resume, so the
    records after the checkpoint (written, or half-written, by a run that was then killed) are
    dropped and produced again.
    """

    def __init__(self, out: Path):
        self.metrics_path = out / METRICS_FILE
        self.steps_path = out / STEPS_FILE
        self.pending_steps: list[dict[str, Any]] = []
        self.metrics_records = 0
        self.steps_records = 0

    # ------------------------------------------------------------------ what a checkpoint covers
    def coverage(self) -> dict[str, int]:
        """How far both files reach now: record counts and byte sizes (queued steps not included).

        Example:
            >>> import tempfile
            >>> log = RunLog(Path(tempfile.mkdtemp()))
            >>> log.add_evaluation({"step": 4})
            >>> log.add_step({"step": 0}); log.flush_steps()
            >>> log.coverage()
            {'metrics_records': 1, 'metrics_bytes': 12, 'steps_records': 1, 'steps_bytes': 87}
        """
        return {
            "metrics_records": self.metrics_records,
            "metrics_bytes": _size(self.metrics_path),
            "steps_records": self.steps_records,
            "steps_bytes": _size(self.steps_path),
        }

    def sync(self) -> None:
        """Force both files to disk (before a checkpoint that covers them is written)."""
        for path in (self.metrics_path, self.steps_path):
            if path.exists():
                with path.open("rb+") as f:
                    os.fsync(f.fileno())

    def restore(self, coverage: dict[str, int]) -> None:
        """Cut both files back to ``coverage`` (from :meth:`coverage`): keep exactly those records.

        Raises :class:`RecordsLost` when a file is shorter than the checkpoint says, or does not end
        a record where it should: the records were changed since, and the run cannot be resumed
        exactly.  Queued step records are dropped.
        """
        self.pending_steps = []
        for path, key in ((self.metrics_path, "metrics"), (self.steps_path, "steps")):
            size, records = int(coverage[f"{key}_bytes"]), int(coverage[f"{key}_records"])
            if size == 0:
                path.unlink(missing_ok=True)
                continue
            if _size(path) < size or _byte_at(path, size - 1) != b"\n":
                raise RecordsLost(
                    f"{path} no longer holds the {records} record(s) that the checkpoint "
                    f"{path.parent / CHECKPOINT_FILE} covers: the run's records were changed"
                )
            os.truncate(path, size)
        self.metrics_records = int(coverage["metrics_records"])
        self.steps_records = int(coverage["steps_records"])

    def restore_to_step(self, step: int) -> None:
        """Cut both files back to a checkpoint of ``step`` that does not record its coverage.

        For checkpoints written before checkpoints recorded it: keep the evaluations of steps up to
        ``step`` (the evaluation of ``step`` itself came before its checkpoint) and the rows of the
        steps before it.
        """
        self.pending_steps = []
        if self.metrics_path.exists():
            keep = [
                line
                for line in self.metrics_path.read_text().splitlines()
                if line.strip() and (recorded := _json_step(line)) is not None and recorded <= step
            ]
            atomic_write_bytes(self.metrics_path, "".join(line + "\n" for line in keep).encode())
            self.metrics_records = len(keep)
        if self.steps_path.exists():
            with self.steps_path.open(newline="") as f:
                rows = [
                    r
                    for r in csv.DictReader(f)
                    if (row_step := _int_or_none(r.get("step"))) is not None and row_step < step
                ]
            self.steps_path.unlink()
            self.steps_records = 0
            self._write_steps(rows)

    def clear(self) -> None:
        """Delete both files: records that no checkpoint covers (a run restarting from scratch)."""
        self.pending_steps = []
        for path in (self.metrics_path, self.steps_path):
            path.unlink(missing_ok=True)
        self.metrics_records = self.steps_records = 0

    # ------------------------------------------------------------------ writing
    def add_step(self, record: dict[str, Any]) -> None:
        """Queue one step's record; :meth:`flush_steps` appends the queue to ``steps.csv``."""
        self.pending_steps.append(record)

    def flush_steps(self) -> None:
        """Append the queued step records (the engine calls it before each checkpoint)."""
        if self.pending_steps:
            self._write_steps(self.pending_steps)
            self.pending_steps = []

    def _write_steps(self, rows: Iterable[dict[str, Any]]) -> None:
        rows = list(rows)
        new_file = _size(self.steps_path) == 0
        if new_file and not rows:
            return
        with self.steps_path.open("w" if new_file else "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=STEP_FIELDS)
            if new_file:
                writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k) for k in STEP_FIELDS})
        self.steps_records += len(rows)

    def add_evaluation(self, record: dict[str, Any]) -> None:
        """Append one evaluation record to ``metrics.jsonl`` (NaN and infinity written as null)."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(json_safe(record)) + "\n")
        self.metrics_records += 1


class RecordsLost(ValueError):
    """A run folder's records no longer hold what its checkpoint covers."""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _byte_at(path: Path, offset: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(1)


def _json_step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):  # a half-written last line
        return None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The evaluation records of a run directory (or of a metrics.jsonl file)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_steps(path: str | Path) -> list[dict[str, Any]]:
    """The per-step records of a run directory, with numbers parsed."""
    path = Path(path)
    if path.is_dir():
        path = path / STEPS_FILE
    out = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            parsed: dict[str, Any] = {}
            for k, v in row.items():
                if k == "guards":
                    parsed[k] = v
                elif k in ("conflict", "measured"):
                    parsed[k] = v == "True"
                else:
                    parsed[k] = float(v) if v not in ("", "None") else math.nan
            parsed["step"] = int(parsed["step"])
            out.append(parsed)
    return out


def read_config(folder: str | Path) -> dict[str, Any]:
    """The resolved configuration a run was trained with (its ``config.yaml``), as a mapping.

    ``TrainConfig.from_dict`` turns it into a config; the engine saves it when the run starts.
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {folder} is not a started run folder")
    values = yaml.safe_load(path.read_text())
    if not isinstance(values, dict):
        raise ValueError(f"{path} does not hold a configuration mapping")
    return values


# ---------------------------------------------------------------------------------------- sweeps
class LabelledRun(NamedTuple):
    """A run folder of a sweep with its labels (``task``, ``method``, ``variant``, ``seed``)."""

    labels: dict[str, Any]
    folder: Path


def write_labels(folder: str | Path, task: str, method: str, variant: str, seed: int) -> Path:
    """Label a sweep's run folder (creating it): what :func:`labelled_runs` and the reports read."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LABELS_FILE
    labels = {"task": task, "method": method, "variant": variant, "seed": int(seed)}
    atomic_write_bytes(path, json.dumps(labels).encode())
    return path


def read_labels(folder: str | Path) -> dict[str, Any]:
    """The labels a sweep gave a run folder (``task``, ``method``, ``variant``, ``seed``)."""
    path = Path(folder) / LABELS_FILE
    labels = json.loads(path.read_text())
    missing = [key for key in LABEL_KEYS if key not in labels]
    if missing:
        raise ValueError(f"{path} lacks the label(s) {', '.join(missing)}")
    return labels


def labelled_runs(root: str | Path) -> list[LabelledRun]:
    """Every run folder directly under ``root`` that a sweep labelled, in folder-name order.

    Each item unpacks as ``labels, folder``.
    """
    return [LabelledRun(read_labels(p.parent), p.parent) for p in sorted(Path(root).glob(f"*/{LABELS_FILE}"))]


def write_error(folder: str | Path, text: str) -> None:
    """Record why a run failed (a traceback); :func:`run_status` then answers ``failed``."""
    (Path(folder) / ERROR_FILE).write_text(text)


def clear_error(folder: str | Path) -> None:
    """Forget a recorded failure (before the run is tried again)."""
    (Path(folder) / ERROR_FILE).unlink(missing_ok=True)


def last_step(folder: str | Path) -> int | None:
    """The step of a run's last evaluation record, or ``None`` when it has none yet."""
    path = Path(folder) / METRICS_FILE
    if not path.exists():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return int(json.loads(lines[-1])["step"]) if lines else None


def run_status(folder: str | Path, steps: int) -> str:
    """A run folder's state, read from disk only: one of :data:`STATUSES`.

    ``done``: its last evaluation is at ``steps`` (or later) and the final checkpoint was saved after
    it; ``failed``: an error is recorded; ``partial``: a checkpoint exists to resume from (a run killed
    between its final evaluation and its final checkpoint is partial: training it again redoes the
    end, or finds it finished and changes nothing); ``pending``: nothing to resume (never started, or
    stopped before its first checkpoint).
    """
    folder = Path(folder)
    step = last_step(folder)
    checkpoint = folder / CHECKPOINT_FILE
    if step is not None and step >= steps:
        saved_after = (
            checkpoint.exists() and checkpoint.stat().st_mtime_ns >= (folder / METRICS_FILE).stat().st_mtime_ns
        )
        return "done" if saved_after else "partial"
    if (folder / ERROR_FILE).exists():
        return "failed"
    return "partial" if checkpoint.exists() else "pending"
