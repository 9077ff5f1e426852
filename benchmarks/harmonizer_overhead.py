"""Step-time and peak-memory overhead of every harmonizer strategy x mode against plain training.

A DANN-like model (backbone -> bottleneck -> classifier, discriminator behind a reversal layer),
random init, batch 32 source + 32 target; one training step = forward, backward (plain or
harmonized), SGD step.  Timings are interleaved round-robin over the configurations and repeated,
and the median per configuration is divided by the median of plain training measured in the same
run.  Peak memory is measured per configuration in a fresh subprocess (on CPU: the peak resident
set size during the timed steps above the resident size before them; on CUDA: the allocator peak).

    python benchmarks/harmonizer_overhead.py                  # both models, prints a Markdown table
    python benchmarks/harmonizer_overhead.py --models lenet --repeats 3 --steps 5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torchvision
from torch import nn

from gradharmony import GradientReversal, Harmonizer
from gradharmony.uda.models import LeNet


@dataclass(frozen=True)
class Config:
    name: str
    mode: str | None  # None: plain training
    strategy: str = "recombine"
    scope: str = "full"  # "full": backbone + bottleneck + classifier (authors' CDAN scope); "bottleneck"
    refresh_every: int = 1


def configs() -> list[Config]:
    out = [Config("plain", None)]
    for mode in ("gh", "gh++", "gh++exact"):
        out += [
            Config(f"{mode} reweight (authors, 3 passes)", mode, "reweight"),
            Config(f"{mode} recombine (2 passes)", mode, "recombine"),
            Config(f"{mode} features", mode, "features"),
            Config(f"{mode} reweight, bottleneck scope", mode, "reweight", scope="bottleneck"),
            Config(
                f"{mode} recombine, bottleneck scope (cut at backbone output)", mode, "recombine", scope="bottleneck"
            ),
            Config(f"{mode} recombine, refresh_every=4", mode, "recombine", refresh_every=4),
        ]
    return out


class DANNLike(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int = 10, bottleneck: int = 256):
        super().__init__()
        self.backbone = backbone
        self.bottleneck = nn.Sequential(nn.Linear(feature_dim, bottleneck), nn.BatchNorm1d(bottleneck), nn.ReLU())
        self.classifier = nn.Linear(bottleneck, num_classes)
        self.grl = GradientReversal(max_steps=1000)
        self.grl.set_step(500)
        self.discriminator = nn.Sequential(
            nn.Linear(bottleneck, 1024),
            nn.BatchNorm1d(1024),
            nn.ReLU(),
            nn.Linear(1024, 1024),
            nn.BatchNorm1d(1024),
            nn.ReLU(),
            nn.Linear(1024, 1),
        )

    def losses(self, xs, ys, xt):
        """Losses, the bottleneck output ``f`` and the backbone output ``h``."""
        h = self.backbone(torch.cat([xs, xt]))
        f = self.bottleneck(h)
        cls = nn.functional.cross_entropy(self.classifier(f[: len(xs)]), ys)
        domain = torch.cat([torch.ones(len(xs)), torch.zeros(len(xt))]).to(f.device)
        align = nn.functional.binary_cross_entropy_with_logits(self.discriminator(self.grl(f)).squeeze(1), domain)
        return cls, align, f, h


def build(model_name: str, device: torch.device, batch: int):
    torch.manual_seed(0)
    if model_name == "lenet":
        backbone = LeNet(in_channels=1, image_size=28)
        model, shape = DANNLike(backbone, backbone.out_features), (1, 28, 28)
    elif model_name == "resnet18":
        backbone = torchvision.models.resnet18(weights=None)
        backbone.fc = nn.Identity()
        model, shape = DANNLike(backbone, 512), (3, 64, 64)
    else:
        raise ValueError(f"unknown model {model_name!r}")
    model.to(device).train()
    xs, xt = torch.randn(batch, *shape, device=device), torch.randn(batch, *shape, device=device)
    ys = torch.randint(0, 10, (batch,), device=device)
    return model, (xs, ys, xt)


class Stepper:
    """One training step of a configuration, ready to be timed repeatedly."""

    def __init__(self, model: DANNLike, batch, cfg: Config):
        self.model, self.batch, self.cfg = model, batch, cfg
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        if cfg.mode is not None:
            scope = (
                [model.bottleneck]
                if cfg.scope == "bottleneck"
                else [model.backbone, model.bottleneck, model.classifier]
            )
            self.harmonizer = Harmonizer(
                mode=cfg.mode, scope=scope, strategy=cfg.strategy, refresh_every=cfg.refresh_every
            )

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        cls, align, f, h = self.model.losses(*self.batch)
        if self.cfg.mode is None:
            (cls + align).backward()
        else:
            # features: the Gramian of the features strategy; the cut below a bottleneck scope.
            cut = h if self.cfg.scope == "bottleneck" else f
            self.harmonizer.backward(cls=cls, align=align, features=cut)
        self.optimizer.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_all(model_name: str, device: torch.device, batch: int, steps: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of every configuration, interleaved round-robin."""
    cfgs = configs()
    model, data = build(model_name, device, batch)
    steppers = [Stepper(model, data, c) for c in cfgs]  # one model: every config starts from the same weights
    state = copy.deepcopy(model.state_dict())
    samples: dict[str, list[float]] = {c.name: [] for c in cfgs}
    for stepper in steppers:  # warm-up
        stepper()
    for _ in range(repeats):
        for cfg, stepper in zip(cfgs, steppers):
            model.load_state_dict(state)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                stepper()
            synchronize(device)
            samples[cfg.name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(v) for name, v in samples.items()}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(model_name: str, cfg_name: str, device: torch.device, batch: int, steps: int) -> float:
    """Peak extra memory (MiB) of the training steps of one configuration (run in a fresh process)."""
    cfg = next(c for c in configs() if c.name == cfg_name)
    model, data = build(model_name, device, batch)
    stepper = Stepper(model, data, cfg)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            stepper()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current size
    base = _rss_kib("VmRSS")
    for _ in range(steps):
        stepper()
    return (_rss_kib("VmHWM") - base) / 1024


def memory_table(model_name: str, device: str, batch: int, steps: int, threads: int) -> dict[str, float]:
    out = {}
    for cfg in configs():
        cmd = [
            sys.executable,
            __file__,
            "--memory-probe",
            model_name,
            cfg.name,
            "--device",
            device,
            "--batch",
            str(batch),
            "--threads",
            str(threads),
            "--steps",
            str(steps),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[cfg.name] = json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lenet", "resnet18"], choices=["lenet", "resnet18"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32, help="per domain (source and target each)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed sample")
    parser.add_argument("--repeats", type=int, default=5, help="timed samples per configuration (median)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-probe", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if args.memory_probe:
        peak = measure_memory(*args.memory_probe, device, args.batch, args.steps)
        print(json.dumps({"peak_mib": peak}))
        return

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, device {device}, threads {args.threads}"
    )
    print(f"batch {args.batch}+{args.batch}, {args.steps} steps x {args.repeats} interleaved repeats, median\n")
    for model_name in args.models:
        times = time_all(model_name, device, args.batch, args.steps, args.repeats)
        memory = {} if args.no_memory else memory_table(model_name, args.device, args.batch, 3, args.threads)
        plain = times["plain"]
        print(f"### {model_name}\n")
        print("| configuration | ms / step | ratio to plain | peak extra memory (MiB) |")
        print("|---|---:|---:|---:|")
        for name, t in times.items():
            mem = f"{memory[name]:.0f}" if name in memory else "-"
            print(f"| {name} | {1000 * t:.1f} | {t / plain:.2f}x | {mem} |")
        print(flush=True)


if __name__ == "__main__":
    main()
