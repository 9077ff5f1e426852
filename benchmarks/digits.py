"""Accuracy benchmark on the paper's digit tasks: methods x {none, gh, gh++ (both leads), ...} x seeds.

The stages are the sweep grids configs/benchmarks/digits_stage1.yaml ... digits_stage5.yaml
(described in configs/benchmarks/README.md); each runs on its own with ``gradharmony sweep``.  This
script runs them in order from the repository root, which the grids' paths are relative to; its
flags go to every ``gradharmony sweep`` (``--workers N``, ``--dry-run``, ``--retry-failed``):

    python benchmarks/digits.py                 # every stage, resumable: the same command continues
    python benchmarks/digits.py --dry-run       # each run and its status
    gradharmony report runs/digits --out docs/digits
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from gradharmony.uda.cli import main

ROOT = Path(__file__).resolve().parent.parent
STAGES = sorted((ROOT / "configs" / "benchmarks").glob("digits_stage*.yaml"))

if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(max(main(["sweep", str(stage.relative_to(ROOT)), *sys.argv[1:]]) for stage in STAGES))
