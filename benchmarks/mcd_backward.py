"""What MCD saves by back-propagating each phase only into the parameters it steps.

Plain step B steps the classifiers alone and step C the generator alone, so
:meth:`~gradharmony.uda.methods.mcd.MCD.update` passes ``inputs=`` to those backward passes.  This
script trains two copies of the same MCD (TLlib's digit layout: LeNet-500, heads 1024-1024, batch
128 + 128, ``num_k`` 4) on the same random batches, step by step, interleaved: one as shipped, one
whose backward passes ignore ``inputs`` (every gradient computed, the unused ones discarded, as
before).  It prints the median ms per step of each and their ratio, for plain training, GH and GH++,
and checks that both copies end with identical parameters and buffers.

    python benchmarks/mcd_backward.py                 # prints a Markdown table
    python benchmarks/mcd_backward.py --steps 4 --batch 32
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time
from unittest import mock

import torch

from gradharmony import Harmonizer
from gradharmony.uda.methods.base import Batch, StepContext
from gradharmony.uda.methods.mcd import MCD
from gradharmony.uda.models import build_backbone

FULL_BACKWARD = torch.Tensor.backward


def _full_backward(self, *args, inputs=None, **kwargs):
    return FULL_BACKWARD(self, *args, **kwargs)


def build(seed: int) -> MCD:
    torch.manual_seed(seed)
    backbone = build_backbone("lenet500", 1, 28)
    return MCD(backbone, num_classes=10, max_steps=5000, bottleneck_dim=1024, head_hidden=1024, shared_bottleneck=False)


def optimizers(method: MCD) -> dict[str, torch.optim.Optimizer]:
    return {
        name: torch.optim.SGD(groups, lr=0.01, momentum=0.9, weight_decay=5e-4)
        for name, groups in method.optimizer_groups(0.01).items()
    }


def compare(mode: str | None, steps: int, batch: int) -> tuple[float, float, bool]:
    """Median ms per step, pruned and full, and whether both copies end identical."""
    pruned, full = build(0), build(0)
    copies = {"pruned": pruned, "full": full}
    state = {
        name: (optimizers(m), Harmonizer(mode=mode, scope=m.scope_modules(), lead=m.default_lead) if mode else None)
        for name, m in copies.items()
    }
    data = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {"pruned": [], "full": []}
    for step in range(steps):
        x_s, x_t = torch.rand(batch, 1, 28, 28, generator=data), torch.rand(batch, 1, 28, 28, generator=data)
        y_s = torch.randint(0, 10, (batch,), generator=data)
        for name, method in copies.items():
            opts, harmonizer = state[name]
            patch = mock.patch.object(torch.Tensor, "backward", _full_backward) if name == "full" else None
            torch.manual_seed(step)  # the same dropout masks for both copies
            with patch or contextlib.nullcontext():
                started = time.perf_counter()
                method.update(Batch(x_s, y_s, x_t), StepContext(step, opts, harmonizer, 0.3))
                times[name].append((time.perf_counter() - started) * 1000)
    same = all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), full.state_dict().values()))
    return statistics.median(times["pruned"][1:]), statistics.median(times["full"][1:]), same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=11, help="training steps per copy (the first is not timed)")
    parser.add_argument("--batch", type=int, default=128, help="per domain (default: 128, TLlib's)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s), {args.steps} steps per copy\n")
    print("| harmonizer | pruned ms / step | full ms / step | pruned / full | identical parameters |")
    print("|---|---:|---:|---:|---|")
    for mode in (None, "gh", "gh++"):
        pruned, full, same = compare(mode, args.steps, args.batch)
        print(f"| {mode or 'none (plain)'} | {pruned:.0f} | {full:.0f} | {pruned / full:.2f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
