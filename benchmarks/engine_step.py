"""Step time of the training engine: what a baseline pays for measuring the gradient geometry.

DANN with LeNet on MNIST -> MNIST-M (offline recipe, 32x32 RGB, batch 32 + 32), the demo's setting,
through ``gradharmony.uda.engine.Trainer.train_step`` (forward, backward, SGD step, step row, the
divergence guard).  Variants:

* ``none`` plain (``measure_every: 0``, the default in 0.2.0);
* ``none`` measured every 10th step (the digits and Office-Caltech10 grids);
* ``none`` measured on every step (what every baseline paid in 0.1.0);
* ``gh`` (recombine, the method's default scope).

Timings are interleaved round-robin over the variants in blocks of ``--steps`` steps and repeated;
the median ms per step of each variant is divided by that of plain ``none`` from the same run.  The
divergence guard (the finiteness check of every parameter and floating buffer after each step) is
also timed alone and given as a share of a plain step.

    python benchmarks/engine_step.py                       # prints a Markdown table
    python benchmarks/engine_step.py --repeats 3 --steps 20
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

from gradharmony.uda.config import TrainConfig
from gradharmony.uda.engine import Trainer, load_domains

VARIANTS = {
    "none, plain (measure_every 0)": {"harmonizer": "none"},
    "none, measured every 10th step": {"harmonizer": "none", "measure_every": 10},
    "none, measured on every step (0.1.0's baseline)": {"harmonizer": "none", "measure_every": 1},
    "gh (recombine)": {"harmonizer": "gh"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks per variant (default: 7)")
    parser.add_argument("--steps", type=int, default=30, help="steps per timed block (default: 30)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as out:
        base = TrainConfig(
            method="dann",
            source="mnist",
            target="mnistm-synth",
            backbone="lenet",
            image_size=32,
            channels=3,
            batch_size=32,
            steps=10_000,
            device="cpu",
            progress=False,
            out=out,
        )
        domains = load_domains(base)
        trainers = {
            name: Trainer(base.with_overrides({**values, "out": f"{out}/{i}"}), domains)
            for i, (name, values) in enumerate(VARIANTS.items())
        }
        for trainer in trainers.values():  # warm-up, untimed
            for _ in range(3):
                trainer.train_step()
        times: dict[str, list[float]] = {name: [] for name in trainers}
        guard: list[float] = []
        for _ in range(args.repeats):
            for name, trainer in trainers.items():
                started = time.perf_counter()
                for _ in range(args.steps):
                    trainer.train_step()
                times[name].append((time.perf_counter() - started) / args.steps * 1000)
            plain = trainers[next(iter(trainers))]
            started = time.perf_counter()
            for _ in range(args.steps):
                plain._all_finite(plain._model_tensors())
            guard.append((time.perf_counter() - started) / args.steps * 1000)

    medians = {name: statistics.median(values) for name, values in times.items()}
    reference = next(iter(medians.values()))
    print(
        f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s), "
        f"{args.repeats} x {args.steps} steps per variant\n"
    )
    print("| variant | ms / step | ratio to plain |")
    print("|---|---:|---:|")
    for name, value in medians.items():
        print(f"| {name} | {value:.1f} | {value / reference:.2f}x |")
    g = statistics.median(guard)
    print(f"\ndivergence guard alone: {g:.2f} ms per step ({100 * g / reference:.1f}% of a plain step)")


if __name__ == "__main__":
    main()
