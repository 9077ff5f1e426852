"""Real Office data on CPU: Office-Caltech10 features, every method x {none, gh, gh++} x seeds.

SURF-800 bag-of-words for Amazon, Caltech, DSLR, Webcam (all 12 tasks) and DeCAF6 for
DSLR <-> Webcam, an MLP feature extractor (800 or 4096 -> 512), bottleneck 256, 1000 steps,
batch 32+32, SGD 0.01, evaluation every 250 steps on the whole target domain (the standard protocol
for this benchmark: no split).  Resumable, in stages, ``--workers`` processes of one thread each.

    python benchmarks/office_caltech.py run --workers 2
    python benchmarks/office_caltech.py report --out docs/office_caltech
    python benchmarks/office_caltech.py plan
"""

from __future__ import annotations

import itertools
from pathlib import Path

from gradharmony.sweep import staged_benchmark_main

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DOMAINS = {"A": "amazon", "C": "caltech", "D": "dslr", "W": "webcam"}
SURF_TASKS = {f"surf {s}->{t}": {"source": f"oc10-surf-{DOMAINS[s]}", "target": f"oc10-surf-{DOMAINS[t]}"}
              for s, t in itertools.permutations("ACDW", 2)}
DECAF_TASKS = {f"decaf {s}->{t}": {"source": f"oc10-decaf-{DOMAINS[s]}", "target": f"oc10-decaf-{DOMAINS[t]}"}
               for s, t in (("D", "W"), ("W", "D"))}
VARIANTS = {
    "none": {"harmonizer": "none", "refresh_every": 10},
    "gh": {"harmonizer": "gh"},
    "gh++": {"harmonizer": "gh++"},  # each method's own lead (the authors' choice per host)
}
BASE = {"backbone": "mlp", "bottleneck_dim": 256, "steps": 1000, "eval_every": 250, "batch_size": 32,
        "lr": 0.01, "source_eval_size": 0}
METHODS = ["dann", "cdan", "cdan+e", "mdd", "mcc"]


def stages(data_root: Path, out: Path) -> dict[int, dict]:
    def grid(tasks, methods, seeds):
        return {"out": str(out), "base": {**BASE, "data_root": str(data_root)}, "tasks": tasks,
                "methods": methods, "variants": VARIANTS, "seeds": seeds}

    return {
        1: grid({**SURF_TASKS, **DECAF_TASKS}, ["dann", "cdan"], [0, 1, 2]),
        2: grid({**SURF_TASKS, **DECAF_TASKS}, [m for m in METHODS if m not in ("dann", "cdan")], [0, 1, 2]),
    }


if __name__ == "__main__":
    staged_benchmark_main(__doc__, stages, ROOT / "runs" / "office_caltech", DEFAULT_DATA)
