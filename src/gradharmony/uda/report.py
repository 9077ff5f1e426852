"""Tables from a folder of runs: mean +- std (last and best), paired GH-minus-baseline deltas.

A GH claim is a paired comparison: for each (task, method, variant) the per-seed difference to the
``none`` variant of the same task and method, on the seeds both have finished, with its mean, its
standard deviation, the number of seeds where the variant won, and a two-sided paired t-test.
Unfinished runs are listed as unfinished, never averaged in.  The runs are read through
:mod:`gradharmony.uda.runs` only.
"""

from __future__ import annotations

import csv
import math
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy import stats as scipy_stats

from gradharmony.uda.config import ConfigError
from gradharmony.uda.runs import METRICS_FILE, labelled_runs, read_metrics

BASELINE = "none"


@dataclass
class Cell:
    task: str
    method: str
    variant: str
    last: dict[int, float] = field(default_factory=dict)  # seed -> accuracy (%)
    best: dict[int, float] = field(default_factory=dict)
    conflict_rate: dict[int, float] = field(default_factory=dict)
    mean_angle: dict[int, float] = field(default_factory=dict)
    unfinished: dict[int, tuple[int, int | None]] = field(default_factory=dict)  # seed -> (step, steps)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} +- {statistics.stdev(values):.2f}"


def _run_means(records: list[dict[str, Any]], key: str) -> float:
    """Mean over a run's evaluation intervals of a harmonizer statistic (NaN-free)."""
    values = [r["harmonizer"].get(key) for r in records if r.get("harmonizer")]
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.mean(values) if values else math.nan


def collect(root: str | Path) -> dict[tuple[str, str, str], Cell]:
    """Every labelled run under ``root``, grouped into cells (task, method, variant) by seed.

    Two folders with the same labels (a grid changed a variant's config, so its runs got new
    folders next to the old ones) are reported with a warning; the later folder in name order counts.

    Raises:
        ConfigError: no labelled run folder under ``root`` holds an evaluation record
            (``metrics.jsonl``): there is nothing to report.
    """
    cells: dict[tuple[str, str, str], Cell] = {}
    seen: dict[tuple[str, str, str, int], Path] = {}
    runs = labelled_runs(root)
    if not any((folder / METRICS_FILE).is_file() for _, folder in runs):
        raise ConfigError(f"{root} holds no run records ({METRICS_FILE}); nothing to report")
    for labels, folder in runs:
        key = (labels["task"], labels["method"], labels["variant"])
        cell = cells.setdefault(key, Cell(*key))
        seed = int(labels["seed"])
        if (*key, seed) in seen:
            warnings.warn(
                f"{seen[(*key, seed)]} and {folder} are both labelled {key} seed {seed}; "
                f"reading {folder.name} only: move the other out of {root}",
                stacklevel=2,
            )
            for values in (cell.last, cell.best, cell.conflict_rate, cell.mean_angle, cell.unfinished):
                values.pop(seed, None)
        seen[(*key, seed)] = folder
        records = read_metrics(folder) if (folder / METRICS_FILE).exists() else []
        steps = records[-1]["config"]["steps"] if records else None
        if not records or records[-1]["step"] < steps:
            cell.unfinished[seed] = (records[-1]["step"] if records else 0, steps)
            continue
        cell.last[seed] = 100 * records[-1]["target_acc"]
        cell.best[seed] = 100 * records[-1]["best_target_acc"]
        cell.conflict_rate[seed] = 100 * _run_means(records, "conflict_rate")
        cell.mean_angle[seed] = _run_means(records, "mean_angle")
    return cells


@dataclass
class Paired:
    seeds: list[int]
    deltas: list[float]

    @property
    def summary(self) -> str:
        if not self.deltas:
            return "-"
        wins = sum(d > 0 for d in self.deltas)
        text = f"{statistics.mean(self.deltas):+.2f}"
        if len(self.deltas) > 1:
            text += f" +- {statistics.stdev(self.deltas):.2f}"
        return f"{text} ({wins}/{len(self.deltas)} up)"

    @property
    def p_value(self) -> float:
        if len(self.deltas) < 2 or statistics.pstdev(self.deltas) == 0:
            return math.nan
        return float(scipy_stats.ttest_1samp(self.deltas, 0.0).pvalue)


def paired(cell: Cell, baseline: Cell | None, which: str = "last") -> Paired:
    if baseline is None or baseline is cell:
        return Paired([], [])
    mine, base = getattr(cell, which), getattr(baseline, which)
    seeds = sorted(set(mine) & set(base))
    return Paired(seeds, [mine[s] - base[s] for s in seeds])


def table_rows(cells: dict[tuple[str, str, str], Cell]) -> list[dict[str, Any]]:
    rows = []
    for (task, method, variant), cell in sorted(
        cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != BASELINE, kv[0][2])
    ):
        baseline = cells.get((task, method, BASELINE))
        p_last, p_best = paired(cell, baseline, "last"), paired(cell, baseline, "best")
        rows.append(
            {
                "task": task,
                "method": method,
                "variant": variant,
                "seeds": len(cell.last),
                "last": _mean_std(list(cell.last.values())),
                "best": _mean_std(list(cell.best.values())),
                "delta_last": p_last.summary,
                "p_last": p_last.p_value,
                "delta_best": p_best.summary,
                "p_best": p_best.p_value,
                "conflict_rate": _mean_std([v for v in cell.conflict_rate.values() if math.isfinite(v)]),
                "mean_angle": _mean_std([v for v in cell.mean_angle.values() if math.isfinite(v)]),
                "unfinished": _unfinished(cell),
            }
        )
    return rows


def summary_rows(cells: dict[tuple[str, str, str], Cell], which: str = "last") -> list[dict[str, Any]]:
    """Each method x variant over the tasks: the benchmark's "average" column and paired deltas.

    A task counts when the variant and its ``none`` baseline share at least one seed; per task the
    delta is the mean paired delta over those seeds, and the tasks are the units of the test
    (two-sided Wilcoxon signed-rank on the per-task deltas, from 6 tasks on: seeds of one task are
    not independent evidence about the others).
    """
    rows = []
    pairs = sorted(
        {(method, variant) for _, method, variant in cells}, key=lambda mv: (mv[0], mv[1] != BASELINE, mv[1])
    )
    for method, variant in pairs:
        accuracy, baseline_accuracy, deltas = [], [], []
        for (task, m, v), cell in sorted(cells.items()):
            if (m, v) != (method, variant):
                continue
            if variant == BASELINE:
                values = list(getattr(cell, which).values())
                if values:
                    accuracy.append(statistics.mean(values))
                continue
            baseline = cells.get((task, method, BASELINE))
            result = paired(cell, baseline, which)
            if not result.seeds:
                continue
            accuracy.append(statistics.mean(getattr(cell, which)[s] for s in result.seeds))
            baseline_accuracy.append(statistics.mean(getattr(baseline, which)[s] for s in result.seeds))
            deltas.append(statistics.mean(result.deltas))
        if not accuracy:
            continue
        p_value = math.nan
        if len(deltas) >= 6 and any(d != 0 for d in deltas):
            p_value = float(scipy_stats.wilcoxon(deltas).pvalue)
        rows.append(
            {
                "method": method,
                "variant": variant,
                "tasks": len(accuracy),
                "mean_acc": statistics.mean(accuracy),
                "baseline_mean_acc": statistics.mean(baseline_accuracy) if baseline_accuracy else math.nan,
                "mean_delta": statistics.mean(deltas) if deltas else math.nan,
                "tasks_up": sum(d > 0 for d in deltas),
                "tasks_down": sum(d < 0 for d in deltas),
                "p": p_value,
            }
        )
    return rows


def task_families(tasks) -> dict[str, list[str]]:
    """Tasks grouped by the word before a space (``surf A->W``, ``decaf D->W``); otherwise one group."""
    families: dict[str, list[str]] = {}
    for task in sorted(tasks):
        families.setdefault(task.split(" ", 1)[0] if " " in task else "all", []).append(task)
    return families


def summary_markdown(rows: list[dict[str, Any]], which: str = "last", title: str = "all tasks") -> str:
    lines = [
        f"### Average over {title} ({which})",
        "",
        "| method | variant | tasks | mean acc (%) | same tasks, none (%) | mean paired delta | tasks up / down | p (Wilcoxon) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        delta = "-" if math.isnan(r["mean_delta"]) else f"{r['mean_delta']:+.2f}"
        base = "-" if math.isnan(r["baseline_mean_acc"]) else f"{r['baseline_mean_acc']:.2f}"
        updown = "-" if r["variant"] == BASELINE else f"{r['tasks_up']} / {r['tasks_down']}"
        lines.append(
            f"| {r['method']} | {r['variant']} | {r['tasks']} | {r['mean_acc']:.2f} | {base} | {delta} | "
            f"{updown} | {_p(r['p'])} |"
        )
    lines += [
        "",
        "Per task: the mean over the seeds shared with the method's `none` row; mean paired "
        "delta = mean over tasks of each task's mean paired delta; p: two-sided Wilcoxon signed-rank "
        "test over the tasks' deltas (from 6 tasks on).",
        "",
    ]
    return "\n".join(lines)


def variant_comparison_markdown(
    cells: dict[tuple[str, str, str], Cell], first: str, second: str, which: str = "last"
) -> str:
    """``first`` minus ``second`` per task and method, paired seed by seed (e.g. GH++'s two leads).

    The main tables pair every variant with ``none``; this pairs any two variants over the seeds
    both finished, with a two-sided paired t-test.
    """
    lines = [f"| task | method | {first} minus {second} ({which}, points) | p |", "|---|---|---:|---:|"]
    for task, method, variant in sorted(cells):
        other = cells.get((task, method, second))
        if variant != first or other is None:
            continue
        pair = paired(cells[(task, method, first)], other, which)
        lines.append(f"| {task} | {method} | {pair.summary} | {_p(pair.p_value)} |")
    if len(lines) == 2:
        raise ValueError(f"no method has both variants {first!r} and {second!r}")
    return "\n".join(lines)


def _unfinished(cell: Cell) -> str:
    """``not started: seeds 1, 2; seed 0 at step 1500/3000`` (steps of the last evaluation)."""
    waiting = sorted(seed for seed, (step, _) in cell.unfinished.items() if step == 0)
    parts = [f"not started: seed{'s' if len(waiting) > 1 else ''} {', '.join(map(str, waiting))}"] if waiting else []
    parts += [
        f"seed {seed} at step {step}/{steps}" for seed, (step, steps) in sorted(cell.unfinished.items()) if step > 0
    ]
    return "; ".join(parts)


def _p(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        lines += [
            f"### {task}",
            "",
            "| method | variant | seeds | last (%) | best* (%) | paired delta last | p | "
            "paired delta best* | p | conflict rate (%) | mean angle | unfinished |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in (r for r in rows if r["task"] == task):
            lines.append(
                f"| {r['method']} | {r['variant']} | {r['seeds']} | {r['last']} | {r['best']} | "
                f"{r['delta_last']} | {_p(r['p_last'])} | {r['delta_best']} | {_p(r['p_best'])} | "
                f"{r['conflict_rate']} | {r['mean_angle']} | {r['unfinished']} |"
            )
        lines.append("")
    lines.append(
        "Mean +- std over seeds. *best = best over evaluations, selected on target test labels (what "
        "the literature reports). Paired delta = variant minus `none` of the same method on the same "
        "seeds, mean +- std (seeds where the variant is higher); p = two-sided paired t-test. "
        "Conflict rate and mean angle: the raw gradients' geometry, measured before harmonization."
    )
    return "\n".join(lines) + "\n"


def write_report(
    root: str | Path, out_dir: str | Path | None = None, cells: dict[tuple[str, str, str], Cell] | None = None
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.csv`` for the runs under ``root``; returns their paths.

    ``cells``: what :func:`collect` already read from ``root``, so that it is not read twice.
    Raises :class:`~gradharmony.uda.config.ConfigError` (from :func:`collect`) when ``root`` holds
    no run records, before anything is written.
    """
    root = Path(root)
    out_dir = Path(out_dir) if out_dir else root
    cells = collect(root) if cells is None else cells
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = table_rows(cells)
    md, csv_path = out_dir / "report.md", out_dir / "report.csv"
    text = markdown(rows)
    families = task_families({task for task, _, _ in cells})
    for family, tasks in sorted(families.items(), key=lambda kv: len(kv[1])):  # the largest ends on top
        if len(tasks) > 1:
            chosen = {key: cell for key, cell in cells.items() if key[0] in tasks}
            title = "all tasks" if family == "all" else f"the {len(tasks)} {family} tasks"
            text = summary_markdown(summary_rows(chosen, "last"), title=title) + "\n" + text
    md.write_text(text)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["task"])
        writer.writeheader()
        writer.writerows(rows)
    return md, csv_path
