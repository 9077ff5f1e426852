"""Run a benchmark's stages in order: the sweep grids ``configs/benchmarks/<benchmark>_stage*.yaml``.

The helper of ``benchmarks/digits.py``, ``digits_parity.py run``, ``office_caltech.py`` and
``efficientnet_lite.py``: each stage runs as ``gradharmony sweep <grid> ARGS`` from the repository
root, which the grids' paths are relative to.  ``--stage N`` (repeatable) runs only the named
stages, in order; ``--help`` lists the stages:

    python benchmarks/digits_parity.py run --stage 4 --workers 1
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from gradharmony.uda.cli import main

ROOT = Path(__file__).resolve().parent.parent
GRIDS = ROOT / "configs" / "benchmarks"


#: ``gradharmony``'s exit status for an interrupted command (Ctrl-C, SIGTERM).
INTERRUPTED = 130


def stage_number(grid: Path) -> int:
    """The ``N`` of ``<benchmark>_stageN.yaml``."""
    return int(re.search(r"_stage(\d+)\.yaml$", grid.name).group(1))


def run_stages(benchmark: str, args: list[str], prog: str | None = None) -> int:
    """Sweep the stages of ``benchmark`` with the flags ``args``; the highest exit status of the stages.

    ``args`` may name stages with ``--stage N`` (repeatable; default: every stage); the other flags
    go to ``gradharmony sweep``.  A stage that does not exist is one line and exit status 2, before
    anything runs.  An interrupted stage (Ctrl-C, SIGTERM) ends the sequence there: the stages after
    it do not start.  ``--help`` lists the stages and the flags; ``prog`` names the command in it
    (default ``python benchmarks/<benchmark>.py``).
    """
    grids = dict(sorted((stage_number(grid), grid) for grid in GRIDS.glob(f"{benchmark}_stage*.yaml")))
    stage_list = "\n".join(f"  {number:>2}  {grid.relative_to(ROOT)}" for number, grid in grids.items())
    parser = argparse.ArgumentParser(
        prog=prog or f"python benchmarks/{benchmark}.py",
        usage="%(prog)s [--stage N ...] [gradharmony sweep flags]",
        description=f"Sweep the stages of {benchmark} in order, resuming where they stopped. Its stages:\n"
        + stage_list,
        epilog="Every other flag goes to `gradharmony sweep` for each stage: --workers N, --dry-run,\n"
        "--retry-failed, --skip-archived JSON, --launcher ... (see `gradharmony sweep --help`).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--stage", type=int, action="append", default=[], metavar="N", help="run stage N only (repeatable)"
    )
    chosen, args = parser.parse_known_args(args)
    missing = sorted(set(chosen.stage) - grids.keys())
    if missing:
        known = ", ".join(map(str, grids))
        print(f"error: {benchmark} has no stage {missing[0]} (its stages: {known})", file=sys.stderr)
        return 2
    os.chdir(ROOT)
    status = 0
    for number in sorted(set(chosen.stage)) or grids:
        stage = grids[number]
        code = main(["sweep", str(stage.relative_to(ROOT)), *args])
        if code == INTERRUPTED:
            return code
        status = max(status, code)
    return status
