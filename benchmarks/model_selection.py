"""Label-free model selection: which validator picks good checkpoints, and decides well whether GH should be on?

The stages are the sweep grids configs/benchmarks/model_selection_stage1.yaml ... _stage3.yaml
(described in configs/benchmarks/README.md): DANN, CDAN, MDD, MCC x {none, gh, gh++ with the
method's lead} x 3 seeds on real MNIST -> USPS and MNIST -> MNIST-M (stage 1) and on the 12
Office-Caltech10 SURF tasks (stages 2-3), every per-model validator scored at every evaluation and
the target predictions stored (for EnsV).  This script runs the stages in order from the repository
root, which the grids' paths are relative to (its other flags go to every ``gradharmony sweep``:
``--workers N``, ``--dry-run``, ``--retry-failed``), then summarises the runs, per task family
(``digits``, ``surf``) and over all of them, for every validator, MixVal's rank combination
(``mixval_rank``), EnsV, the last evaluation and the oracle, and ranks the candidates for the
default validator (label-free, no held-out source split needed) by mean regret:

* how many runs the validator could not score (no evaluation with a finite score: a diverged
  run, EnsV on a run with a single evaluation), left out of the other columns;
* mean target accuracy at the validator's pick among each run's evaluations, and the mean regret
  to the oracle (the best evaluation on target test labels), in points;
* how often the pick was the run's worst evaluation;
* Spearman's rank correlation between the validator's scores and the target accuracy across each
  run's evaluations (mean over runs);
* "GH on or off?": per task, method and seed the validator picks among every evaluation of the
  variants {none, gh, gh++}; how often its decision (GH on iff the pick is a GH run) is the
  oracle's.

    python benchmarks/model_selection.py                   # every stage (resumable), then the summary
    python benchmarks/model_selection.py --dry-run         # each run and its status
    python benchmarks/model_selection.py --summary-only    # the summary of the runs finished so far
    gradharmony report runs/model_selection --select all   # the per-task tables

The summary is printed and written to ``<out>/model_selection.md`` (default: the runs folder).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from stages import GRIDS, ROOT

from gradharmony.uda.cli import main as gradharmony
from gradharmony.uda.config import ConfigError
from gradharmony.uda.report import (
    collect,
    gh_decision_rows,
    selection_benchmark,
    selection_benchmark_markdown,
    task_families,
)
from gradharmony.uda.selection import LAST, ORACLE
from gradharmony.uda.validators import POOL_VALIDATORS, VALIDATORS

BENCHMARK = "model_selection"
RUNS = Path("runs") / BENCHMARK
#: Every selector the summary compares: the per-model validators, MixVal ranked over the pool, EnsV,
#: then the two references.
SELECTORS = [*VALIDATORS, *POOL_VALIDATORS, LAST, ORACLE]


#: The validators a default configuration can select by: label-free, and needing no held-out source
#: split (``source_val`` and ``dev`` need ``source_val_fraction > 0``, which changes what trains).
DEFAULT_CANDIDATES = ("entropy", "im", "bnm", "snd", "mixval", "mixval_rank", "ensv")


def default_ranking(rows: list[dict]) -> str:
    """The candidates for the default validator (:data:`DEFAULT_CANDIDATES`) among ``rows`` (of
    :func:`selection_benchmark`), by mean regret, then by how often they picked the worst, with
    ``last`` as the reference a validator has to beat."""
    by_name = {row["validator"]: row for row in rows}
    ranked = sorted(
        (
            by_name[name]
            for name in DEFAULT_CANDIDATES
            if name in by_name and not math.isnan(by_name[name]["mean_regret"])
        ),
        key=lambda row: (row["mean_regret"], row["worst_rate"]),
    )
    lines = [
        "| rank | validator | mean regret (points) | picked the worst | GH on/off same as oracle | runs |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for rank, row in enumerate(ranked, 1):
        lines.append(
            f"| {rank} | {row['validator']} | {row['mean_regret']:.2f} | {100 * row['worst_rate']:.0f}% | "
            f"{100 * row['gh_match_rate']:.0f}% | {row['runs']} |"
        )
    last = by_name.get(LAST)
    if last is not None and ranked:
        best = ranked[0]
        first = [
            r["validator"]
            for r in ranked
            if (r["mean_regret"], r["worst_rate"]) == (best["mean_regret"], best["worst_rate"])
        ]
        if len(first) > 1:
            named = f"the first-ranked validators, {', '.join(first[:-1])} and {first[-1]} (tied),"
            verdict = "beat" if best["mean_regret"] < last["mean_regret"] else "do not beat"
        else:
            named = f"the first-ranked validator, {best['validator']},"
            verdict = "beats" if best["mean_regret"] < last["mean_regret"] else "does not beat"
        lines += [
            "",
            f"Reference: `last` has a mean regret of {last['mean_regret']:.2f} and picked the worst in "
            f"{100 * last['worst_rate']:.0f}% of runs; {named} {verdict} it on mean regret.",
        ]
    return "\n".join(lines) + "\n"


def per_method_table(cells: dict, selectors: list[str]) -> str:
    """Validators x methods: each selector's mean regret and worst-pick share over one method's runs."""
    methods = sorted({method for _, method, _ in cells})
    by_method = {
        method: {row["validator"]: row for row in selection_benchmark(
            {key: cell for key, cell in cells.items() if key[1] == method}, selectors
        )}
        for method in methods
    }  # fmt: skip
    lines = [f"| validator | {' | '.join(methods)} |", "|---|" + "---:|" * len(methods)]
    for selector in selectors:
        cells_text = []
        for method in methods:
            row = by_method[method][selector]
            cells_text.append(
                "-" if math.isnan(row["mean_regret"]) else f"{row['mean_regret']:.2f} ({100 * row['worst_rate']:.0f}%)"
            )
        lines.append(f"| {selector} | {' | '.join(cells_text)} |")
    return "\n".join(lines) + "\n"


def always_on_note(cells: dict) -> str:
    """How often the oracle's decision is "GH on": the agreement of a validator that always says on."""
    decisions = gh_decision_rows(cells, ORACLE)
    total, on = sum(r["seeds"] for r in decisions), sum(r["oracle_on"] for r in decisions)
    if not total:
        return "No GH on/off decision: no task, method and seed has runs with GH on and off."
    return (
        f"The oracle's pick is a GH run in {on} of the {total} GH on/off decisions: always answering "
        f'"on" would agree with it in {100 * on / total:.0f}%, always "off" in {100 * (total - on) / total:.0f}%.'
    )


def validation_cost(cells: dict) -> str:
    """What scoring the validators cost in the finished runs of ``cells`` (of :func:`collect`): seconds
    per evaluation (``validate_seconds``), and their total against the training time of the steps
    before those evaluations (``seconds_per_step`` times the steps since the previous evaluation), a
    ratio of two timings taken in the same runs on the same machine."""
    pools = [pool for cell in cells.values() for pool in cell.pools.values()]
    validate = train = 0.0
    evaluations = 0
    for pool in pools:
        previous = 0
        for candidate in pool:
            if candidate.validate_seconds is not None and candidate.seconds_per_step is not None:
                validate += candidate.validate_seconds
                train += candidate.seconds_per_step * (candidate.step - previous)
                evaluations += 1
            previous = candidate.step
    if not evaluations or train <= 0:
        return "Validation cost: no timed evaluation among these runs."
    return (
        f"Validation cost: {validate / evaluations:.2f} s per evaluation on average ({evaluations} evaluations "
        f"of {len(pools)} runs), {100 * validate / train:.1f}% of the training time between evaluations; "
        "the test-set evaluation, which a run does anyway, is not counted."
    )


def summarize(runs: str | Path, out: str | Path | None = None) -> str:
    """The summary tables of the finished runs under ``runs`` (see the module's docstring), written
    to ``<out>/model_selection.md``; returns the text."""
    cells = collect(runs)
    stored = {name for cell in cells.values() for pool in cell.pools.values() for c in pool for name in c.scores}
    pooled = {"mixval_rank": "mixval" in stored, "ensv": True}
    selectors = [s for s in SELECTORS if s in stored or pooled.get(s) or s in (LAST, ORACLE)]
    cells = {key: cell for key, cell in cells.items() if cell.pools}  # a stage just begun has labels only
    if not cells:
        raise ConfigError(f"no finished run under {runs}")
    families = task_families({task for task, _, _ in cells})
    groups = [(f"the {len(tasks)} {family} tasks", tasks) for family, tasks in sorted(families.items())]
    if len(groups) > 1:
        groups.append(("all tasks", sorted(task for tasks in families.values() for task in tasks)))
    parts = [
        "## Label-free model selection",
        "",
        "Per run, each evaluation is a candidate checkpoint; a validator picks the one it scores highest "
        "(mixval_rank: the best mean of its ranks in MixVal's two probes over the candidates, as the MixVal paper "
        "combines them, where `mixval` averages the two raw scores; EnsV: the one agreeing most with the "
        "candidates' averaged predictions), `last` the last one, the "
        "oracle the most accurate on target test labels. Not scored = runs where the validator scored none "
        "of the evaluations (NaN: a diverged run; EnsV on a run with a single evaluation), left out of the "
        "other columns. Regret = oracle minus pick (points); picked the "
        "worst = share of runs where the pick was the run's least accurate evaluation; Spearman = rank "
        "correlation of the scores with target accuracy across a run's evaluations, mean over runs; GH "
        "on/off = per task, method and seed, the validator picks among every evaluation of the variants "
        "{none, gh, gh++}, and the decision (GH on iff the pick is a GH run) is compared with the oracle's.",
        "",
    ]
    for title, tasks in groups:
        chosen = {key: cell for key, cell in cells.items() if key[0] in tasks}
        rows = selection_benchmark(chosen, selectors)
        parts += [
            f"### Over {title}",
            "",
            selection_benchmark_markdown(rows),
            always_on_note(chosen),
            "",
            validation_cost(chosen),
            "",
            f"Per method, over {title}: mean regret in points (share of runs where the pick was the worst).",
            "",
            per_method_table(chosen, selectors),
        ]
    parts += [
        f"### Candidates for the default validator, over {groups[-1][0]}",
        "",
        "Label-free validators that need no held-out source split, ranked by mean regret, then by how "
        "often they picked the run's worst evaluation.",
        "",
        default_ranking(rows),
    ]
    text = "\n".join(parts)
    path = Path(out or runs) / f"{BENCHMARK}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    parser.add_argument("--summary-only", action="store_true", help="summarise the runs done so far; train nothing")
    parser.add_argument("--runs", type=Path, default=None, help=f"the runs folder (default: {RUNS}, the grids' out)")
    parser.add_argument("--out", type=Path, default=None, help="folder for model_selection.md (default: --runs)")
    parser.add_argument(
        "--grids",
        nargs="+",
        type=Path,
        default=None,
        help=f"the stage grids, in order (default: configs/benchmarks/{BENCHMARK}_stage*.yaml)",
    )
    args, sweep_flags = parser.parse_known_args(argv)
    if args.grids is None and args.runs is None:
        os.chdir(ROOT)  # the default grids and runs folder are relative to the repository root
    status = 0
    if not args.summary_only:
        grids = args.grids or sorted(p.relative_to(ROOT) for p in GRIDS.glob(f"{BENCHMARK}_stage*.yaml"))
        status = max(gradharmony(["sweep", str(grid), *sweep_flags]) for grid in grids)
        if "--dry-run" in sweep_flags:
            return status
    try:
        print(summarize(args.runs or RUNS, args.out))
    except ConfigError as error:  # nothing finished yet
        print(f"no summary: {error}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
