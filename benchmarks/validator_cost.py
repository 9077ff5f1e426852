"""What each label-free validator costs at an evaluation, in training steps of the same run.

DANN with LeNet on MNIST -> MNIST-M (offline recipe, 32x32 RGB, batch 32 + 32; the embedded data,
so it runs anywhere), 1000 target-train samples scored and 10% of the source training split held
out, as in the model-selection benchmark.  The model is trained for ``--warmup`` steps first, so
its predictions are not those of a random initialisation (MixVal's and DEV's work depends on them).

Each validator is timed alone through ``gradharmony.uda.engine.validation.validate`` (the code a run
calls at every evaluation), interleaved round-robin with the others and with a bare pass (the
forward and softmax of the scored samples, which every set of validators pays
once); the median of ``--repeats`` is given in seconds and in training steps of the same trainer,
timed in the same loop, and so is the pass of every validator together.

    python benchmarks/validator_cost.py                    # prints a Markdown table
    python benchmarks/validator_cost.py --repeats 3 --source mnist --target mnistm --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from gradharmony.uda.demo import demo_config
from gradharmony.uda.engine import Trainer
from gradharmony.uda.engine.validation import validate
from gradharmony.uda.validators import VALIDATORS

BARE = "bare pass (forward and softmax of the scored samples)"
ALL = "every validator together"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per validator (default: 5)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed block (default: 20)")
    parser.add_argument("--warmup", type=int, default=200, help="training steps before timing (default: 200)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--source", default="mnist")
    parser.add_argument("--target", default="mnistm-synth")
    parser.add_argument("--data-root", default=None, help="where the digit data lies (default: the embedded data)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as out:
        # the demo's run (DANN, LeNet, batch 32 + 32), plain, with every validator
        config = demo_config("none", Path(out), steps=100_000, seed=0, data_root=args.data_root)
        trainer = Trainer(
            config.with_overrides(
                {
                    "source": args.source,
                    "target": args.target,
                    "measure_every": 0,
                    "validators": list(VALIDATORS),
                    "source_val_fraction": 0.1,
                    "source_val_size": 1000,
                    "target_val_size": 1000,
                }
            )
        )
        for _ in range(args.warmup):
            trainer.train_step()
        passes = {BARE: replace(trainer.validation, validators=())}
        passes |= {name: replace(trainer.validation, validators=(name,)) for name in VALIDATORS}
        passes[ALL] = trainer.validation
        seconds: dict[str, list[float]] = {name: [] for name in passes}
        step_seconds: list[float] = []
        for _ in range(args.repeats):
            for name, validation in passes.items():
                seconds[name].append(validate(trainer.model, validation, trainer.device).seconds)
            started = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step()
            step_seconds.append((time.perf_counter() - started) / args.steps)

    step = statistics.median(step_seconds)
    bare = statistics.median(seconds[BARE])
    size = trainer.validation.describe()
    print(
        f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s), {args.source} -> "
        f"{args.target}, {size['target_size']} target and {size['source_size']} source samples scored, "
        f"{args.repeats} passes each; a training step: {1000 * step:.1f} ms\n"
    )
    print("| pass | seconds | extra over the bare pass (s) | extra in training steps |")
    print("|---|---:|---:|---:|")
    print(f"| {BARE} | {bare:.3f} | - | {bare / step:.1f} (the pass itself) |")
    for name in [*VALIDATORS, ALL]:
        value = statistics.median(seconds[name])
        print(f"| {name} | {value:.3f} | {value - bare:.3f} | {(value - bare) / step:.1f} |")
    print(
        "\nsource_val and dev each include the forward of the source samples, which they share when "
        f"computed together; the whole pass of every validator is {statistics.median(seconds[ALL]) / step:.0f} "
        "training steps."
    )


if __name__ == "__main__":
    main()
