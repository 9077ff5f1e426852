"""The training loop: a method, a harmonizer and two domains wired together.

``train(cfg)`` runs one configuration end to end: endless source/target batches, SGD with the
inverse-decay schedule :math:`lr_i = lr (1 + \\gamma i)^{-0.75}`, evaluation every
``eval_every`` steps (accuracy and per-class accuracy on the target test split; last and best both
kept), a checkpoint after each evaluation, and one JSON line per evaluation holding the resolved
config and the harmonizer's statistics over the interval.  Each line also times the interval's
training steps: ``seconds_per_step`` (wall clock) and ``cpu_seconds_per_step`` (this process's CPU
time, all its threads; loader workers not included).  On a CPU run the CPU time barely moves when
other jobs share the cores, where the wall clock grows with them, so it is the one to compare runs
trained at different times; on a GPU it counts only the host's share of the work.

Run folders, interrupts and resume: the guarantees.

* **One writer per folder.**  Before it writes anything into ``out`` the run takes the folder's
  exclusive OS lock (:class:`~gradharmony.uda.runs.RunFolderLock`; in distributed runs process 0,
  the only writer, takes it) and holds it to the end; a second writer is refused with
  :class:`~gradharmony.uda.runs.RunFolderBusy` naming the holder's PID.  The OS releases the lock
  when the process dies, however it dies.
* **One configuration per folder.**  ``config.yaml`` is written first (atomically), before any
  record, and never rewritten.  A run of another configuration (another outcome hash) into a folder
  holding a ``config.yaml``, a record or a checkpoint is refused with a :class:`ConfigError`;
  ``overwrite`` deletes the folder's run files (under the lock) and starts over.
* **Exact resume.**  Each checkpoint records how far ``metrics.jsonl`` and ``steps.csv`` reached when
  it was written (after the step rows were flushed; the logs are forced to disk before it).  A run
  started again in its folder resumes from the checkpoint, cuts both files back to exactly what it
  covers and redoes the rest; with no checkpoint it starts over (records no checkpoint covers are
  deleted).  So a run killed at any moment -- between a step and its evaluation, between the
  evaluation and the checkpoint, during the checkpoint write (the previous ``last.pt`` stays whole),
  before its first checkpoint -- and started again with the same command ends with the same
  ``metrics.jsonl``, ``steps.csv`` and weights as an uninterrupted run: bit-identical on the same
  machine and software wherever training itself is deterministic (on CPU; on GPU as far as the
  kernels are), except the timing fields ``seconds_per_step`` and ``cpu_seconds_per_step``.
  Each record names the machine it was made on (``machine``: CPU, torch's kernel level and version,
  threads, device), since another machine gives other numbers for the same configuration.
* **A finished run** (a checkpoint at ``steps`` of the same configuration) started again changes no
  file, takes no lock, and returns its stored result with ``already_finished: True``.
* **Ctrl-C, SIGTERM or SIGHUP** finishes the current step (with its evaluation and checkpoint, if due),
  saves a checkpoint and stops; a second signal stops at once and keeps the last checkpoint.
* **Divergence.**  After every step the parameters and floating buffers are checked (one fused norm
  reduction, one device synchronisation): if any is NaN or infinite the run stops at once.  A step
  with a non-finite loss or gradient is skipped; after :data:`MAX_CONSECUTIVE_NONFINITE` in a row the
  run stops.  Either way the step rows up to the failing step are flushed to ``steps.csv``, no
  checkpoint holding a non-finite value is ever written (each save checks the whole state), and
  :class:`TrainingDiverged` names the checkpoint that really exists and its step, or says there is
  none.

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

**Label-free validation** (``validators``, :mod:`gradharmony.uda.engine.validation`): each
evaluation record also holds the validators' scores of the model (``validators``), their sizes and
details (``validation``) and their cost (``validate_seconds``, a timing field like
``seconds_per_step``); the target subset's predictions go to ``predictions/step_<step>.npy``, and
each validator of ``select`` keeps the checkpoint it picks so far (the first evaluation with its
highest score) in ``selected/<validator>/step_<step>.pt``.  These files are written after the
evaluation's record and before the checkpoint that covers it, which records the picks; on resume
the predictions after the checkpoint and the kept files it does not record are deleted, so they
too end as in an uninterrupted run.
"""

from __future__ import annotations

import copy
import math
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.utils.data import Dataset
from tqdm import tqdm

from gradharmony.uda.batches import LoaderBatches, TensorBatches
from gradharmony.uda.config import ConfigError, TrainConfig
from gradharmony.uda.data import Domain
from gradharmony.uda.engine.builders import build_harmonizer, build_model, build_optimizers, resolve_device
from gradharmony.uda.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gradharmony.uda.engine.domains import load_domains
from gradharmony.uda.engine.evaluation import evaluate, num_classes_of
from gradharmony.uda.engine.machine import describe_machine
from gradharmony.uda.engine.process import init_distributed, summary_writer, synchronised_batch_norm
from gradharmony.uda.engine.validation import checkpoint_of_pick, prepare_validation, validate
from gradharmony.uda.methods import Batch, StepContext, UpdateResult
from gradharmony.uda.methods.steps import norms_finite
from gradharmony.uda.runs import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    STEPS_FILE,
    RecordsLost,
    RunFolderBusy,
    RunFolderLock,
    RunLog,
    predictions_path,
    prune_selection_files,
    read_config,
    read_metrics,
    remove_run_files,
    remove_selection_files,
    selected_path,
    write_config,
    write_predictions,
    write_target_index,
)
from gradharmony.uda.selection import label_free_pick
from gradharmony.uda.stopping import DeferredInterrupt

MAX_CONSECUTIVE_NONFINITE = 10  # skipped steps in a row before a run is declared diverged


class TrainingDiverged(RuntimeError):
    """The run diverged: a non-finite parameter or buffer, or too many skipped non-finite steps."""


#: Errors that process 0 may meet while opening the run folder, re-raised by the other processes.
_FOLDER_ERRORS: dict[str, type[Exception]] = {
    "ConfigError": ConfigError,
    "CheckpointError": CheckpointError,
    "RunFolderBusy": RunFolderBusy,
}


def _check_amp(cfg: TrainConfig, out: Path) -> None:
    """Refuse ``amp`` for a new run of a method whose own update does not use it (``supports_amp``),
    before anything is loaded or written.  A run that already has a checkpoint trained in full
    precision under an earlier version that ignored ``amp`` there: it resumes (or is found finished)
    as it was, with a note."""
    from gradharmony.uda.methods import METHODS

    if cfg.amp == "none" or METHODS[cfg.method].supports_amp:
        return
    if (out / CHECKPOINT_FILE).is_file():
        print(
            f"note: amp {cfg.amp} is ignored: {cfg.method} trains in full precision, as this run has so far",
            file=sys.stderr,
        )
        return
    raise ConfigError(
        f"amp {cfg.amp}: {cfg.method} runs its update phases in full precision (mixed precision is supported "
        f"by the single-update methods); set amp none"
    )


class Trainer:
    """One run: build everything from ``cfg``, then :meth:`run` (resuming if a checkpoint exists)."""

    def __init__(self, cfg: TrainConfig, domains: dict[str, Domain] | None = None):
        self.cfg = cfg
        self.out = Path(cfg.out)
        _check_amp(cfg, self.out)
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
        # the source validation split held out (if any) and the samples the validators score
        self.domains, self.validation = prepare_validation(cfg, self.domains)
        for key in ("source", "target"):  # keep training tensors on the device: no loader overhead
            d = self.domains[key]
            if isinstance(d, Domain):
                self.domains[key] = replace(d, images=d.images.to(self.device), labels=d.labels.to(self.device))
        if self.validation is not None:
            for key in ("target", "source"):
                d = getattr(self.validation, key)
                if isinstance(d, Domain):
                    setattr(self.validation, key, replace(d, images=d.images.to(self.device)))
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
        self.picks: dict[str, dict[str, Any]] = {}  # validator of select -> {"step", "score"} kept so far
        self._pending_files: dict[str, Any] | None = None  # what the last evaluation has still to write
        self.interval = self._new_interval()
        self.consecutive_nonfinite = 0
        # From the start of a step to the end of its evaluation and checkpoint: a second signal in
        # there stops at once without saving (the last checkpoint stays the consistent state).
        self.mid_step = False
        self.log = RunLog(self.out)
        self.lock: RunFolderLock | None = None
        self.checkpoint_step: int | None = None  # the step of the checkpoint in out, if any
        self.board = None  # TensorBoard writer: created once the run folder is open

    # ------------------------------------------------------------------ state
    @staticmethod
    def _new_interval() -> dict[str, Any]:
        return {
            "loss_cls": 0.0,
            "loss_align": 0.0,
            "steps": 0,
            "skipped_nonfinite": 0,
            "seconds": 0.0,
            "cpu_seconds": 0.0,
            "method_sums": {},
            "method_counts": {},
            "method_last": {},
        }

    def recorded_config(self) -> dict[str, Any]:
        """The configuration as ``config.yaml``, the records and the checkpoint hold it.

        ``overwrite`` is what this invocation did to the folder, not part of the run: it is recorded
        as false, so that training again from a saved ``config.yaml`` never deletes the run.
        """
        return {**self.cfg.to_dict(), "overwrite": False}

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "config": self.recorded_config(),
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
            "picks": copy.deepcopy(self.picks),
            "interval": copy.deepcopy(self.interval),
            "consecutive_nonfinite": self.consecutive_nonfinite,
            # how far metrics.jsonl and steps.csv reach: exactly the records this state covers
            "records": self.log.coverage() if self.is_main else None,
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
        self.picks = copy.deepcopy(state.get("picks") or {})
        self.interval = {**self._new_interval(), **copy.deepcopy(state["interval"])}
        if "cpu_seconds" not in state["interval"] and self.interval["steps"]:
            self.interval["cpu_seconds"] = None  # a checkpoint from before the CPU clock: this interval has none
        self.consecutive_nonfinite = int(state["consecutive_nonfinite"])

    def save(self) -> None:
        """Write the checkpoint (process 0), covering every record written so far.

        The queued step rows are flushed and both logs forced to disk first, so the coverage the
        checkpoint records is on disk before it.  A state holding a non-finite value is never
        written: :class:`TrainingDiverged` is raised instead.  (Process 0 checks the state it
        writes, without a collective: a save may follow an interrupt that the processes met at
        different steps.  The model itself is checked on every process after every step.)
        """
        if self.is_main:
            self.log.flush_steps()
            if not self._all_finite(self._state_tensors(), collective=False):
                raise self._diverged(
                    f"at step {self.step} the model or optimizer state holds NaN or infinity "
                    f"({self._first_nonfinite() or 'an optimizer buffer'}), so it was not saved"
                )
            self.log.sync()
            save_checkpoint(self.out / CHECKPOINT_FILE, self.state_dict())
            if self.validation is not None:  # the kept picks this checkpoint no longer records
                prune_selection_files(self.out, self.step, self._pick_steps())
        self.checkpoint_step = self.step

    # ------------------------------------------------------------------ the run folder
    def _read_checkpoint(self) -> tuple[dict[str, Any] | None, tuple[int, ...] | None]:
        """The checkpoint in ``out`` (or ``None``), and the file's identity when it was read."""
        path = self.out / CHECKPOINT_FILE
        seen = _file_identity(path)
        return (load_checkpoint(path) if seen is not None else None), seen

    def _is_finished(self, state: dict[str, Any] | None) -> bool:
        """Whether ``state`` is the final checkpoint of this very configuration."""
        return (
            state is not None
            and state.get("config_hash") == self.cfg.outcome_hash()
            and int(state["step"]) >= self.cfg.steps
        )

    def _open_run_folder(self) -> tuple[str, dict[str, Any] | None]:
        """Process 0: make ``out`` this run's, under its lock; ``(kind, checkpoint state)``.

        ``kind`` is ``finished`` (nothing written, no lock taken), ``resume`` (records cut back to
        what the checkpoint covers) or ``fresh`` (records no checkpoint covers deleted, or every run
        file with ``overwrite``).  ``config.yaml`` is written if the folder has none.
        """
        state, seen = (None, None) if self.cfg.overwrite else self._read_checkpoint()
        if self._is_finished(state):  # before the lock, before any write
            return "finished", state
        if not self.cfg.overwrite:  # a folder of another configuration is refused before any write
            self._check_folder_configuration(state)
        self.lock = RunFolderLock(self.out).acquire()
        try:
            if self.cfg.overwrite:
                remove_run_files(self.out)
                self.log.clear()
                state = None
            else:
                if _file_identity(self.out / CHECKPOINT_FILE) != seen:  # changed before we held the lock
                    state, _ = self._read_checkpoint()
                self._check_folder_configuration(state)  # again: another writer may have come and gone
                if self._is_finished(state):
                    self._release_lock()
                    return "finished", state
                if state is None:
                    self.log.clear()
                    remove_selection_files(self.out)
                else:
                    self._restore_records(state)
                    prune_selection_files(self.out, int(state["step"]), _pick_steps(state.get("picks")))
            if not (self.out / CONFIG_FILE).exists():
                write_config(self.out, self.recorded_config())
        except BaseException:
            self._release_lock()
            raise
        return ("resume" if state is not None else "fresh"), state

    def _check_folder_configuration(self, state: dict[str, Any] | None) -> None:
        """Refuse a folder that holds a checkpoint, ``config.yaml`` or records of another configuration."""
        ours = self.cfg.outcome_hash()
        how = "choose another --out, or pass --overwrite to delete its records and start over"
        if state is not None:
            if state.get("config_hash") != ours:
                raise ConfigError(
                    f"{self.out} holds a run with a different configuration (see {self.out / CONFIG_FILE}); {how}"
                )
            return
        if (self.out / CONFIG_FILE).exists():
            try:
                theirs = TrainConfig.from_dict(read_config(self.out)).outcome_hash()
            except (ValueError, TypeError, yaml.YAMLError) as e:
                raise ConfigError(
                    f"{self.out} holds a {CONFIG_FILE} that is not a valid configuration ({e}); {how}"
                ) from None
            if theirs != ours:
                raise ConfigError(
                    f"{self.out} holds a run with a different configuration (see "
                    f"{self.out / CONFIG_FILE}; no checkpoint yet); {how}"
                )
            return
        records = [name for name in (METRICS_FILE, STEPS_FILE) if (self.out / name).exists()]
        if records:
            raise ConfigError(
                f"{self.out} holds run records ({', '.join(records)}) but no {CONFIG_FILE}: they may "
                f"belong to another configuration; {how}"
            )

    def _restore_records(self, state: dict[str, Any]) -> None:
        """Cut ``metrics.jsonl`` and ``steps.csv`` back to exactly what the checkpoint covers."""
        try:
            if state.get("records") is None:  # a checkpoint of a version that did not record it
                self.log.restore_to_step(int(state["step"]))
            else:
                self.log.restore(state["records"])
        except RecordsLost as e:
            raise ConfigError(
                f"{e}, so the run cannot be resumed exactly; pass --overwrite to start it over, or choose another --out"
            ) from None

    def _open(self) -> tuple[str, dict[str, Any] | None]:
        """Open the run folder (process 0) and tell every process what it found."""
        if self.world == 1:
            return self._open_run_folder()
        if self.is_main:
            try:
                kind, state = self._open_run_folder()
            except Exception as e:
                dist.broadcast_object_list([("error", type(e).__name__, str(e))], src=0)
                raise
            dist.broadcast_object_list([(kind, None, None)], src=0)
            return kind, state
        message: list[Any] = [None]
        dist.broadcast_object_list(message, src=0)
        kind, error, text = message[0]
        if kind == "error":
            raise _FOLDER_ERRORS.get(error, RuntimeError)(f"process 0: {text}")
        return kind, (load_checkpoint(self.out / CHECKPOINT_FILE) if kind != "fresh" else None)

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ------------------------------------------------------------------ finiteness
    def _model_tensors(self) -> list[torch.Tensor]:
        """Every parameter and floating buffer of the model (what a step may make non-finite)."""
        return [*self.model.parameters(), *(b for b in self.model.buffers() if b.is_floating_point())]

    def _state_tensors(self) -> list[torch.Tensor]:
        """The model's tensors and the optimizers' floating state (what a checkpoint holds)."""
        tensors = self._model_tensors()
        for optimizer in self.optimizers.values():
            for values in optimizer.state.values():
                tensors += [v for v in values.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
        return tensors

    def _all_finite(self, tensors: list[torch.Tensor], collective: bool = True) -> bool:
        """Whether every value of ``tensors`` is finite (on every process, if ``collective``).

        The fast test (:func:`~gradharmony.uda.methods.steps.norms_finite`) costs one device
        synchronisation; only when it fails (a non-finite value, or a norm that overflowed) does the
        exact one run.
        """
        if not tensors:
            return True
        for test in (norms_finite, _values_finite):
            finite = test(tensors)
            if collective and self.world > 1:
                finite = finite.to(torch.float32)
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if bool(finite.item()):
                return True
        return False

    def _first_nonfinite(self) -> str | None:
        """The name of the first parameter or buffer holding NaN or infinity (on this process)."""
        for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return name
        return None

    def _checkpoint_phrase(self) -> str:
        if self.checkpoint_step is None:
            return "there is no checkpoint (none was written before this)"
        return f"the last checkpoint, of step {self.checkpoint_step}, is {self.out / CHECKPOINT_FILE}"

    def _diverged(self, what: str) -> TrainingDiverged:
        """The error that ends a diverged run, after its step rows are flushed to ``steps.csv``."""
        if self.is_main:
            self.log.flush_steps()
        return TrainingDiverged(
            f"{what}; the rows of the steps up to it are in {self.out / STEPS_FILE}, and "
            f"{self._checkpoint_phrase()}. Lower --lr or --trade-off, or set --max-weight to cap "
            f"the harmonizer's weights, then train into another --out (or pass --overwrite)"
        )

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
            # Under a scope above the backbone the probes can stop at its output (see Harmonizer).
            use_cut=self.cfg.scope in ("bottleneck", "heads") and self.cfg.strategy == "recombine",
            distributed="auto" if self.world > 1 else "off",
        )

    def train_step(self) -> dict[str, Any]:
        """One training step: update, log its row, check that the model stayed finite."""
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
            _add_guard(record, "skipped_step")
        state_finite = self._all_finite(self._model_tensors())
        if not state_finite:
            _add_guard(record, "nonfinite_state")
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
        if not state_finite:
            where = self._first_nonfinite()
            raise self._diverged(
                f"step {self.step - 1} made the model non-finite ("
                + (f"{where} holds NaN or infinity" if where else "on another process")
                + "): the run stopped at that step"
            )
        if self.consecutive_nonfinite >= MAX_CONSECUTIVE_NONFINITE:
            raise self._diverged(
                f"{MAX_CONSECUTIVE_NONFINITE} consecutive steps with non-finite losses or gradients (the "
                f"last at step {self.step - 1}); they were skipped"
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
            "cpu_seconds_per_step": (
                None
                if self.interval["cpu_seconds"] is None
                else self.interval["cpu_seconds"] / max(1, self.interval["steps"])
            ),
            "machine": describe_machine(self.device),
            "harmonizer": self.harmonizer.summary(),
            # the method's scalars: mean over the interval's finite values, and the last value
            "method_logs_mean": {
                k: v / self.interval["method_counts"][k] for k, v in self.interval["method_sums"].items()
            },
            "method_logs_last": dict(self.interval["method_last"]),
            "config_hash": self.cfg.outcome_hash(),
            "config": self.recorded_config(),
        }
        if self.validation is not None:
            record.update(self._validation_fields(headline))
        self.harmonizer.reset_summary()
        self.interval = self._new_interval()
        return record

    # ------------------------------------------------------------------ label-free validation
    def _validation_fields(self, target_acc: float) -> dict[str, Any]:
        """The validators' scores of the model now, and the picks of ``select`` updated with them.

        The predictions and any new pick's checkpoint are written by :meth:`write_validation_files`
        once the record is in ``metrics.jsonl``.
        """
        result = validate(self.model, self.validation, self.device, self.cfg.loader_workers)
        improved = []
        for name in self.cfg.select:
            score = target_acc if name == "oracle" else result.scores.get(name, math.nan)
            kept = self.picks.get(name)
            if math.isfinite(score) and (kept is None or score > kept["score"]):
                self.picks[name] = {"step": self.step, "score": score}
                improved.append(name)
        self._pending_files = {"step": self.step, "probs": result.probs, "improved": improved}
        fields: dict[str, Any] = {
            "validators": result.scores,
            "validation": {
                **result.details,
                "predictions": predictions_path(self.out, self.step).relative_to(self.out).as_posix(),
            },
            "validate_seconds": result.seconds,
        }
        if self.cfg.select:
            fields["selected"] = self._pick_steps()
        return fields

    def _pick_steps(self) -> dict[str, int]:
        return _pick_steps(self.picks)

    def write_validation_files(self) -> None:
        """Write the last evaluation's predictions and the checkpoints of the picks it improved (atomically)."""
        pending, self._pending_files = self._pending_files, None
        if pending is None:
            return
        step = pending["step"]
        write_target_index(self.out, self.validation.target_index.numpy())
        write_predictions(self.out, step, pending["probs"])
        if pending["improved"]:
            state = checkpoint_of_pick(self.model, self.recorded_config(), self.cfg.outcome_hash(), step)
            for name in pending["improved"]:
                path = selected_path(self.out, name, step)
                path.parent.mkdir(parents=True, exist_ok=True)
                save_checkpoint(path, {**state, "validator": name, "score": self.picks[name]["score"]})

    def run(self) -> dict[str, Any]:
        """Train to ``cfg.steps`` (resuming if possible); returns the final summary."""
        try:
            return self._run()
        finally:
            self._release_lock()
            if self.board is not None:
                self.board.close()
            if self._owns_group:
                dist.destroy_process_group()

    def _run(self) -> dict[str, Any]:
        kind, state = self._open()  # every process sees the same checkpoint (or none)
        if state is not None:
            self.load_state_dict(state)
            self.checkpoint_step = self.step
        if kind == "finished":
            return self.final_summary(already_finished=True, metrics_records=_covered_metrics(state))
        resumed = kind == "resume"
        if self.cfg.tensorboard and self.is_main:
            self.board = summary_writer(self.cfg.tensorboard)
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
            with DeferredInterrupt() as interrupt:
                while self.step < self.cfg.steps:
                    started, started_cpu = time.perf_counter(), time.process_time()
                    record = self.train_step()
                    self.interval["seconds"] += time.perf_counter() - started
                    if self.interval["cpu_seconds"] is not None:
                        self.interval["cpu_seconds"] += time.process_time() - started_cpu
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
                        self.write_validation_files()
                        self._board_evaluation(last_eval)
                    if self.step % checkpoint_every == 0 or self.step == self.cfg.steps:
                        self.save()
                    self.mid_step = False
                    if interrupt.requested and self.step < self.cfg.steps:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            if self.mid_step:  # a second signal stopped a step half-way: keep the last consistent checkpoint
                if self.checkpoint_step is None:
                    kept = "no checkpoint was written yet: the same command starts the run over"
                else:
                    kept = f"{self._checkpoint_phrase()} and is kept: run the same command again to resume"
                raise KeyboardInterrupt(f"stopped at once after step {self.step}; {kept}") from None
            if self.checkpoint_step != self.step:
                self.save()
            raise KeyboardInterrupt(
                f"interrupted at step {self.step}; checkpoint saved to "
                f"{self.out / CHECKPOINT_FILE}: run the same command again to resume"
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
        for key, value in record.get("validators", {}).items():
            if math.isfinite(value):
                self.board.add_scalar(f"validators/{key}", value, record["step"])
        self.board.flush()

    def final_summary(self, already_finished: bool = False, metrics_records: int | None = None) -> dict[str, Any]:
        """The run's result, from its last evaluation record (of the first ``metrics_records``).

        ``already_finished``: the run was finished before this call, which changed nothing.
        """
        records = read_metrics(self.out) if (self.out / METRICS_FILE).exists() else []
        if metrics_records is not None:
            records = records[:metrics_records]
        if not records:
            raise ConfigError(
                f"{self.out} holds a finished run's checkpoint but not its evaluation records "
                f"({self.out / METRICS_FILE}); pass --overwrite to train it again, or choose another --out"
            )
        last = records[-1]
        pick = label_free_pick(records, self.recorded_config())
        return {
            "out": str(self.out),
            "method": self.cfg.method,
            "harmonizer": self.cfg.harmonizer,
            "seed": self.cfg.seed,
            "steps": self.step,
            "last_target_acc": last["target_acc"],
            "best_target_acc": last["best_target_acc"],
            "best_step": last["best_step"],
            "pick": pick,
            "config_hash": self.cfg.outcome_hash(),
            "already_finished": already_finished,
        }


def _file_identity(path: Path) -> tuple[int, ...] | None:
    """What tells a file apart from its replacement (inode, size, modification time), or ``None``."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _pick_steps(picks: dict[str, dict[str, Any]] | None) -> dict[str, int]:
    """``validator -> step`` of the kept picks (as a checkpoint records them)."""
    return {name: int(pick["step"]) for name, pick in (picks or {}).items()}


def _covered_metrics(state: dict[str, Any] | None) -> int | None:
    """How many evaluation records a checkpoint covers (``None``: it does not say)."""
    records = (state or {}).get("records")
    return int(records["metrics_records"]) if records else None


def _values_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A 0-dim tensor: whether every value of ``tensors`` is finite (exact, slower than :func:`norms_finite`)."""
    with torch.no_grad():
        return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


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


def _add_guard(record: dict[str, Any], guard: str) -> None:
    """Append ``guard`` to the step record's ``|``-separated ``guards``."""
    record["guards"] = (record.get("guards", "") + "|" + guard).strip("|")


def train(cfg: TrainConfig, domains: dict[str, Domain] | None = None) -> dict[str, Any]:
    """Run (or resume, or skip if finished) one configuration; returns its final summary."""
    return Trainer(cfg, domains).run()
