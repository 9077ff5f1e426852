"""Communication volume and step time of exact GH under data parallelism (gloo, CPU processes).

Each process runs the DANN-like model of ``harmonizer_overhead.py`` on its share of a batch.
"plain" is data-parallel training without GH: one backward, then the gradients averaged (what DDP
communicates).  The GH rows use ``Harmonizer(distributed="auto")``, which keeps the update exact:
it averages the probe gradients it measures (or sums the three Gramian entries for per-sample
feature gradients) and averages every gradient it writes.  Bytes are counted on every all-reduce.

    python benchmarks/distributed_overhead.py --processes 2 --model lenet
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harmonizer_overhead import Config, Stepper, build

import gradharmony.distributed as gh_dist

CONFIGS = [
    Config("plain (data parallel, no GH)", None),
    Config("gh reweight (authors, 3 passes)", "gh", "reweight"),
    Config("gh recombine (2 passes)", "gh", "recombine"),
    Config("gh features", "gh", "features"),
    Config("gh recombine, bottleneck scope (cut at backbone output)", "gh", "recombine", scope="bottleneck"),
    Config("gh recombine, refresh_every=4", "gh", "recombine", refresh_every=4),
]


class CountingAllReduce:
    """Wraps ``dist.all_reduce`` to count the bytes each process sends into reductions."""

    def __init__(self) -> None:
        self.bytes = 0
        self.original = dist.all_reduce

    def __call__(self, tensor, *args, **kwargs):
        self.bytes += tensor.numel() * tensor.element_size()
        return self.original(tensor, *args, **kwargs)


def _worker(rank: int, world: int, port: int, model_name: str, batch: int, steps: int, repeats: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    counter = CountingAllReduce()
    gh_dist.dist.all_reduce = counter  # the harmonizer's collectives go through this module
    model, data = build(model_name, torch.device("cpu"), batch)
    steppers = [Stepper(model, data, c) for c in CONFIGS]
    params = list(model.parameters())

    def plain_step(stepper: Stepper) -> None:
        """One backward of the summed losses, gradients averaged as DDP would, SGD step."""
        stepper.optimizer.zero_grad(set_to_none=True)
        cls, align, _, _ = model.losses(*data)
        (cls + align).backward()
        gh_dist.average_([p.grad for p in params if p.grad is not None], gh_dist.World(None, world))
        stepper.optimizer.step()

    samples = {c.name: [] for c in CONFIGS}
    volume = {}
    for cfg, stepper in zip(CONFIGS, steppers):  # warm-up, and bytes per step
        run = (lambda s=stepper: plain_step(s)) if cfg.mode is None else stepper
        run()
        counter.bytes = 0
        for _ in range(steps):
            run()
        volume[cfg.name] = counter.bytes / steps
    for _ in range(repeats):
        for cfg, stepper in zip(CONFIGS, steppers):
            run = (lambda s=stepper: plain_step(s)) if cfg.mode is None else stepper
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                run()
            dist.barrier()
            samples[cfg.name].append((time.perf_counter() - start) / steps)
    if rank == 0:
        queue.put(({k: statistics.median(v) for k, v in samples.items()}, volume, sum(p.numel() for p in params)))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--model", default="lenet", choices=["lenet", "resnet18"])
    parser.add_argument("--batch", type=int, default=16, help="per process and domain")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker, args=(r, args.processes, port, args.model, args.batch, args.steps, args.repeats, queue)
        )
        for r in range(args.processes)
    ]
    for p in procs:
        p.start()
    times, volume, n_params = queue.get(timeout=3600)
    for p in procs:
        p.join()
    plain_t, plain_v = times[CONFIGS[0].name], volume[CONFIGS[0].name]
    print(
        f"{args.processes} gloo processes on CPU, 1 thread each, {args.model} ({n_params / 1e6:.2f} M parameters), "
        f"batch {args.batch}+{args.batch} per process, median of {args.repeats} x {args.steps} steps\n"
    )
    print("| configuration | ms / step | ratio to plain | all-reduced MB / step / process | ratio to plain |")
    print("|---|---:|---:|---:|---:|")
    for cfg in CONFIGS:
        t, v = times[cfg.name], volume[cfg.name]
        print(f"| {cfg.name} | {1000 * t:.1f} | {t / plain_t:.2f}x | {v / 2**20:.2f} | {v / plain_v:.2f}x |")


if __name__ == "__main__":
    main()
