"""Accuracy benchmark on the paper's digit tasks: methods x {none, gh, gh++ (both leads), ...} x seeds.

The stages are the sweep grids configs/benchmarks/digits_stage1.yaml ... digits_stage5.yaml
(described in configs/benchmarks/README.md); each runs on its own with ``gradharmony sweep``.  This
script runs them in order from the repository root, which the grids' paths are relative to; its
flags go to every ``gradharmony sweep`` (``--workers N``, ``--dry-run``, ``--retry-failed``) except
``--stage N`` (repeatable), which runs only the named stages:

    python benchmarks/digits.py                 # every stage, resumable: the same command continues
    python benchmarks/digits.py --dry-run       # each run and its status
    python benchmarks/digits.py --stage 2       # stage 2 alone
    gradharmony report runs/digits --out docs/digits
"""

from __future__ import annotations

import sys

from stages import run_stages

if __name__ == "__main__":
    sys.exit(run_stages("digits", sys.argv[1:]))
