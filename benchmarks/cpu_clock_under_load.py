"""Does a run's CPU time per step stay put when other jobs share the cores, where its wall time grows?

The engine records both (``seconds_per_step``, ``cpu_seconds_per_step``); the digits parity report
compares runs trained at different times by the CPU time.  This times one training step of TLlib's
digit LeNet (``lenet500``, batch 256, forward and backward, one thread) alone, then beside
``--busy`` processes that spin on the CPU, and prints both clocks and their ratios:

    python benchmarks/cpu_clock_under_load.py --busy 2 --steps 30
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch
from torch.nn import functional as F

from gradharmony.uda.models import build_backbone


def spin(stop) -> None:
    while not stop.is_set():
        pass


def time_steps(steps: int) -> tuple[float, float]:
    """Wall and CPU seconds per training step, after three warm-up steps."""
    torch.manual_seed(0)
    backbone = build_backbone("lenet500", 1, 28)
    head = torch.nn.Linear(backbone.out_features, 10)
    x, y = torch.rand(256, 1, 28, 28), torch.randint(0, 10, (256,))

    def step() -> None:
        F.cross_entropy(head(backbone(x)), y).backward()

    for _ in range(3):
        step()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=2, help="spinning processes beside the timed one")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet = time_steps(args.steps)
    stop = mp.Event()
    spinners = [mp.Process(target=spin, args=(stop,)) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    try:
        loaded = time_steps(args.steps)
    finally:
        stop.set()
        for p in spinners:
            p.join()
    print("| load | wall s/step | CPU s/step |")
    print("|---|---:|---:|")
    print(f"| alone | {quiet[0]:.3f} | {quiet[1]:.3f} |")
    print(f"| beside {args.busy} busy processes | {loaded[0]:.3f} | {loaded[1]:.3f} |")
    print(f"| ratio | {loaded[0] / quiet[0]:.2f}x | {loaded[1] / quiet[1]:.2f}x |")


if __name__ == "__main__":
    main()
