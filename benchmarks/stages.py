"""Run a benchmark's stages in order: the sweep grids ``configs/benchmarks/<benchmark>_stage*.yaml``.

The helper of ``benchmarks/digits.py``, ``office_caltech.py`` and ``efficientnet_lite.py``: each stage
runs as ``gradharmony sweep <grid> ARGS`` from the repository root, which the grids' paths are
relative to.
"""

from __future__ import annotations

import os
from pathlib import Path

from gradharmony.uda.cli import main

ROOT = Path(__file__).resolve().parent.parent
GRIDS = ROOT / "configs" / "benchmarks"


#: ``gradharmony``'s exit status for an interrupted command (Ctrl-C, SIGTERM).
INTERRUPTED = 130


def run_stages(benchmark: str, args: list[str]) -> int:
    """Sweep every stage of ``benchmark`` with the flags ``args``; the highest exit status of the stages.

    An interrupted stage (Ctrl-C, SIGTERM) ends the sequence there: the stages after it do not start.
    """
    os.chdir(ROOT)
    status = 0
    for stage in sorted(GRIDS.glob(f"{benchmark}_stage*.yaml")):
        code = main(["sweep", str(stage.relative_to(ROOT)), *args])
        if code == INTERRUPTED:
            return code
        status = max(status, code)
    return status
