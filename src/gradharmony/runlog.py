"""A run's files on disk: the evaluation log (JSON lines), the per-step log (CSV), checkpoints.

Every write is atomic or append-only, and on resume both logs are cut back to the checkpoint's
step, so an interrupted and resumed run holds each record exactly once.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

STEP_FIELDS = ("step", "loss_cls", "loss_align", "cos", "angle", "w_align", "w_cls", "conflict",
               "measured", "guards")


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint so that a crash mid-write never leaves a truncated file in place."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: say which and why
        raise RuntimeError(f"cannot read checkpoint {path}: {e}") from e


class RunLog:
    """Appends evaluation records to ``metrics.jsonl`` and per-step records to ``steps.csv``."""

    def __init__(self, out: Path):
        self.metrics_path = out / "metrics.jsonl"
        self.steps_path = out / "steps.csv"
        self.pending_steps: list[dict[str, Any]] = []

    def truncate_after(self, step: int) -> None:
        """Drop records of steps >= ``step`` (they will be produced again after a resume)."""
        if self.metrics_path.exists():
            keep = [line for line in self.metrics_path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] < step]
            atomic_write_bytes(self.metrics_path, "".join(line + "\n" for line in keep).encode())
        if self.steps_path.exists():
            with self.steps_path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) < step]
            self._write_steps(rows, mode="w")

    def add_step(self, record: dict[str, Any]) -> None:
        self.pending_steps.append(record)

    def flush_steps(self) -> None:
        if self.pending_steps:
            self._write_steps(self.pending_steps, mode="a")
            self.pending_steps = []

    def _write_steps(self, rows: Iterable[dict[str, Any]], mode: str) -> None:
        new_file = mode == "w" or not self.steps_path.exists()
        with self.steps_path.open(mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=STEP_FIELDS)
            if new_file:
                writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k) for k in STEP_FIELDS})

    def add_evaluation(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(_clean(record)) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The evaluation records of a run directory (or of a metrics.jsonl file)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_steps(path: str | Path) -> list[dict[str, Any]]:
    """The per-step records of a run directory, with numbers parsed."""
    path = Path(path)
    if path.is_dir():
        path = path / "steps.csv"
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
