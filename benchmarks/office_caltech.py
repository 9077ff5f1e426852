"""Real Office data on CPU: Office-Caltech10 features, every method x {none, gh, gh++} x seeds.

The stages are the sweep grids configs/benchmarks/office_caltech_stage1.yaml ... office_caltech_stage4.yaml
(described in configs/benchmarks/README.md); each runs on its own with ``gradharmony sweep``.  This
script runs them in order from the repository root, which the grids' paths are relative to; its
flags go to every ``gradharmony sweep`` (``--workers N``, ``--dry-run``, ``--retry-failed``) except
``--stage N`` (repeatable), which runs only the named stages:

    python benchmarks/office_caltech.py                 # every stage, resumable: the same command continues
    python benchmarks/office_caltech.py --dry-run       # each run and its status
    python benchmarks/office_caltech.py --stage 2       # stage 2 alone
    gradharmony report runs/office_caltech --out docs/office_caltech
"""

from __future__ import annotations

import sys

from stages import run_stages

if __name__ == "__main__":
    sys.exit(run_stages("office_caltech", sys.argv[1:]))
