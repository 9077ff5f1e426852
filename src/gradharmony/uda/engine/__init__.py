"""The training engine, one job per module.

* :mod:`~gradharmony.uda.engine.loop`: the loop (schedule, interrupts, divergence) and :func:`train`;
* :mod:`~gradharmony.uda.engine.builders`: device, model, harmonizer and optimizers from a config,
  and :func:`load_run` (a trained model from its checkpoint);
* :mod:`~gradharmony.uda.engine.domains`: the four domains of a run;
* :mod:`~gradharmony.uda.engine.evaluation`: accuracy and per-class accuracy;
* :mod:`~gradharmony.uda.engine.checkpoint`: checkpoints written atomically, read safely;
* :mod:`~gradharmony.uda.engine.process`: torch.distributed, synchronised batch norm, TensorBoard.
"""

from gradharmony.uda.engine.builders import (
    LoadedRun,
    build_harmonizer,
    build_model,
    build_optimizers,
    load_run,
    resolve_device,
)
from gradharmony.uda.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from gradharmony.uda.engine.domains import is_image_task, load_domains, load_eval_domain
from gradharmony.uda.engine.evaluation import Evaluation, evaluate
from gradharmony.uda.engine.loop import Trainer, TrainingDiverged, train

__all__ = [
    "CheckpointError",
    "Evaluation",
    "LoadedRun",
    "Trainer",
    "TrainingDiverged",
    "build_harmonizer",
    "build_model",
    "build_optimizers",
    "evaluate",
    "is_image_task",
    "load_checkpoint",
    "load_domains",
    "load_eval_domain",
    "load_run",
    "resolve_device",
    "save_checkpoint",
    "train",
]
