"""Tables from a folder of runs: mean +- std (last, label-free pick, best), paired GH-minus-baseline deltas.

A GH claim is a paired comparison: for each (task, method, variant) the per-seed difference to the
``none`` variant of the same task and method, on the seeds both have finished, with its mean, its
standard deviation, the number of seeds where the variant won, and a two-sided paired t-test.
Unfinished runs are listed as unfinished, never averaged in.  The runs are read through
:mod:`gradharmony.uda.runs` only.

Model selection (:mod:`gradharmony.uda.selection`): beside the last evaluation and the best one on
target test labels (``best*``, the oracle), the tables show the evaluation a label-free validator
picks (the runs' ``select_by``, or the one asked for), with its regret (oracle minus pick) and how
often it picked the run's worst evaluation; "GH on or off?" lets the validator choose among the
variants of each task, method and seed (every evaluation of every variant is a candidate) and
says whether the oracle would have chosen the same.
"""

from __future__ import annotations

import csv
import math
import statistics
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy import stats as scipy_stats

from gradharmony.uda.config import ConfigError
from gradharmony.uda.runs import METRICS_FILE, labelled_runs, read_metrics
from gradharmony.uda.selection import (
    LAST,
    ORACLE,
    Candidate,
    Outcome,
    candidates,
    check_selectors,
    ensv_pool_error,
    outcome,
    rank_correlation,
    resolve_select_by,
    scores_of,
)
from gradharmony.uda.validators import VALIDATORS

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
    pools: dict[int, list[Candidate]] = field(default_factory=dict)  # seed -> the run's evaluations
    select_by: dict[int, str | None] = field(default_factory=dict)  # seed -> the run's label-free validator


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
            for values in (
                cell.last,
                cell.best,
                cell.conflict_rate,
                cell.mean_angle,
                cell.unfinished,
                cell.pools,
                cell.select_by,
            ):
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
        cell.pools[seed] = candidates(folder, records)
        cell.select_by[seed] = resolve_select_by(records[-1].get("config") or {})
    return cells


# ---------------------------------------------------------------------------------------- model selection
def report_validator(cells: dict[tuple[str, str, str], Cell], requested: str | None = None) -> str | None:
    """The label-free validator of the default tables: ``requested``, else the one most runs name
    (:func:`~gradharmony.uda.selection.resolve_select_by`; ``None`` if no run computed one)."""
    if requested is not None:
        return requested
    counts = Counter(v for cell in cells.values() for v in cell.select_by.values() if v is not None)
    return counts.most_common(1)[0][0] if counts else None


def check_report_selectors(cells: dict[tuple[str, str, str], Cell], names: list[str]) -> list[str]:
    """``names`` if each is a selector that some finished run can be picked by, else a :class:`ConfigError`.

    ``all`` stands for every validator some run computed, MixVal's rank combination if some run
    computed ``mixval``, EnsV if runs stored predictions and one has at least 2 evaluations,
    ``last`` and ``oracle``.  EnsV asked for where every run has a
    single evaluation is an error; where only some have, those are left out of its picks ("-").
    """
    pools = [pool for cell in cells.values() for pool in cell.pools.values()]
    stored = {name for pool in pools for c in pool for name in c.scores}
    predictions = any(c.predictions for pool in pools for c in pool)
    ensv_pool = max(pools, key=len, default=[])  # EnsV scores pools of two candidates or more
    if "all" in names:
        mixval_rank = ["mixval_rank"] if "mixval" in stored else []
        ensv = ["ensv"] if predictions and len(ensv_pool) >= 2 else []
        names = [*(v for v in VALIDATORS if v in stored), *mixval_rank, *ensv, LAST, ORACLE]
    check_selectors(names)
    for name in names:
        if name in (LAST, ORACLE):
            continue
        if name == "mixval_rank":
            if "mixval" not in stored:
                raise ConfigError("no run computed the validator 'mixval', whose two probes mixval_rank ranks")
            continue
        if name == "ensv" and not predictions:
            raise ConfigError("no run stored target predictions (they are stored with validators): EnsV has no pool")
        if name == "ensv" and len(ensv_pool) < 2:
            raise ensv_pool_error(ensv_pool)
        if name != "ensv" and name not in stored:
            computed = ", ".join(sorted(stored)) or "none"
            raise ConfigError(f"no run computed the validator {name!r} (computed: {computed})")
    return names


def _outcomes(cell: Cell, selector: str) -> dict[int, Outcome]:
    """Per seed, what ``selector`` picks among the run's evaluations (seeds it scores none of are left out)."""
    found = {seed: outcome(pool, selector) for seed, pool in sorted(cell.pools.items())}
    return {seed: o for seed, o in found.items() if o is not None}


def _pick_summary(outcomes: dict[int, Outcome]) -> tuple[str, str, str]:
    """``(accuracy at the pick, mean regret, worst picks k/n)`` as table cells (percent)."""
    if not outcomes:
        return "-", "-", "-"
    accuracy = _mean_std([100 * o.accuracy for o in outcomes.values()])
    regret = f"{statistics.mean(100 * o.regret for o in outcomes.values()):.2f}"
    worst = f"{sum(o.picked_worst for o in outcomes.values())}/{len(outcomes)}"
    return accuracy, regret, worst


def selection_rows(cells: dict[tuple[str, str, str], Cell], selectors: list[str]) -> list[dict[str, Any]]:
    """Per task, method and variant: the accuracy at each selector's pick (mean +- std over seeds), its mean
    regret to the oracle and how many seeds it picked the run's worst evaluation."""
    rows = []
    for (task, method, variant), cell in _sorted_cells(cells):
        row: dict[str, Any] = {"task": task, "method": method, "variant": variant, "seeds": len(cell.pools)}
        for selector in selectors:
            row[selector], row[f"{selector}_regret"], row[f"{selector}_worst"] = _pick_summary(
                _outcomes(cell, selector)
            )
        rows.append(row)
    return rows


def selection_markdown(rows: list[dict[str, Any]], selectors: list[str]) -> str:
    """The table of :func:`selection_rows`: one column per selector, ``accuracy (regret r, worst k/n)``."""
    lines = [
        "### Model selection: target accuracy (%) at each validator's pick",
        "",
        "| task | method | variant | seeds | " + " | ".join(selectors) + " |",
        "|---|---|---|---:|" + "---:|" * len(selectors),
    ]
    for r in rows:
        cells = [
            r[s] if r[s] == "-" or s == ORACLE else f"{r[s]} (regret {r[f'{s}_regret']}, worst {r[f'{s}_worst']})"
            for s in selectors
        ]
        lines.append(f"| {r['task']} | {r['method']} | {r['variant']} | {r['seeds']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each run's evaluations are its candidates; a validator picks the one it scores highest (EnsV: the "
        "one agreeing most with the candidates' averaged predictions). Mean +- std over seeds; regret = "
        "oracle (best on target test labels) minus pick, in points; worst = seeds where the pick was the "
        "run's worst evaluation.",
        "",
    ]
    return "\n".join(lines)


def gh_decision_rows(cells: dict[tuple[str, str, str], Cell], selector: str) -> list[dict[str, Any]]:
    """ "GH on or off?" per task and method, decided by ``selector`` over the pool of every variant's evaluations.

    For each seed that has a ``none`` run and a GH run (harmonizer other than none), the candidates
    are every evaluation of every variant of that seed; the selector's pick decides "on" when it
    comes from a GH run.  The oracle decides the same way on target test accuracy.  A seed where the
    selector scores no candidate on one side (runs that did not compute it) is not decided: a pick
    from one side only would be no decision.
    """
    by_task: dict[tuple[str, str], dict[int, list[Candidate]]] = {}
    for (task, method, _), cell in _sorted_cells(cells):  # `none` first: the first of equal scores is GH off
        for seed, pool in cell.pools.items():
            by_task.setdefault((task, method), {}).setdefault(seed, []).extend(pool)
    rows = []
    for (task, method), pools in sorted(by_task.items()):
        decisions = []
        for seed, pool in sorted(pools.items()):
            if len({c.harmonizer == "none" for c in pool}) < 2:  # GH on and off both needed
                continue
            scores = None if selector in (LAST, ORACLE) else scores_of(pool, selector)  # EnsV reads files: once
            scored_sides = {c.harmonizer == "none" for c, s in zip(pool, scores or []) if math.isfinite(s)}
            if scores is not None and len(scored_sides) < 2:  # a pick from one side only is no decision
                continue
            picked, best = outcome(pool, selector, scores), outcome(pool, ORACLE)
            if picked is None or best is None:
                continue
            decisions.append((seed, picked, best))
        if not decisions:
            continue
        rows.append(
            {
                "task": task,
                "method": method,
                "seeds": len(decisions),
                "on": sum(p.harmonizer != "none" for _, p, _ in decisions),
                "oracle_on": sum(b.harmonizer != "none" for _, _, b in decisions),
                "agree": sum((p.harmonizer != "none") == (b.harmonizer != "none") for _, p, b in decisions),
                "regret": statistics.mean(100 * p.regret for _, p, _ in decisions),
            }
        )
    return rows


def gh_decision_markdown(rows: list[dict[str, Any]], selector: str) -> str:
    lines = [
        f"### GH on or off? Decided by {selector} over the pool of every variant's evaluations",
        "",
        f"| task | method | seeds | {selector}: GH on | oracle: GH on | same decision | regret (points) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        n = r["seeds"]
        lines.append(
            f"| {r['task']} | {r['method']} | {n} | {r['on']}/{n} | {r['oracle_on']}/{n} | {r['agree']}/{n} | "
            f"{r['regret']:.2f} |"
        )
    lines += [
        "",
        f"Per seed, the candidates are the evaluations of every variant (GH off: `none`; on: any harmonizer); "
        f"{selector} picks one without target labels, the oracle picks the most accurate on target test "
        f"labels. Regret = the oracle's accuracy minus that of {selector}'s pick, mean over seeds.",
        "",
    ]
    return "\n".join(lines)


def selection_benchmark(cells: dict[tuple[str, str, str], Cell], selectors: list[str]) -> list[dict[str, Any]]:
    """How well each selector chooses, over every finished run of ``cells``.

    Per selector: the runs it scored (``runs``) and those it could not (``not_scored``: no
    evaluation with a finite score, such as a diverged run's, or EnsV on a run with a single
    evaluation; they are left out of every other column), the mean target accuracy at its pick
    among each run's evaluations, the mean regret to the oracle, the share of runs where it picked
    the run's worst evaluation, the mean over runs of Spearman's rank correlation between its
    scores and the target accuracy of the run's evaluations, and the share of "GH on or off?"
    decisions (:func:`gh_decision_rows`) that match the oracle's.
    """
    total = sum(len(cell.pools) for cell in cells.values())
    rows = []
    for selector in selectors:
        outcomes = [o for cell in cells.values() for o in _outcomes(cell, selector).values()]
        correlations = [
            rank_correlation(pool, selector)
            for cell in cells.values()
            for pool in cell.pools.values()
            if selector not in (LAST, ORACLE)
        ]
        correlations = [c for c in correlations if math.isfinite(c)]
        decisions = gh_decision_rows(cells, selector)
        decided = sum(r["seeds"] for r in decisions)
        rows.append(
            {
                "validator": selector,
                "runs": len(outcomes),
                "not_scored": total - len(outcomes),
                "mean_acc": statistics.mean(100 * o.accuracy for o in outcomes) if outcomes else math.nan,
                "mean_regret": statistics.mean(100 * o.regret for o in outcomes) if outcomes else math.nan,
                "worst_rate": statistics.mean(o.picked_worst for o in outcomes) if outcomes else math.nan,
                "spearman": statistics.mean(correlations) if correlations else math.nan,
                "gh_decisions": decided,
                "gh_match_rate": sum(r["agree"] for r in decisions) / decided if decided else math.nan,
            }
        )
    return rows


def selection_benchmark_markdown(rows: list[dict[str, Any]]) -> str:
    def number(value: float, digits: int = 2, percent: bool = False) -> str:
        if math.isnan(value):
            return "-"
        return f"{100 * value:.0f}%" if percent else f"{value:.{digits}f}"

    lines = [
        "| validator | runs | not scored | mean acc at pick (%) | mean regret (points) | picked the worst | Spearman (mean over runs) | GH on/off decisions | same as oracle |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['validator']} | {r['runs']} | {r['not_scored']} | {number(r['mean_acc'])} | "
            f"{number(r['mean_regret'])} | "
            f"{number(r['worst_rate'], percent=True)} | {number(r['spearman'], 3)} | {r['gh_decisions']} | "
            f"{number(r['gh_match_rate'], percent=True)} |"
        )
    return "\n".join(lines) + "\n"


def _sorted_cells(cells: dict[tuple[str, str, str], Cell]) -> list[tuple[tuple[str, str, str], Cell]]:
    """Cells by task, method, then ``none`` first and the other variants by name."""
    return sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != BASELINE, kv[0][2]))


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


def table_rows(cells: dict[tuple[str, str, str], Cell], validator: str | None = None) -> list[dict[str, Any]]:
    """One row per task, method and variant; ``validator``: the label-free pick shown beside last and best*."""
    rows = []
    for (task, method, variant), cell in _sorted_cells(cells):
        baseline = cells.get((task, method, BASELINE))
        p_last, p_best = paired(cell, baseline, "last"), paired(cell, baseline, "best")
        pick, regret, worst = _pick_summary(_outcomes(cell, validator)) if validator else ("-", "-", "-")
        rows.append(
            {
                "task": task,
                "method": method,
                "variant": variant,
                "seeds": len(cell.last),
                "last": _mean_std(list(cell.last.values())),
                "pick": pick,
                "best": _mean_std(list(cell.best.values())),
                "regret": regret,
                "pick_worst": worst,
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


def markdown(rows: list[dict[str, Any]], validator: str | None = None) -> str:
    """The per-task tables; ``validator`` names the label-free pick column (``-`` throughout when ``None``)."""
    pick = f"pick: {validator} (%)" if validator else "label-free pick (%)"
    lines = []
    for task in dict.fromkeys(r["task"] for r in rows):
        lines += [
            f"### {task}",
            "",
            f"| method | variant | seeds | last (%) | {pick} | best* (oracle, %) | regret | picked worst | "
            "paired delta last | p | paired delta best* | p | conflict rate (%) | mean angle | unfinished |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in (r for r in rows if r["task"] == task):
            lines.append(
                f"| {r['method']} | {r['variant']} | {r['seeds']} | {r['last']} | {r['pick']} | {r['best']} | "
                f"{r['regret']} | {r['pick_worst']} | {r['delta_last']} | {_p(r['p_last'])} | {r['delta_best']} | "
                f"{_p(r['p_best'])} | {r['conflict_rate']} | {r['mean_angle']} | {r['unfinished']} |"
            )
        lines.append("")
    chosen = (
        f"pick = the evaluation that the label-free validator {validator} scores highest (no target labels); "
        f"regret = best* minus pick (points, mean over seeds); picked worst = seeds where the pick was the "
        f"run's worst evaluation. "
        if validator
        else "No run computed a label-free validator (validators: none, or runs of earlier versions). "
    )
    lines.append(
        "Mean +- std over seeds. *best = best over evaluations, selected on target test labels (what "
        f"the literature reports: the oracle). {chosen}Paired delta = variant minus `none` of the same "
        "method on the same seeds, mean +- std (seeds where the variant is higher); p = two-sided paired "
        "t-test. Conflict rate and mean angle: the raw gradients' geometry, measured before harmonization."
    )
    return "\n".join(lines) + "\n"


def write_report(
    root: str | Path,
    out_dir: str | Path | None = None,
    cells: dict[tuple[str, str, str], Cell] | None = None,
    select: list[str] | None = None,
) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.csv`` for the runs under ``root``; returns their paths.

    ``cells``: what :func:`collect` already read from ``root``, so that it is not read twice.
    ``select``: validators (and ``last``, ``oracle``, ``ensv``) whose picks get a table of their own;
    the first is also the label-free pick of the main tables (default: the runs' ``select_by``).
    Raises :class:`~gradharmony.uda.config.ConfigError` when ``root`` holds no run records, a
    selector is unknown or was computed by no run, or EnsV is asked for and every run has one
    evaluation: before anything is written.
    """
    root = Path(root)
    out_dir = Path(out_dir) if out_dir else root
    cells = collect(root) if cells is None else cells
    select = check_report_selectors(cells, list(select or []))
    label_free = [s for s in select if s not in (LAST, ORACLE)]
    validator = report_validator(cells, label_free[0] if label_free else None)
    rows = table_rows(cells, validator)
    text = markdown(rows, validator)
    if select:
        text += "\n" + selection_markdown(selection_rows(cells, select), select)
    for selector in label_free or ([validator] if validator else []):
        decisions = gh_decision_rows(cells, selector)
        if decisions:
            text += "\n" + gh_decision_markdown(decisions, selector)
    md, csv_path = out_dir / "report.md", out_dir / "report.csv"
    families = task_families({task for task, _, _ in cells})
    for family, tasks in sorted(families.items(), key=lambda kv: len(kv[1])):  # the largest ends on top
        if len(tasks) > 1:
            chosen = {key: cell for key, cell in cells.items() if key[0] in tasks}
            title = "all tasks" if family == "all" else f"the {len(tasks)} {family} tasks"
            text = summary_markdown(summary_rows(chosen, "last"), title=title) + "\n" + text
    out_dir.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["task"])
        writer.writeheader()
        writer.writerows(rows)
    return md, csv_path
