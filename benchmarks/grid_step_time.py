"""Step time of every variant of a sweep grid against plain training, measured in one run.

The runs of a grid record their own ``seconds_per_step``, but runs trained at different times share
the machine with different loads, so their ratios mix the variant's cost with the load's.  This
script builds one :class:`~gradharmony.uda.engine.Trainer` per variant of each (task, method) of the
grids (their first seed, the grid's own settings), adds plain training (the same run with
``harmonizer: none`` and ``measure_every: 0``), and times their training steps interleaved
round-robin in blocks of ``--steps`` steps, ``--repeats`` times, in one process.  Each variant's
median ms per step is divided by plain training's median from the same run.

    python benchmarks/grid_step_time.py configs/benchmarks/digits_parity_stage2.yaml \\
        configs/benchmarks/digits_parity_stage6.yaml                   # prints a Markdown table
    python benchmarks/grid_step_time.py GRID --repeats 3 --steps 10 --data-root DIR

A step is what the engine's ``train_step`` does: draw both batches, forward, backward (plain or
harmonized), optimiser and schedule step, the step row and the divergence guard; no evaluation.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import torch

from gradharmony.uda.config import ConfigError, TrainConfig
from gradharmony.uda.engine import Trainer, load_domains
from gradharmony.uda.sweep import expand, load_grid

PLAIN = "plain (harmonizer none, measure_every 0)"


def variants_by_cell(grid_paths: list[str], data_root: str | None) -> dict[tuple[str, str], dict[str, TrainConfig]]:
    """``(task, method) -> variant name -> config`` over the grids, first seed of each, plain first."""
    cells: dict[tuple[str, str], dict[str, TrainConfig]] = defaultdict(dict)
    for path in grid_paths:
        runs = expand(load_grid(path))
        first_seed = runs[0].seed
        for run in runs:
            if run.seed != first_seed:
                continue
            config = run.config.with_overrides({"data_root": data_root}) if data_root else run.config
            variants = cells[(run.task, run.method)]
            if not variants:
                variants[PLAIN] = config.with_overrides({"harmonizer": "none", "measure_every": 0})
            variants.setdefault(run.variant, config)
    return cells


def time_cell(variants: dict[str, TrainConfig], repeats: int, steps: int) -> dict[str, float]:
    """Median ms per training step of each variant, interleaved in blocks of ``steps`` steps.

    The variants share the datasets of the first one (a grid's variants change how a run trains,
    not its data).
    """
    with tempfile.TemporaryDirectory() as out:
        reference = next(iter(variants.values()))
        domains = load_domains(reference)
        trainers = {
            name: Trainer(config.with_overrides({"out": f"{out}/{i}"}), domains)
            for i, (name, config) in enumerate(variants.items())
        }
        for trainer in trainers.values():  # warm-up, untimed
            for _ in range(3):
                trainer.train_step()
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for _ in range(repeats):
            for name, trainer in trainers.items():
                started = time.perf_counter()
                for _ in range(steps):
                    trainer.train_step()
                times[name].append((time.perf_counter() - started) / steps * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("grids", nargs="+", help="sweep grid files (their variants are timed)")
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks per variant (default: 7)")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block (default: 20)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--data-root", help="read the datasets here instead of the grids' data_root")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        cells = variants_by_cell(args.grids, args.data_root)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s), "
        f"{args.repeats} x {args.steps} steps per variant\n"
    )
    print("| task | method | variant | ms / step | ratio to plain |")
    print("|---|---|---|---:|---:|")
    for (task, method), variants in cells.items():
        medians = time_cell(variants, args.repeats, args.steps)
        plain = medians[PLAIN]
        for name, value in medians.items():
            print(f"| {task} | {method} | {name} | {value:.1f} | {value / plain:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
