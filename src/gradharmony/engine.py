"""The training loop: a method, a harmonizer and two domains wired together.

``train(cfg)`` runs one configuration end to end: endless source/target batches, SGD with the
inverse-decay schedule :math:`lr_i = lr (1 + \\gamma i)^{-0.75}`, evaluation every
``eval_every`` steps (accuracy and per-class accuracy on the target test split; last and best both
kept), a checkpoint after each evaluation, and one JSON line per evaluation holding the resolved
config and the harmonizer's statistics over the interval.

Interrupting a run (Ctrl-C or SIGTERM) finishes the current step, saves a checkpoint and stops;
running the same command again continues from it and ends, on CPU, bit-identical to an
uninterrupted run.

``target_acc`` is the metric the literature reports for the target benchmark (accuracy; mean
per-class accuracy for VisDA-2017, named in ``target_metric``).  Best-over-evaluations accuracy is
selected on target *test* labels: it is what the UDA literature
reports, and it is labelled as such (``best_target_acc``), never silently mixed with the last.
"""

from __future__ import annotations

import copy
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from gradharmony.config import ConfigError, TrainConfig
from gradharmony.data import Domain, default_data_root, load_domain
from gradharmony.distributed import averaged_new_gradients, resolve_world
from gradharmony.harmonizer import Harmonizer
from gradharmony.methods import Method, build_method
from gradharmony.models import FEATURE_BACKBONES, build_backbone
from gradharmony.models.backbones import IMAGE_BACKBONE_NAMES, build_image_backbone
from gradharmony.runlog import RunLog, load_checkpoint, save_checkpoint
from gradharmony.batches import LoaderBatches, TensorBatches, to_input

EVAL_BATCH = 1000
IMAGE_EVAL_BATCH = 64
MAX_CONSECUTIVE_NONFINITE = 10  # skipped steps in a row before a run is declared diverged


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with non-finite losses or gradients."""


@dataclass
class Evaluation:
    accuracy: float
    per_class: list[float]

    @property
    def mean_class_accuracy(self) -> float:
        valid = [a for a in self.per_class if not math.isnan(a)]
        return sum(valid) / len(valid) if valid else math.nan


def _num_classes(data: Domain | Dataset) -> int:
    return data.num_classes if hasattr(data, "num_classes") else data.dataset.num_classes


def _eval_batches(data: Domain | Dataset, workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, Domain):
        for start in range(0, len(data), EVAL_BATCH):
            yield to_input(data.images[start:start + EVAL_BATCH]), data.labels[start:start + EVAL_BATCH]
    else:
        for images, labels in DataLoader(data, batch_size=IMAGE_EVAL_BATCH, num_workers=workers):
            yield to_input(images), labels


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Domain | Dataset, device: torch.device, workers: int = 0) -> Evaluation:
    """Accuracy and per-class accuracy of ``model`` on a domain (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    num_classes = _num_classes(data)
    correct = torch.zeros(num_classes, dtype=torch.long)
    total = torch.zeros(num_classes, dtype=torch.long)
    for inputs, labels in _eval_batches(data, workers):
        labels = labels.to(device)
        predictions = model(inputs.to(device)).argmax(dim=1)
        total += torch.bincount(labels, minlength=num_classes).cpu()
        correct += torch.bincount(labels[predictions == labels], minlength=num_classes).cpu()
    model.train(was_training)
    per_class = [c / t if t else math.nan for c, t in zip(correct.tolist(), total.tolist())]
    return Evaluation(accuracy=correct.sum().item() / max(1, total.sum().item()), per_class=per_class)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available on this machine")
    return torch.device(name)


def build_harmonizer(cfg: TrainConfig, method: Method) -> Harmonizer:
    scopes = {"default": method.scope_modules(), "bottleneck": [method.bottleneck],
              "backbone": [method.backbone], "all": None}
    lead = method.default_lead if cfg.lead == "default" else cfg.lead
    return Harmonizer(mode=cfg.harmonizer, scope=scopes[cfg.scope], strategy=cfg.strategy, k=cfg.k,
                      lead=lead, refresh_every=cfg.refresh_every, max_weight=cfg.max_weight)


def build_model(cfg: TrainConfig, num_classes: int, input_shape: tuple[int, ...]) -> Method:
    """The method with its backbone; ``input_shape`` is one example's shape (C, H, W) or (D,)."""
    if cfg.backbone in FEATURE_BACKBONES:
        if len(input_shape) != 1:
            raise ConfigError(f"backbone {cfg.backbone!r} takes feature vectors; {cfg.source} holds images")
        backbone = FEATURE_BACKBONES[cfg.backbone](input_shape[0])
    else:
        if len(input_shape) != 3:
            raise ConfigError(f"backbone {cfg.backbone!r} takes images; {cfg.source} holds feature vectors "
                              f"(use --backbone mlp)")
        if cfg.backbone in IMAGE_BACKBONE_NAMES:
            if cfg.channels != 3:
                raise ConfigError(f"{cfg.backbone} takes RGB images: set channels: 3")
            # Inputs are in [-1, 1], which is what EfficientNet-Lite's weights expect ((x - 127) / 128);
            # ResNet/ViT weights expect ImageNet statistics, close to it after their first batch norm.
            pretrained = {None: False, "imagenet": True}.get(cfg.pretrained, cfg.pretrained)
            backbone = build_image_backbone(cfg.backbone, pretrained=pretrained)
        else:
            backbone = build_backbone(cfg.backbone, in_channels=cfg.channels, image_size=cfg.image_size)
    return build_method(cfg.method, backbone, num_classes, max_steps=cfg.steps,
                        bottleneck_dim=cfg.bottleneck_dim, **cfg.method_params)


def _limited(domain: Domain, limit: int | None, seed: int) -> Domain:
    if limit is None or limit >= len(domain):
        return domain
    keep = torch.randperm(len(domain), generator=torch.Generator().manual_seed(seed))[:limit]
    return Domain(name=domain.name, split=domain.split, images=domain.images[keep],
                  labels=domain.labels[keep], num_classes=domain.num_classes)


def load_domains(cfg: TrainConfig) -> dict[str, Domain | Dataset]:
    """Source train (labelled), target train (labels never used), source and target test."""
    root = Path(cfg.data_root) if cfg.data_root else default_data_root()
    if is_image_task(cfg.source):
        domains = _load_image_domains(cfg, root)
    else:
        common = dict(data_root=root, image_size=cfg.image_size, channels=cfg.channels)
        domains = {
            "source": _limited(load_domain(cfg.source, "train", **common), cfg.source_limit, 0),
            "target": _limited(load_domain(cfg.target, "train", **common), cfg.target_limit, 1),
            "source_test": _limited(load_domain(cfg.source, "test", **common), cfg.source_eval_size, 2),
            "target_test": load_domain(cfg.target, "test", **common),
        }
    if _num_classes(domains["source"]) != _num_classes(domains["target"]):
        raise ConfigError(f"{cfg.source} has {_num_classes(domains['source'])} classes but {cfg.target} has "
                          f"{_num_classes(domains['target'])}; closed-set UDA needs the same classes")
    return domains


def is_image_task(name: str) -> bool:
    """Image-benchmark domains are named ``benchmark:domain`` (e.g. ``office31:amazon``)."""
    return ":" in name


def load_eval_domain(cfg: TrainConfig, name: str, split: str, data_root: str | Path | None) -> Domain | Dataset:
    """One domain for evaluation, in the input space the run was trained in."""
    root = Path(data_root) if data_root else default_data_root()
    if is_image_task(name):
        from gradharmony.data.image_domains import load_image_domain

        benchmark, domain = name.split(":", 1)
        return load_image_domain(benchmark, domain, split, root, train=False, resize=cfg.resize, crop=cfg.crop)
    return load_domain(name, split, data_root=root, image_size=cfg.image_size, channels=cfg.channels)


def _subset(dataset: Dataset, limit: int | None, seed: int) -> Dataset:
    if limit is None or limit >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit]
    subset = Subset(dataset, keep.tolist())
    subset.num_classes = dataset.num_classes
    return subset


def _load_image_domains(cfg: TrainConfig, root: Path) -> dict[str, Dataset]:
    """Image benchmarks through DataLoaders: train transforms for training, evaluation ones for tests."""
    from gradharmony.data.image_domains import load_image_domain

    def load(name: str, split: str, train: bool) -> Dataset:
        benchmark, domain = name.split(":", 1)
        return load_image_domain(benchmark, domain, split, root, train=train, resize=cfg.resize, crop=cfg.crop)

    return {
        "source": _subset(load(cfg.source, "train", True), cfg.source_limit, 0),
        "target": _subset(load(cfg.target, "train", True), cfg.target_limit, 1),
        "source_test": _subset(load(cfg.source, "test", False), cfg.source_eval_size, 2),
        "target_test": load(cfg.target, "test", False),
    }


class _DeferredInterrupt:
    """Turn the first Ctrl-C / SIGTERM into a request to stop after the current step.

    A step interrupted half-way (optimizer stepped, counter not yet advanced) could not be resumed
    exactly, so the loop finishes the step, saves, then stops.  A second signal stops at once.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "_DeferredInterrupt":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


class Trainer:
    """One run: build everything from ``cfg``, then :meth:`run` (resuming if a checkpoint exists)."""

    def __init__(self, cfg: TrainConfig, domains: dict[str, Domain] | None = None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        self.rank, self.world, self._owns_group = _init_distributed(self.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
            torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0  # the process that evaluates and writes
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.domains = domains if domains is not None else load_domains(cfg)
        for key in ("source", "target"):  # keep training tensors on the device: no loader overhead
            d = self.domains[key]
            if isinstance(d, Domain):
                self.domains[key] = Domain(d.name, d.split, d.images.to(self.device), d.labels.to(self.device),
                                           d.num_classes)
        source = self.domains["source"]
        input_shape = tuple(source.images.shape[1:]) if isinstance(source, Domain) else tuple(source[0][0].shape)
        self.model = build_model(cfg, _num_classes(source), input_shape).to(self.device)
        if self.world > 1:
            blocker = getattr(self.model, "distributed_blocker", None)
            if blocker:
                raise ConfigError(f"{cfg.method} cannot train in several processes: {blocker}; "
                                  f"train it in a single process")
            if cfg.sync_batchnorm:
                self.model = _synchronised_batch_norm(self.model, self.device)
            torch.manual_seed(cfg.seed + 1_000_003 * self.rank)  # same initial weights, own dropout masks
        self.optimizers = self._build_optimizers()
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("amp fp16 needs a CUDA device; on CPU use amp bf16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        self.harmonizer = build_harmonizer(cfg, self.model)
        # Under a bottleneck scope the probes can stop at the backbone output (see Harmonizer).
        self._backbone_output: list[torch.Tensor] = []
        if cfg.scope == "bottleneck" and cfg.strategy == "recombine":
            self.model.backbone.register_forward_hook(
                lambda module, args, output: self._backbone_output.append(output) if module.training else None)
        self.source_batches = self._batches(self.domains["source"], seed=cfg.seed)
        self.target_batches = self._batches(self.domains["target"], seed=cfg.seed + 10_000)
        self.step = 0
        self.best = {"best_target_acc": -1.0, "best_step": -1}
        self.interval = self._new_interval()
        self.consecutive_nonfinite = 0
        self.mid_step = False
        self.log = RunLog(self.out)
        self.board = _summary_writer(cfg.tensorboard) if cfg.tensorboard and self.is_main else None

    # ------------------------------------------------------------------ state
    @staticmethod
    def _new_interval() -> dict[str, Any]:
        return {"loss_cls": 0.0, "loss_align": 0.0, "steps": 0, "skipped_nonfinite": 0, "seconds": 0.0,
                "method_sums": {}, "method_counts": {}, "method_last": {}}

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "config": self.cfg.to_dict(), "config_hash": self.cfg.outcome_hash(),
            "model": self.model.state_dict(),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "harmonizer": self.harmonizer.state_dict(),
            "source_batches": self.source_batches.state_dict(),
            "target_batches": self.target_batches.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "best": dict(self.best), "interval": copy.deepcopy(self.interval),
            "consecutive_nonfinite": self.consecutive_nonfinite,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.model.load_state_dict(state["model"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.harmonizer.load_state_dict(state["harmonizer"])
        self.source_batches.load_state_dict(state["source_batches"])
        self.target_batches.load_state_dict(state["target_batches"])
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        # Checkpoints written before the method scalars were logged lack their keys: start them empty.
        self.best = dict(state["best"])
        self.interval = {**self._new_interval(), **copy.deepcopy(state["interval"])}
        self.consecutive_nonfinite = int(state["consecutive_nonfinite"])

    def save(self) -> None:
        if self.is_main:
            self.log.flush_steps()
            save_checkpoint(self.out / "last.pt", self.state_dict())

    def _resume_if_possible(self) -> bool:
        path = self.out / "last.pt"
        if not path.exists():
            return False
        state = load_checkpoint(path)
        if state["config_hash"] != self.cfg.outcome_hash():
            raise ConfigError(f"{self.out} holds a run with a different configuration "
                              f"(see {self.out / 'config.yaml'}); choose another --out or delete it")
        self.load_state_dict(state)
        if self.is_main:
            self.log.truncate_after(self.step)
        return True

    # ------------------------------------------------------------------ loop
    def _set_lr(self) -> float:
        factor = (1.0 + self.cfg.lr_gamma * self.step) ** (-self.cfg.lr_decay)
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = self.cfg.lr * group.get("lr_mult", 1.0) * factor
        return self.cfg.lr * factor

    def _batches(self, data: Domain | Dataset, seed: int) -> TensorBatches | LoaderBatches:
        shard = {"rank": self.rank, "world": self.world}
        if isinstance(data, Domain):
            return TensorBatches(data.images, data.labels, self.cfg.batch_size, seed, **shard)
        return LoaderBatches(data, self.cfg.batch_size, seed, self.cfg.loader_workers, self.device, **shard)

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xs, ys = self.source_batches.next()
        xt, _ = self.target_batches.next()
        return xs, ys, xt

    def _build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """One SGD per named group set: a single one, or several for multi-step methods (MCD)."""
        cfg = self.cfg
        groups = (self.model.optimizer_groups(cfg.lr) if hasattr(self.model, "optimizer_groups")
                  else {"all": self.model.parameter_groups(cfg.lr)})
        return {name: torch.optim.SGD(g, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                      nesterov=cfg.nesterov) for name, g in groups.items()}

    def _zero_grad(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)

    def _harmonized_step(self, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor) -> tuple[dict, float, float, bool]:
        """Forward, harmonized backward, optimizer step (skipped if anything is non-finite)."""
        self._backbone_output.clear()
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            losses = self.model.compute_losses(xs, ys, xt, step=self.step)
        cut = self._backbone_output[0] if len(self._backbone_output) == 1 else losses.features
        self._backbone_output.clear()
        self._zero_grad()
        if losses.align.requires_grad:
            stats = self.harmonizer.backward(cls=losses.cls, align=losses.align, trade_off=self.cfg.trade_off,
                                             features=cut, scaler=self.scaler)
            record = _stats_record(stats)
        else:  # source-only: nothing to harmonize
            leaves = list(self.model.parameters()) if self.world > 1 else []
            with averaged_new_gradients(leaves, resolve_world("auto") if self.world > 1 else None):
                (self.scaler.scale(losses.cls) if self.scaler else losses.cls).backward()
            record = {"w_align": 1.0, "w_cls": 1.0, "guards": "no_align"}
        logs = losses.logs
        self._add_method_logs(logs)
        loss_cls = logs["cls_loss"] if "cls_loss" in logs else float(losses.cls.detach())
        loss_align = logs["transfer_loss"] if "transfer_loss" in logs else float(losses.align.detach())
        if self.scaler is not None:  # the scaler skips overflowing steps itself and lowers its scale
            for optimizer in self.optimizers.values():
                self.scaler.step(optimizer)
            self.scaler.update()
            return record, loss_cls, loss_align, math.isfinite(loss_cls) and math.isfinite(loss_align)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        finite = math.isfinite(loss_cls) and math.isfinite(loss_align) and bool(
            torch.isfinite(torch.nn.utils.get_total_norm(grads)))
        if finite:
            for optimizer in self.optimizers.values():
                optimizer.step()
        else:
            self._zero_grad()
        return record, loss_cls, loss_align, finite

    def _multi_step(self, xs: torch.Tensor, ys: torch.Tensor, xt: torch.Tensor) -> tuple[dict, float, float, bool]:
        """A method that owns its update order (MCD): it steps its own optimizers."""
        result = self.model.update(xs, ys, xt, self.step, self.optimizers, self.harmonizer, self.cfg.trade_off)
        record = _stats_record(result.stats) if result.stats is not None else {"guards": "no_harmonizer"}
        self._add_method_logs(result.logs)
        finite = math.isfinite(result.loss_cls) and math.isfinite(result.loss_align) and all(
            torch.isfinite(p).all() for p in self.model.parameters())
        return record, result.loss_cls, result.loss_align, finite

    def train_step(self) -> dict[str, Any]:
        self.mid_step = True
        self._set_lr()
        xs, ys, xt = self._batch()
        step_fn = self._multi_step if getattr(self.model, "multi_step", False) else self._harmonized_step
        record, loss_cls, loss_align, finite = step_fn(xs, ys, xt)
        self._backbone_output.clear()  # multi-step methods run several forwards: hold no graph
        if finite:
            self.consecutive_nonfinite = 0
        else:
            self.consecutive_nonfinite += 1
            self.interval["skipped_nonfinite"] += 1
            record["guards"] = (record.get("guards", "") + "|skipped_step").strip("|")
        record.update(step=self.step, loss_cls=loss_cls, loss_align=loss_align)
        self.interval["loss_cls"] += loss_cls if finite else 0.0
        self.interval["loss_align"] += loss_align if finite else 0.0
        self.interval["steps"] += 1
        if self.is_main:
            self.log.add_step(record)
            if self.board is not None:
                for key in ("loss_cls", "loss_align", "angle", "w_align", "w_cls"):
                    value = record.get(key)
                    if isinstance(value, float) and math.isfinite(value):
                        self.board.add_scalar(f"train/{key}", value, self.step)
        self.step += 1
        self.mid_step = False
        if self.consecutive_nonfinite >= MAX_CONSECUTIVE_NONFINITE:
            raise TrainingDiverged(
                f"{MAX_CONSECUTIVE_NONFINITE} consecutive steps with non-finite losses or gradients (the "
                f"last at step {self.step - 1}); they were skipped, and the last good checkpoint is "
                f"{self.out / 'last.pt'}. Lower --lr or --trade-off, or set --max-weight to cap the "
                f"harmonizer's weights")
        return record

    def _add_method_logs(self, logs: dict[str, float]) -> None:
        """Keep the method's own scalars (SSRT's restarts, MCD's discrepancies, ...) for the evaluation record."""
        sums, counts, last = (self.interval[key] for key in ("method_sums", "method_counts", "method_last"))
        for key, value in logs.items():
            if key in ("cls_loss", "transfer_loss"):  # already the record's loss_cls / loss_align
                continue
            value = float(value)
            last[key] = value
            if math.isfinite(value):
                sums[key] = sums.get(key, 0.0) + value
                counts[key] = counts.get(key, 0) + 1

    def evaluation_record(self) -> dict[str, Any]:
        workers = self.cfg.loader_workers
        target = evaluate(self.model, self.domains["target_test"], self.device, workers)
        source = evaluate(self.model, self.domains["source_test"], self.device, workers) if self.cfg.source_eval_size else None
        # What the literature reports on this target: accuracy, or (VisDA-2017) mean per-class accuracy.
        metric = getattr(self.domains["target_test"], "metric", "accuracy")
        headline = target.mean_class_accuracy if metric == "mean_class_accuracy" else target.accuracy
        if headline > self.best["best_target_acc"]:
            self.best = {"best_target_acc": headline, "best_step": self.step}
        n = max(1, self.interval["steps"] - self.interval["skipped_nonfinite"])
        record = {
            "step": self.step, "target_acc": headline, "target_metric": metric,
            "target_overall_acc": target.accuracy, "target_mean_class_acc": target.mean_class_accuracy,
            "target_per_class_acc": target.per_class,
            "source_test_acc": source.accuracy if source else None,
            "source_test_size": len(self.domains["source_test"]) if source else 0,
            **self.best,
            "loss_cls": self.interval["loss_cls"] / n, "loss_align": self.interval["loss_align"] / n,
            "skipped_nonfinite": self.interval["skipped_nonfinite"],
            "seconds_per_step": self.interval["seconds"] / max(1, self.interval["steps"]),
            "harmonizer": self.harmonizer.summary(),
            # the method's scalars: mean over the interval's finite values, and the last value
            "method_logs_mean": {k: v / self.interval["method_counts"][k]
                                 for k, v in self.interval["method_sums"].items()},
            "method_logs_last": dict(self.interval["method_last"]),
            "config_hash": self.cfg.outcome_hash(), "config": self.cfg.to_dict(),
        }
        self.harmonizer.reset_summary()
        self.interval = self._new_interval()
        return record

    def run(self) -> dict[str, Any]:
        """Train to ``cfg.steps`` (resuming if possible); returns the final summary."""
        try:
            return self._run()
        finally:
            if self.board is not None:
                self.board.close()
            if self._owns_group:
                dist.destroy_process_group()

    def _run(self) -> dict[str, Any]:
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.world > 1:
            dist.barrier()  # every process sees the same checkpoint (or none)
        resumed = self._resume_if_possible()
        if self.is_main:
            self.cfg.save(self.out / "config.yaml")
        checkpoint_every = self.cfg.checkpoint_every or self.cfg.eval_every
        last_eval: dict[str, Any] = {}
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not (self.cfg.progress and self.is_main),
                   dynamic_ncols=True,
                   desc=f"{self.cfg.method}+{self.cfg.harmonizer} {self.cfg.source}->{self.cfg.target}"
                        + (" (resumed)" if resumed else ""))
        recent_angles: list[float] = []
        try:
            with _DeferredInterrupt() as interrupt:
                while self.step < self.cfg.steps:
                    started = time.perf_counter()
                    record = self.train_step()
                    self.interval["seconds"] += time.perf_counter() - started
                    if record.get("measured") and record.get("angle") is not None and math.isfinite(record["angle"]):
                        recent_angles = (recent_angles + [record["angle"]])[-50:]
                    bar.update(1)
                    if self.step % 10 == 0 or self.step == self.cfg.steps:
                        summary = self.harmonizer.summary()
                        bar.set_postfix(cls=f"{record['loss_cls']:.3f}", align=f"{record['loss_align']:.3f}",
                                        acc=f"{last_eval.get('target_acc', math.nan):.3f}",
                                        angle=f"{np.mean(recent_angles) if recent_angles else math.nan:.1f}",
                                        conflict=f"{summary['conflict_rate']:.2f}", refresh=False)
                    if self.is_main and (self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps):
                        last_eval = self.evaluation_record()
                        self.log.add_evaluation(last_eval)
                        self._board_evaluation(last_eval)
                    if self.step % checkpoint_every == 0 or self.step == self.cfg.steps:
                        self.save()
                    if interrupt.requested and self.step < self.cfg.steps:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            if self.mid_step:  # a second signal stopped a step half-way: keep the last consistent checkpoint
                raise KeyboardInterrupt(f"stopped during step {self.step}; the last checkpoint "
                                        f"{self.out / 'last.pt'} is kept: run the same command again to resume") from None
            self.save()
            raise KeyboardInterrupt(f"interrupted at step {self.step}; checkpoint saved to "
                                    f"{self.out / 'last.pt'}: run the same command again to resume") from None
        bar.close()
        if self.world > 1:
            dist.barrier()  # the other processes wait for the last checkpoint and log
        return self.final_summary()

    def _board_evaluation(self, record: dict[str, Any]) -> None:
        if self.board is None:
            return
        for key in ("target_acc", "best_target_acc", "source_test_acc"):
            if record.get(key) is not None:
                self.board.add_scalar(f"eval/{key}", record[key], record["step"])
        for key, value in record["harmonizer"].items():
            if isinstance(value, float) and math.isfinite(value):
                self.board.add_scalar(f"harmonizer/{key}", value, record["step"])
        for key, value in record["method_logs_mean"].items():
            self.board.add_scalar(f"method/{key}", value, record["step"])
        self.board.flush()

    def final_summary(self) -> dict[str, Any]:
        from gradharmony.runlog import read_metrics

        records = read_metrics(self.out)
        last = records[-1]
        return {"out": str(self.out), "method": self.cfg.method, "harmonizer": self.cfg.harmonizer,
                "seed": self.cfg.seed, "steps": self.step, "last_target_acc": last["target_acc"],
                "best_target_acc": last["best_target_acc"], "best_step": last["best_step"],
                "config_hash": self.cfg.outcome_hash()}


def _summary_writer(folder: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the package is an optional extra
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'gradharmony[tensorboard]'") from None
    return SummaryWriter(folder)


def _synchronised_batch_norm(model: Method, device: torch.device) -> Method:
    """Every BatchNorm normalising with the statistics of the global batch (PyTorch's SyncBatchNorm).

    Without it each process normalises with its own batch, as plain DDP does.  The harmonizer's
    probes run backward through the synchronised layers on every process alike and are averaged
    as DDP averages gradients, so GH sees the global batch's gradients (a CUDA-only path: not
    exercised by the CPU test suite).
    """
    if device.type != "cuda":
        raise ConfigError("sync_batchnorm needs CUDA devices: PyTorch's SyncBatchNorm does not run on "
                          f"{device.type}; drop --sync-batchnorm (each process then keeps its own statistics)")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def _init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """``(rank, world size, whether we created the process group)``; under torchrun it joins."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return 0, 1, False
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), created


def _stats_record(stats) -> dict[str, Any]:
    """The per-step CSV fields of a harmonizer StepStats."""
    record = {k: v for k, v in stats.as_dict().items()
              if k in ("cos", "angle", "w_align", "w_cls", "conflict", "measured")}
    record["guards"] = "|".join(stats.guards)
    return record


def train(cfg: TrainConfig, domains: dict[str, Domain] | None = None) -> dict[str, Any]:
    """Run (or resume, or skip if finished) one configuration; returns its final summary."""
    return Trainer(cfg, domains).run()
