"""The image path end to end on CPU: EfficientNet-Lite0 with its ImageNet weights on an offline pair.

The stages are the sweep grids configs/benchmarks/efficientnet_lite_stage1.yaml ... efficientnet_lite_stage4.yaml
(described in configs/benchmarks/README.md); each runs on its own with ``gradharmony sweep``.  This
script runs them in order from the repository root, which the grids' paths are relative to; its
flags go to every ``gradharmony sweep`` (``--workers N``, ``--dry-run``, ``--retry-failed``) except
``--stage N`` (repeatable), which runs only the named stages:

    python benchmarks/efficientnet_lite.py                 # every stage, resumable: the same command continues
    python benchmarks/efficientnet_lite.py --dry-run       # each run and its status
    python benchmarks/efficientnet_lite.py --stage 2       # stage 2 alone
    gradharmony report runs/efficientnet_lite --out docs/efficientnet_lite
"""

from __future__ import annotations

import sys

from stages import run_stages

if __name__ == "__main__":
    sys.exit(run_stages("efficientnet_lite", sys.argv[1:]))
