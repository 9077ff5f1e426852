"""Digits at TLlib's own recipe: baselines against TLlib's published table, then GH/GH++ on top.

The stages are the sweep grids ``configs/benchmarks/digits_parity_stage*.yaml`` (see
configs/benchmarks/README.md); all write into ``runs/digits_parity``.

    python benchmarks/digits_parity.py run                 # every stage in order; resumable
    python benchmarks/digits_parity.py run --dry-run       # each run and its status
    python benchmarks/digits_parity.py run --stage 4       # one stage (repeatable)
    python benchmarks/digits_parity.py report              # tables on stdout and in docs/digits_parity/

``report`` prints three tables: parity (each baseline's target accuracy, last, best over the
evaluations, best at TLlib's epoch ends, beside TLlib's published number), GH on top (paired
deltas against ``none`` with the same seed, a paired t-test, the gradient geometry and the step
time), and the cheap scopes (step-time ratio to plain training from the runs' own timings, the
share of the full-scope paired delta each keeps, its paired delta against the full scope of the
same seed, and its mean weights).  Runs that have not finished are listed as unfinished.

A runs folder does not outlive the machine it was made on, and the stages take days of CPU time,
so ``report`` keeps the summary of every finished run (accuracies, curve, geometry, step times) in
``docs/digits_parity/runs.json``, committed with the report, and reads it back beside the runs
folder: the tables grow run by run across machines.  A finished run in the runs folder replaces its
archived summary; the archive keeps a finished run whose folder is unfinished or gone.  ``run``
passes the archive to ``gradharmony sweep --skip-archived``, so archived runs are not trained again.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from scipy import stats as scipy_stats
from stages import ROOT, run_stages

from gradharmony.uda.config import DEFAULT_SELECT_BY
from gradharmony.uda.runs import LABEL_KEYS, METRICS_FILE, atomic_write_bytes, json_safe, labelled_runs, read_metrics
from gradharmony.uda.selection import label_free_pick

RUNS = ROOT / "runs" / "digits_parity"
DOCS = ROOT / "docs" / "digits_parity"
#: TLlib's published digit table (its documentation before 2022): best epoch of 20 x 2500 iterations.
PUBLISHED = {
    "mnist->usps": {"source_only": 82.1, "dann": 91.7, "cdan": 96.0, "mcd": 94.1, "mdd": 94.8, "mcc": 95.1},
    "usps->mnist": {"source_only": 74.6, "dann": 95.2, "cdan": 97.7, "mcd": 97.6, "mdd": 97.8, "mcc": 94.6},
}
#: TLlib's own scripts run on this machine at the same budget, seed 0: DANN and CDAN from
#: ../shared/anchors.md; source only (erm.py), MDD, MCC and MCD measured for issue 11 (their .sh
#: digits lines with ``-i 500 --epochs 10``; for MCD the better of its two heads).
ANCHORS = {
    ("mnist->usps", "source_only"): "80.47 at 5000",
    ("mnist->usps", "dann"): "93.0 at 3000",
    ("mnist->usps", "cdan"): "94.52 at 5000",
    ("mnist->usps", "mdd"): "90.28 at 5000",
    ("mnist->usps", "mcc"): "94.17 at 5000",
    ("mnist->usps", "mcd"): "86.80 at 5000",
    ("usps->mnist", "source_only"): "75.87 at 5000",
    ("usps->mnist", "mcc"): "98.46 at 5000",
}
#: Beside report.md: every finished run's summary, so that the report outlives the runs folder.
ARCHIVE = "runs.json"
#: The summary's fields that may be null; the archive's other nulls are NaN.
TEXT_FIELDS = ("pick_by", "machine")
EPOCH = 2500  # TLlib's iterations per epoch: its protocol keeps the best epoch-end evaluation
BASELINE = "none"
#: The cheap-scope table gives the share of the full-scope delta only where that delta's p is below this.
SIGNIFICANCE = 0.05
#: A cheap-scope variant is named ``<full variant>@<scope>`` (``gh++@heads``): the same
#: harmonizer as ``<full variant>`` over a cheaper scope, strategy or refresh interval.
SCOPE_MARK = "@"


def summarize_runs(root: Path) -> dict[str, tuple[dict, dict]]:
    """``folder name -> (labels, summary)`` of every labelled run under ``root``.

    A finished run's summary holds ``last``, ``best`` (over evaluations), ``epoch_best`` (over the
    evaluations at multiples of 2500 steps), ``pick`` (at the run's label-free validator's pick,
    ``pick_by``; NaN for a run that computed none), the time per step of its fastest evaluation
    interval by the wall clock and by CPU time (NaN where a record lacks it: runs from before the CPU
    clock), geometry means, its ``curve`` (``[step, accuracy]`` per evaluation) and the ``machine`` it
    trained on (``None`` for records from before the field; machines joined by ``" + "`` for a run
    resumed on another); an unfinished run's has ``unfinished = (step, steps)`` only.
    """
    summaries = {}
    for labels, folder in labelled_runs(root):
        records = read_metrics(folder) if (folder / METRICS_FILE).is_file() else []
        steps = records[-1]["config"]["steps"] if records else None
        if not records or records[-1]["step"] < steps:
            summaries[folder.name] = (labels, {"unfinished": (records[-1]["step"] if records else 0, steps)})
            continue
        accuracy = [100 * r["target_acc"] for r in records]
        at_epochs = [100 * r["target_acc"] for r in records if r["step"] % EPOCH == 0]
        picked = label_free_pick(records, records[-1]["config"])  # None: the run computed no validator
        summaries[folder.name] = (
            labels,
            {
                "pick": 100 * picked["target_acc"] if picked else math.nan,
                "pick_by": picked["validator"] if picked else None,
                "last": accuracy[-1],
                "best": max(accuracy),
                "epoch_best": max(at_epochs) if at_epochs else math.nan,
                "fastest_seconds_per_step": min(r["seconds_per_step"] for r in records),
                "fastest_cpu_seconds_per_step": _fastest(r.get("cpu_seconds_per_step") for r in records),
                "conflict_rate": _mean(r["harmonizer"].get("conflict_rate") for r in records),
                "mean_angle": _mean(r["harmonizer"].get("mean_angle") for r in records),
                "mean_w_align": _mean(r["harmonizer"].get("mean_w_align") for r in records),
                "mean_w_cls": _mean(r["harmonizer"].get("mean_w_cls") for r in records),
                "curve": [[r["step"], round(a, 4)] for r, a in zip(records, accuracy, strict=True)],
                "machine": _machine(records),
            },
        )
    return summaries


class ArchiveError(ValueError):
    """The archive of run summaries cannot be read."""


def read_archive(path: Path) -> dict[str, tuple[dict, dict]]:
    """The finished runs' summaries kept in ``path`` (``{}`` if there is none): the same shape as
    :func:`summarize_runs`, so that a report outlives the runs folder it was made from."""
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text())
        return {
            name: (
                {key: entry["labels"][key] for key in LABEL_KEYS},
                {
                    key: (math.nan if value is None and key not in TEXT_FIELDS else value)
                    for key, value in entry["summary"].items()
                },
            )
            for name, entry in entries.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ArchiveError(f"{path} is not an archive of run summaries ({type(error).__name__}: {error})") from None


def write_archive(path: Path, summaries: dict[str, tuple[dict, dict]]) -> None:
    """Keep the finished runs of ``summaries`` in ``path``: JSON, one line per run folder (NaN as null)."""
    entries = {
        name: json_safe({"labels": labels, "summary": summary})
        for name, (labels, summary) in sorted(summaries.items())
        if "unfinished" not in summary
    }
    lines = ",\n".join(f" {json.dumps(name)}: {json.dumps(entry, sort_keys=True)}" for name, entry in entries.items())
    atomic_write_bytes(path, ("{\n" + lines + "\n}\n" if entries else "{}\n").encode())


def merge_summaries(archived: dict, current: dict) -> dict[str, tuple[dict, dict]]:
    """The archive's runs, updated by the runs folder's: a finished run there replaces its archived
    summary; an unfinished one never replaces a finished one (a run started again in a fresh runs
    folder)."""
    merged = dict(archived)
    for name, entry in current.items():
        if "unfinished" in entry[1] and name in merged:
            continue  # the archive holds it finished
        merged[name] = entry
    return merged


def cells_of(summaries: dict[str, tuple[dict, dict]]) -> dict[tuple[str, str, str], dict[int, dict]]:
    """``(task, method, variant) -> seed -> summary``; a finished run wins over an unfinished one
    with the same labels (a folder left by a changed grid)."""
    cells: dict[tuple[str, str, str], dict[int, dict]] = defaultdict(dict)
    for _, (labels, summary) in sorted(summaries.items()):
        key, seed = (labels["task"], labels["method"], labels["variant"]), int(labels["seed"])
        if "unfinished" in summary:
            previous = cells[key].get(seed)
            if previous is None or ("unfinished" in previous and previous["unfinished"][0] < summary["unfinished"][0]):
                cells[key][seed] = summary
            continue
        cells[key][seed] = summary
    return cells


def _machine(records: list[dict]) -> str | None:
    """The machines of ``records`` in a line: CPU, kernel level, torch, threads, device."""
    seen = []
    for record in records:
        machine = record.get("machine")
        if machine is None:
            continue
        text = (
            f"{machine['cpu']}, {machine['cpu_capability']}, torch {machine['torch']}, "
            f"{machine['threads']} thread(s), {machine['device']}"
        )
        if text not in seen:
            seen.append(text)
    return " + ".join(seen) or None


def same_machine_pairs(cells, task: str, method: str, variant: str) -> str:
    """How many of the finished seed pairs of ``variant`` and ``none`` trained on one machine."""
    runs = _finished(cells.get((task, method, variant), {}))
    reference = _finished(cells.get((task, method, BASELINE), {}))
    pairs = [(runs[s].get("machine"), reference[s].get("machine")) for s in runs.keys() & reference.keys()]
    if not pairs:
        return "-"
    same = sum(a is not None and a == b and " + " not in a for a, b in pairs)
    unknown = sum(a is None or b is None for a, b in pairs)
    return f"{same}/{len(pairs)}" + (f" ({unknown} unrecorded)" if unknown else "")


def _fastest(values) -> float:
    """The smallest of ``values``; NaN if any is missing."""
    values = list(values)
    return math.nan if not values or any(v is None for v in values) else min(values)


def step_time_ratio(variant_runs: dict[int, dict], plain_runs: dict[int, dict]) -> str:
    """Seconds per step of a variant over plain training's, each its fastest interval over its seeds.

    Contention only adds time, so the fastest 500-step interval of any seed is the best estimate
    of a variant's own cost when its runs shared the machine with other jobs at other times.  CPU
    time where every run has it (it barely moves under such contention), else the wall clock.
    """
    if not variant_runs or not plain_runs:
        return "-"
    runs = [*variant_runs.values(), *plain_runs.values()]
    clock = "cpu" if all(not math.isnan(r["fastest_cpu_seconds_per_step"]) for r in runs) else "wall"
    key = "fastest_cpu_seconds_per_step" if clock == "cpu" else "fastest_seconds_per_step"
    ratio = min(r[key] for r in variant_runs.values()) / min(r[key] for r in plain_runs.values())
    return f"{ratio:.2f} ({clock})"


def _mean(values) -> float:
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else math.nan


def _finished(runs: dict[int, dict]) -> dict[int, dict]:
    return {seed: run for seed, run in runs.items() if "unfinished" not in run}


def _mean_std(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    text = f"{statistics.mean(values):.{digits}f}"
    return text + (f" +- {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def _unfinished_note(runs: dict[int, dict]) -> str:
    waiting = sorted((seed, run["unfinished"]) for seed, run in runs.items() if "unfinished" in run)
    return ", ".join(
        f"seed {seed} at step {step} of {steps}" if steps else f"seed {seed} not started"
        for seed, (step, steps) in waiting
    )


def parity_table(cells) -> str:
    lines = [
        "| task | method | seeds | last | label-free pick (validator, seeds) | best (every 500)* "
        "| best at epoch ends (TLlib)* | TLlib published | ours (epoch ends) - published | TLlib script here "
        "| unfinished |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, method, variant), runs in sorted(cells.items()):
        if variant != BASELINE:
            continue
        done = _finished(runs)
        published = PUBLISHED.get(task, {}).get(method)
        epoch_best = [run["epoch_best"] for run in done.values() if not math.isnan(run["epoch_best"])]
        gap = f"{statistics.mean(epoch_best) - published:+.2f}" if epoch_best and published is not None else "-"
        picks = [run for run in done.values() if not math.isnan(run["pick"])]
        by = sorted({run["pick_by"] for run in picks})
        pick = f"{_mean_std([r['pick'] for r in picks])} ({', '.join(by)}, {len(picks)})" if picks else "-"
        lines.append(
            f"| {task} | {method} | {len(done)} | {_mean_std([r['last'] for r in done.values()])} | {pick} "
            f"| {_mean_std([r['best'] for r in done.values()])} | {_mean_std(epoch_best)} "
            f"| {published if published is not None else '-'} | {gap} | {ANCHORS.get((task, method), '-')} "
            f"| {_unfinished_note(runs) or '-'} |"
        )
    lines += [
        "",
        "*selected on target test labels. The label-free pick is the evaluation the run's own validator "
        f"(its `select_by`; else the default, {DEFAULT_SELECT_BY}, where computed, else its first validator) scores "
        "highest, without target labels. Runs trained before the validators existed have none, hence its own seed count; "
        "runs resumed after they arrived are picked among their later evaluations only.",
    ]
    return "\n".join(lines)


def paired_deltas(
    cells, task: str, method: str, variant: str, which: str = "last", baseline: str = BASELINE
) -> dict[int, float]:
    """Seed -> accuracy of ``variant`` minus ``baseline`` with the same seed (finished pairs only)."""
    runs = _finished(cells.get((task, method, variant), {}))
    reference = _finished(cells.get((task, method, baseline), {}))
    return {seed: runs[seed][which] - reference[seed][which] for seed in sorted(runs.keys() & reference.keys())}


def _paired_summary(deltas: list[float]) -> tuple[str, str]:
    if not deltas:
        return "-", "-"
    text = f"{statistics.mean(deltas):+.2f}" + (f" +- {statistics.stdev(deltas):.2f}" if len(deltas) > 1 else "")
    text += f" ({sum(d > 0 for d in deltas)}/{len(deltas)} up)"
    p = _paired_p(deltas)
    return text, "-" if p is None else f"{p:.3f}"


def _paired_p(deltas: list[float]) -> float | None:
    """The two-sided paired t-test's p of ``deltas`` against zero (``None`` when it is undefined)."""
    if len(deltas) < 2 or statistics.pstdev(deltas) == 0:
        return None
    return float(scipy_stats.ttest_1samp(deltas, 0.0).pvalue)


def gh_table(cells) -> str:
    lines = [
        "| task | method | variant | seeds | last | paired delta, last | p | paired delta, best | p "
        "| conflict rate % | mean angle | mean w_align | mean w_cls | step time / none (fastest interval) "
        "| pairs on one machine | unfinished |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    harmonized = {(t, m) for t, m, v in cells if v != BASELINE and SCOPE_MARK not in v}
    for (task, method, variant), runs in sorted(cells.items()):
        if (task, method) not in harmonized or SCOPE_MARK in variant:
            continue
        done = _finished(runs)
        last_delta, last_p = _paired_summary(list(paired_deltas(cells, task, method, variant).values()))
        best_delta, best_p = _paired_summary(list(paired_deltas(cells, task, method, variant, "best").values()))
        step_time = step_time_ratio(done, _finished(cells.get((task, method, BASELINE), {})))
        machines = same_machine_pairs(cells, task, method, variant)
        if variant == BASELINE:
            last_delta = last_p = best_delta = best_p = step_time = machines = "(baseline)"
        geometry = [
            _mean_std([100 * r["conflict_rate"] for r in done.values()], 1),
            _mean_std([r["mean_angle"] for r in done.values()], 1),
            _mean_std([r["mean_w_align"] for r in done.values()], 3),
            _mean_std([r["mean_w_cls"] for r in done.values()], 3),
        ]
        lines.append(
            f"| {task} | {method} | {variant} | {len(done)} | {_mean_std([r['last'] for r in done.values()])} "
            f"| {last_delta} | {last_p} | {best_delta} | {best_p} | {' | '.join(geometry)} | {step_time} "
            f"| {machines} | {_unfinished_note(runs) or '-'} |"
        )
    lines += [
        "",
        "The step time is the runs' own, as in the cheap-scope table below: the fastest 500-step interval "
        "over all seeds of the variant, over the same for `none`. A run repeats bit for bit on the same machine "
        'and software, and differs on another as a new seed would: "pairs on one machine" counts the seed '
        "pairs whose two runs trained on one (records before 2026-12-02 do not name theirs: unrecorded).",
    ]
    return "\n".join(lines)


def scope_table(cells) -> str:
    """Each cheap scope against plain training (time) and against the full scope (effect)."""
    lines = [
        "| task | method | variant | seeds | step time / plain (fastest interval) | paired delta, last "
        "| share of the full-scope delta "
        "| minus the full scope, last | p | mean w_align | mean w_cls | unfinished |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (task, method, variant), runs in sorted(cells.items()):
        if SCOPE_MARK not in variant:
            continue
        done = _finished(runs)
        full_variant = variant.split(SCOPE_MARK)[0]
        plain = _finished(cells.get((task, method, BASELINE), {}))
        deltas = paired_deltas(cells, task, method, variant)
        full = paired_deltas(cells, task, method, full_variant)
        common = sorted(deltas.keys() & full.keys())
        full_mean = statistics.mean(full[s] for s in common) if common else math.nan
        full_p = _paired_p(list(full.values()))
        if not common:
            share = "-"
        elif full_p is None or full_p >= SIGNIFICANCE:  # a ratio to a delta indistinguishable from zero means nothing
            share = "no full-scope effect"
        elif abs(full_mean) <= 1e-9:
            share = "-"
        else:
            share = f"{statistics.mean(deltas[s] for s in common) / full_mean:.2f}"
        against_full, against_full_p = _paired_summary(
            list(paired_deltas(cells, task, method, variant, baseline=full_variant).values())
        )
        weights = [_mean_std([r[key] for r in done.values()], 3) for key in ("mean_w_align", "mean_w_cls")]
        lines.append(
            f"| {task} | {method} | {variant} | {len(done)} | {step_time_ratio(done, plain)} "
            f"| {_paired_summary(list(deltas.values()))[0]} | {share} | {against_full} | {against_full_p} "
            f"| {' | '.join(weights)} | {_unfinished_note(runs) or '-'} |"
        )
    lines += [
        "",
        "The step-time ratio is the runs' own: the seconds per step of the variant's fastest 500-step "
        "interval over all its seeds, over the same for the `none` runs (which measure the geometry every 10th "
        "step). Other jobs sharing the machine only add time, so the fastest interval is the least disturbed; "
        "by CPU time (`cpu`) where every run records it, else by the wall clock (`wall`), which other loads "
        "still inflate. For a ratio measured in one run against plain training: `python benchmarks/grid_step_time.py "
        "configs/benchmarks/digits_parity_stage2.yaml configs/benchmarks/digits_parity_stage6.yaml`. "
        "The share of the full-scope delta is given only where that delta is significant (paired t-test, "
        f"p < {SIGNIFICANCE}, over the full scope's seeds).",
    ]
    return "\n".join(lines)


def report(root: Path, out: Path | None) -> str:
    """The three tables of the runs under ``root``, with ``out/runs.json``'s archived runs.

    With ``out``, write ``out/report.md`` and keep every finished run's summary in ``out/runs.json``:
    a runs folder does not outlive its machine, the archive is committed with the report.
    """
    summaries = summarize_runs(root) if root.is_dir() else {}
    if out is not None:
        summaries = merge_summaries(read_archive(out / ARCHIVE), summaries)
    cells = cells_of(summaries)
    text = (
        f"# Digits at TLlib's recipe\n\nRuns: `{root.relative_to(ROOT) if root.is_relative_to(ROOT) else root}`"
        + (f" and the archive of finished runs `{ARCHIVE}` beside this file" if out is not None else "")
        + ". Accuracies in %, mean +- standard deviation over seeds.\n\n"
        f"## Parity\n\n{parity_table(cells)}\n\n## GH and GH++ on top\n\n{gh_table(cells)}\n\n"
        f"## Cheap exact scopes\n\n{scope_table(cells)}\n"
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_archive(out / ARCHIVE, summaries)
        (out / "report.md").write_text(text)
    return text


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "run",
        add_help=False,  # run --help lists the stages and their flags (benchmarks/stages.py)
        help="sweep every stage in order, or those named by --stage N (other flags go to gradharmony sweep)",
    )
    report_parser = commands.add_parser("report", help="print the tables and write them to --out")
    report_parser.add_argument("--runs", type=Path, default=RUNS, help="the runs folder (default runs/digits_parity)")
    report_parser.add_argument(
        "--out", type=Path, default=DOCS, help="folder for report.md (default docs/digits_parity)"
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "run":
        if (DOCS / ARCHIVE).is_file() and "--skip-archived" not in rest:
            rest = [*rest, "--skip-archived", str(DOCS / ARCHIVE)]  # finished on another machine: not again
        return run_stages("digits_parity", rest, prog="python benchmarks/digits_parity.py run")
    if rest:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if not args.runs.is_dir() and not (args.out / ARCHIVE).is_file():
        print(
            f"error: no runs folder {args.runs} and no archive {args.out / ARCHIVE}: run the stages first",
            file=sys.stderr,
        )
        return 2
    try:
        print(report(args.runs, args.out))
    except ArchiveError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
