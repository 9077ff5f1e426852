"""The training loop: a method, a harmonizer and two domains wired together.

``train(cfg)`` runs one configuration end to end: endless source/target batches, SGD with the
inverse-decay schedule :math:`lr_i = lr (1 + \\gamma i)^{-0.75}`, evaluation every
``eval_every`` steps (accuracy and per-class accuracy on the target test split; last and best both
kept), a checkpoint after each evaluation, and one JSON line per evaluation holding the resolved
config and the harmonizer's statistics over the interval.

Interrupting a run (Ctrl-C or SIGTERM) finishes the current step, saves a checkpoint and stops;
running the same command again continues from it and ends, on CPU, bit-identical to an
uninterrupted run.

Every method trains through one contract: each step the loop calls
``model.update(Batch(...), StepContext(...))`` (:mod:`gradharmony.uda.methods.base`).  The context
carries the harmonizer, or ``None`` for plain training: with ``--harmonizer none`` step ``i``
goes through the harmonizer (mode ``none``, weights 1: it only measures the geometry for the logs)
iff ``measure_every > 0 and i % measure_every == 0``; every other step is one plain backward of
:math:`L_{cls} + t\\,L_{align}` (no probes), logged with empty geometry fields.  With ``gh``,
``gh++`` or ``gh++exact`` every step is harmonized.

``target_acc`` is the metric the literature reports for the target benchmark (accuracy; mean
per-class accuracy for VisDA-2017, named in ``target_metric``).  Best-over-evaluations accuracy is
selected on target *test* labels: it is what the UDA literature
reports, and it is labelled as such (``best_target_acc``), never silently mixed with the last.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset
from tqdm import tqdm

from gradharmony.uda.batches import LoaderBatches, TensorBatches
from gradharmony.uda.config import ConfigError, TrainConfig
from gradharmony.uda.data import Domain
from gradharmony.uda.engine.builders import build_harmonizer, build_model, build_optimizers, resolve_device
from gradharmony.uda.engine.checkpoint import load_checkpoint, save_checkpoint
from gradharmony.uda.engine.domains import load_domains
from gradharmony.uda.engine.evaluation import evaluate, num_classes_of
from gradharmony.uda.engine.process import init_distributed, summary_writer, synchronised_batch_norm
from gradharmony.uda.methods import Batch, StepContext, UpdateResult
from gradharmony.uda.runs import RunLog, read_metrics

MAX_CONSECUTIVE_NONFINITE = 10  # skipped steps in a row before a run is declared diverged


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with non-finite losses or gradients."""


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

    def __enter__(self) -> _DeferredInterrupt:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
                self._previous[sig] = signal.signal(sig, self._handler)
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
        self.rank, self.world, self._owns_group = init_distributed(self.device)
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
                self.domains[key] = Domain(
                    d.name, d.split, d.images.to(self.device), d.labels.to(self.device), d.num_classes
                )
        source = self.domains["source"]
        input_shape = tuple(source.images.shape[1:]) if isinstance(source, Domain) else tuple(source[0][0].shape)
        self.model = build_model(cfg, num_classes_of(source), input_shape).to(self.device)
        if self.world > 1:
            blocker = getattr(self.model, "distributed_blocker", None)
            if blocker:
                raise ConfigError(
                    f"{cfg.method} cannot train in several processes: {blocker}; train it in a single process"
                )
            if cfg.sync_batchnorm:
                self.model = synchronised_batch_norm(self.model, self.device)
            torch.manual_seed(cfg.seed + 1_000_003 * self.rank)  # same initial weights, own dropout masks
        self.optimizers = build_optimizers(cfg, self.model)
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("amp fp16 needs a CUDA device; on CPU use amp bf16")
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
        # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.amp == "fp16" else None
        self.harmonizer = build_harmonizer(cfg, self.model)
        self.source_batches = self._batches(self.domains["source"], seed=cfg.seed)
        self.target_batches = self._batches(self.domains["target"], seed=cfg.seed + 10_000)
        self.step = 0
        self.best = {"best_target_acc": -1.0, "best_step": -1}
        self.interval = self._new_interval()
        self.consecutive_nonfinite = 0
        self.mid_step = False
        self.log = RunLog(self.out)
        self.board = summary_writer(cfg.tensorboard) if cfg.tensorboard and self.is_main else None

    # ------------------------------------------------------------------ state
    @staticmethod
    def _new_interval() -> dict[str, Any]:
        return {
            "loss_cls": 0.0,
            "loss_align": 0.0,
            "steps": 0,
            "skipped_nonfinite": 0,
            "seconds": 0.0,
            "method_sums": {},
            "method_counts": {},
            "method_last": {},
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "config_hash": self.cfg.outcome_hash(),
            "model": self.model.state_dict(),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "harmonizer": self.harmonizer.state_dict(),
            "source_batches": self.source_batches.state_dict(),
            "target_batches": self.target_batches.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "best": dict(self.best),
            "interval": copy.deepcopy(self.interval),
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
            raise ConfigError(
                f"{self.out} holds a run with a different configuration "
                f"(see {self.out / 'config.yaml'}); choose another --out or delete it"
            )
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

    def _batch(self) -> Batch:
        xs, ys = self.source_batches.next()
        xt, _ = self.target_batches.next()
        return Batch(xs, ys, xt)

    def measures(self, step: int) -> bool:
        """Whether step ``step`` goes through the harmonizer.

        Always with ``gh``, ``gh++``, ``gh++exact``; with ``none`` only every ``measure_every``
        steps (to log the geometry), never with ``measure_every`` 0: plain training.
        """
        if self.cfg.harmonizer != "none":
            return True
        return self.cfg.measure_every > 0 and step % self.cfg.measure_every == 0

    def step_context(self) -> StepContext:
        """The :class:`StepContext` of the current step (see :meth:`measures`)."""
        return StepContext(
            step=self.step,
            optimizers=self.optimizers,
            harmonizer=self.harmonizer if self.measures(self.step) else None,
            trade_off=self.cfg.trade_off,
            autocast_dtype=self.autocast_dtype,
            device_type=self.device.type,
            scaler=self.scaler,
            # Under a bottleneck scope the probes can stop at the backbone output (see Harmonizer).
            use_cut=self.cfg.scope == "bottleneck" and self.cfg.strategy == "recombine",
            distributed="auto" if self.world > 1 else "off",
        )

    def train_step(self) -> dict[str, Any]:
        self.mid_step = True
        self._set_lr()
        result = self.model.update(self._batch(), self.step_context())
        record = _step_record(result)
        self._add_method_logs(result.logs)
        loss_cls, loss_align, finite = result.loss_cls, result.loss_align, result.finite
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
                f"harmonizer's weights"
            )
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
        source = (
            evaluate(self.model, self.domains["source_test"], self.device, workers)
            if self.cfg.source_eval_size
            else None
        )
        # What the literature reports on this target: accuracy, or (VisDA-2017) mean per-class accuracy.
        metric = getattr(self.domains["target_test"], "metric", "accuracy")
        headline = target.mean_class_accuracy if metric == "mean_class_accuracy" else target.accuracy
        if headline > self.best["best_target_acc"]:
            self.best = {"best_target_acc": headline, "best_step": self.step}
        n = max(1, self.interval["steps"] - self.interval["skipped_nonfinite"])
        record = {
            "step": self.step,
            "target_acc": headline,
            "target_metric": metric,
            "target_overall_acc": target.accuracy,
            "target_mean_class_acc": target.mean_class_accuracy,
            "target_per_class_acc": target.per_class,
            "source_test_acc": source.accuracy if source else None,
            "source_test_size": len(self.domains["source_test"]) if source else 0,
            **self.best,
            "loss_cls": self.interval["loss_cls"] / n,
            "loss_align": self.interval["loss_align"] / n,
            "skipped_nonfinite": self.interval["skipped_nonfinite"],
            "seconds_per_step": self.interval["seconds"] / max(1, self.interval["steps"]),
            "harmonizer": self.harmonizer.summary(),
            # the method's scalars: mean over the interval's finite values, and the last value
            "method_logs_mean": {
                k: v / self.interval["method_counts"][k] for k, v in self.interval["method_sums"].items()
            },
            "method_logs_last": dict(self.interval["method_last"]),
            "config_hash": self.cfg.outcome_hash(),
            "config": self.cfg.to_dict(),
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
        bar = tqdm(
            total=self.cfg.steps,
            initial=self.step,
            disable=not (self.cfg.progress and self.is_main),
            dynamic_ncols=True,
            desc=f"{self.cfg.method}+{self.cfg.harmonizer} {self.cfg.source}->{self.cfg.target}"
            + (" (resumed)" if resumed else ""),
        )
        recent_angles: list[float] = []
        try:
            with _DeferredInterrupt() as interrupt:
                while self.step < self.cfg.steps:
                    started = time.perf_counter()
                    record = self.train_step()
                    self.interval["seconds"] += time.perf_counter() - started
                    if record.get("measured") and record.get("angle") is not None and math.isfinite(record["angle"]):
                        recent_angles = ([*recent_angles, record["angle"]])[-50:]
                    bar.update(1)
                    if self.step % 10 == 0 or self.step == self.cfg.steps:
                        summary = self.harmonizer.summary()
                        bar.set_postfix(
                            cls=f"{record['loss_cls']:.3f}",
                            align=f"{record['loss_align']:.3f}",
                            acc=f"{last_eval.get('target_acc', math.nan):.3f}",
                            angle=f"{np.mean(recent_angles) if recent_angles else math.nan:.1f}",
                            conflict=f"{summary['conflict_rate']:.2f}",
                            refresh=False,
                        )
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
                raise KeyboardInterrupt(
                    f"stopped during step {self.step}; the last checkpoint "
                    f"{self.out / 'last.pt'} is kept: run the same command again to resume"
                ) from None
            self.save()
            raise KeyboardInterrupt(
                f"interrupted at step {self.step}; checkpoint saved to "
                f"{self.out / 'last.pt'}: run the same command again to resume"
            ) from None
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
        records = read_metrics(self.out)
        last = records[-1]
        return {
            "out": str(self.out),
            "method": self.cfg.method,
            "harmonizer": self.cfg.harmonizer,
            "seed": self.cfg.seed,
            "steps": self.step,
            "last_target_acc": last["target_acc"],
            "best_target_acc": last["best_target_acc"],
            "best_step": last["best_step"],
            "config_hash": self.cfg.outcome_hash(),
        }


def _step_record(result: UpdateResult) -> dict[str, Any]:
    """The per-step CSV fields of a step: the harmonizer's statistics, or weights 1 and empty geometry."""
    if result.stats is None:  # plain training, or nothing to harmonize
        return {"w_align": 1.0, "w_cls": 1.0, "guards": "|".join(result.guards)}
    record = {
        k: v
        for k, v in result.stats.as_dict().items()
        if k in ("cos", "angle", "w_align", "w_cls", "conflict", "measured")
    }
    record["guards"] = "|".join(result.stats.guards)
    return record


def train(cfg: TrainConfig, domains: dict[str, Domain] | None = None) -> dict[str, Any]:
    """Run (or resume, or skip if finished) one configuration; returns its final summary."""
    return Trainer(cfg, domains).run()
