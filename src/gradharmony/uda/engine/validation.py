"""Label-free validation during training: the samples scored, the scores, and what is kept of them.

A run whose config names validators (``validators``, :mod:`gradharmony.uda.validators`) scores the
model at every evaluation on two fixed sets of samples, chosen once before training:

* the **target subset**: ``target_val_size`` samples of the target *train* split (default up to
  :data:`~gradharmony.uda.config.DEFAULT_VALIDATION_SIZE`), drawn with a fixed seed that depends on
  nothing but the split, so every run of a target (every method, variant and seed) is scored on
  the same samples and their predictions can be pooled (EnsV); their labels are never read;
* the **source validation split**: with ``source_val_fraction > 0`` that share of the source
  training split is held out before training, stratified by class (each class keeps at least one
  training and one validation sample), with a fixed seed; the model never trains on it.  Up to
  ``source_val_size`` of it are scored.

Image benchmarks score both with the evaluation transforms (no random augmentation).  Validation
runs in evaluation mode under a forked random state, so it changes nothing of training: a run with
validators trains bit for bit the weights of the same run without them.

The scores go into the evaluation record (``validators``, ``validation``, ``validate_seconds``);
the target subset's softmax predictions are stored as float16 under ``<out>/predictions/`` (one
file per evaluation, see :mod:`gradharmony.uda.runs`), and the checkpoints picked by the validators
of ``select`` under ``<out>/selected/``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset, Subset

from gradharmony.uda import validators as V
from gradharmony.uda.batches import to_input
from gradharmony.uda.config import DEFAULT_VALIDATION_SIZE, ConfigError, TrainConfig
from gradharmony.uda.data import Domain
from gradharmony.uda.engine.evaluation import eval_batches, num_classes_of

#: Fixed seeds of the samples scored: the same for every run of a domain, whatever its seed.
SOURCE_VAL_SEED = 3
TARGET_VAL_SEED = 4
#: The order of MixVal's pairs and DEV's folds of its domain-classifier samples.
MIXVAL_SEED = 5
DEV_SEED = 6
#: Domain keys of the training splits read with evaluation transforms (image benchmarks).
EVAL_VIEWS = {"source": "source_eval_view", "target": "target_eval_view"}


def labels_of(data: Domain | Dataset) -> torch.Tensor:
    """The labels of a domain's samples, in order, without reading an image."""
    if isinstance(data, Domain):
        return data.labels.cpu()
    if isinstance(data, Subset):
        return labels_of(data.dataset)[torch.as_tensor(data.indices, dtype=torch.long)]
    targets = getattr(data, "targets", None)
    if targets is None:
        raise ConfigError(
            f"{type(data).__name__} does not list its labels (targets): cannot hold out a stratified split"
        )
    return torch.as_tensor(list(targets), dtype=torch.long)


def subset(data: Domain | Dataset, index: torch.Tensor) -> Domain | Dataset:
    """The samples ``index`` of ``data``, in that order."""
    if isinstance(data, Domain):
        index = index.to(data.images.device)
        return replace(data, images=data.images[index], labels=data.labels[index])
    part = Subset(data, index.tolist())
    part.num_classes = num_classes_of(data)
    return part


def stratified_hold_out(labels: torch.Tensor, fraction: float, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, validation)`` indices: ``fraction`` of each class held out, with a fixed seed.

    Each class present gives ``round(fraction * n_c)`` samples, at least one and at most
    ``n_c - 1`` (so it keeps one to train on); a class with a single sample cannot be split, and
    the split is refused (:class:`ConfigError`).  Both index lists are in increasing order.

    Example:
        >>> train, val = stratified_hold_out(torch.tensor([0] * 10 + [1] * 20), 0.1, "source")
        >>> len(train), len(val), sorted(torch.tensor([0] * 10 + [1] * 20)[val].tolist())
        (27, 3, [0, 1, 1])
    """
    generator = torch.Generator().manual_seed(SOURCE_VAL_SEED)
    classes, counts = torch.unique(labels, return_counts=True)
    small = [(int(c), int(n)) for c, n in zip(classes, counts) if n < 2]
    if small:
        shown = ", ".join(f"class {c}: {n}" for c, n in small[:5])
        raise ConfigError(
            f"source_val_fraction {fraction}: the {what} training split ({len(labels)} samples) is too small to "
            f"hold out a stratified validation part ({shown} sample); every class needs at least 2, one to train "
            f"on and one to validate"
        )
    held = []
    for c, n in zip(classes.tolist(), counts.tolist()):
        members = (labels == c).nonzero(as_tuple=True)[0]
        k = min(max(1, round(fraction * n)), n - 1)
        held.append(members[torch.randperm(n, generator=generator)[:k]])
    val = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    return keep.nonzero(as_tuple=True)[0], val


def _sample(n: int, size: int | None, seed: int) -> torch.Tensor:
    """``size`` (default up to :data:`DEFAULT_VALIDATION_SIZE`) of ``range(n)`` drawn with ``seed``, sorted."""
    size = min(n, DEFAULT_VALIDATION_SIZE) if size is None else size
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


@dataclass
class ValidationSet:
    """The samples a run's validators score (see the module's docstring)."""

    validators: tuple[str, ...]
    target: Domain | Dataset
    target_index: torch.Tensor  #: indices of the target subset in the (limited) target train split
    source: Domain | Dataset | None = None  #: the scored part of the source validation split
    source_held_out: int = 0  #: size of the whole held-out split

    def describe(self) -> dict[str, int]:
        return {
            "target_size": len(self.target),
            "source_size": len(self.source) if self.source is not None else 0,
            "source_held_out": self.source_held_out,
        }


def prepare_validation(
    cfg: TrainConfig, domains: dict[str, Domain | Dataset]
) -> tuple[dict[str, Domain | Dataset], ValidationSet | None]:
    """The run's domains with the source validation split held out, and what the validators score.

    Returns ``(domains, None)`` unchanged when the config computes no validator and holds nothing
    out.  Sizes that do not fit (a target subset larger than the target train split, a source
    split too small to hold out from, a source validation size larger than the held-out part) are
    a :class:`ConfigError`, raised before the run writes anything.
    """
    if not cfg.validators and cfg.source_val_fraction == 0:
        return domains, None
    domains = dict(domains)
    source_val, held_out = None, 0
    if cfg.source_val_fraction > 0:
        train_index, val_index = stratified_hold_out(
            labels_of(domains["source"]), cfg.source_val_fraction, repr(cfg.source)
        )
        view = domains.get(EVAL_VIEWS["source"], domains["source"])
        domains["source"] = subset(domains["source"], train_index)
        held_out = len(val_index)
        if cfg.source_val_size is not None and cfg.source_val_size > held_out:
            raise ConfigError(
                f"source_val_size {cfg.source_val_size} is larger than the source validation split: "
                f"source_val_fraction {cfg.source_val_fraction} of {len(train_index) + held_out} samples holds "
                f"{held_out}"
            )
        source_val = subset(view, val_index[_sample(held_out, cfg.source_val_size, SOURCE_VAL_SEED)])
    target = domains.get(EVAL_VIEWS["target"], domains["target"])
    n = len(target)
    if cfg.target_val_size is not None and cfg.target_val_size > n:
        raise ConfigError(
            f"target_val_size {cfg.target_val_size} is larger than the target train split of {cfg.target!r} "
            f"({n} samples)"
        )
    if n < 2:
        raise ConfigError(f"the target train split of {cfg.target!r} has {n} sample(s); validation needs at least 2")
    index = _sample(n, cfg.target_val_size, TARGET_VAL_SEED)
    validation = ValidationSet(
        validators=tuple(cfg.validators),
        target=subset(target, index),
        target_index=index,
        source=source_val,
        source_held_out=held_out,
    )
    return domains, validation


class _LazyInputs:
    """The inputs of a Dataset, read when indexed (MixVal's mixtures of image-benchmark samples)."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        return torch.stack([to_input(torch.as_tensor(self.data[i][0])) for i in index.tolist()])


@torch.no_grad()
def _outputs(
    model: torch.nn.Module, data: Domain | Dataset, device: torch.device, workers: int, features: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``(logits, features or None, labels)`` of ``data`` on the CPU; features are the bottleneck output."""
    captured: list[torch.Tensor] = []
    hook = None
    bottleneck = getattr(model, "bottleneck", None)
    if features and isinstance(bottleneck, torch.nn.Module):
        hook = bottleneck.register_forward_hook(lambda module, args, out: captured.append(out))
    logits, feats, labels = [], [], []
    try:
        for inputs, batch_labels in eval_batches(data, workers):
            inputs = inputs.to(device)
            captured.clear()
            logits.append(model(inputs).float().cpu())
            if features:
                # the bottleneck seen once in the forward: its output; otherwise ask the model
                out = captured[0] if len(captured) == 1 else model.features(inputs)
                feats.append(out.float().flatten(1).cpu())
            labels.append(batch_labels.cpu())
    finally:
        if hook is not None:
            hook.remove()
    return torch.cat(logits), (torch.cat(feats) if features else None), torch.cat(labels)


@dataclass
class ValidationResult:
    """One evaluation's validation: the scores, details, the target subset's predictions, the time taken."""

    scores: dict[str, float]
    details: dict[str, Any]
    probs: np.ndarray  #: float16 [target_size, num_classes] softmax predictions on the target subset
    seconds: float


def validate(
    model: torch.nn.Module, validation: ValidationSet, device: torch.device, workers: int = 0
) -> ValidationResult:
    """Score ``model`` with the run's validators on its fixed samples (evaluation mode, random state kept).

    The global random state (CPU, and the model's CUDA device) is forked: a DataLoader or anything
    else drawing from it here leaves training's stream untouched.
    """
    started = time.perf_counter()
    names = set(validation.validators)
    devices = [device] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            result = _scores(model, validation, names, device, workers)
    finally:
        model.train(was_training)
    scores, details, probs = result
    return ValidationResult(
        scores={name: scores[name] for name in V.VALIDATORS if name in scores},
        details=details,
        probs=probs.to(torch.float16).numpy(),
        seconds=time.perf_counter() - started,
    )


def _scores(
    model: torch.nn.Module, validation: ValidationSet, names: set[str], device: torch.device, workers: int
) -> tuple[dict[str, float], dict[str, Any], torch.Tensor]:
    logits, target_features, _ = _outputs(model, validation.target, device, workers, features="dev" in names)
    probs = F.softmax(logits.double(), dim=1)
    scores: dict[str, float] = {}
    details: dict[str, Any] = validation.describe()
    if not bool(torch.isfinite(probs).all()):  # a model whose outputs overflowed: nothing to score
        return {name: math.nan for name in names}, details, probs
    if "entropy" in names:
        scores["entropy"] = V.entropy_score(probs)
    if "im" in names:
        scores["im"] = V.im_score(probs)
    if "bnm" in names:
        scores["bnm"] = V.bnm_score(probs)
    if "snd" in names:
        scores["snd"] = V.snd_score(probs)
    if "mixval" in names:
        target = validation.target
        inputs = to_input(target.images) if isinstance(target, Domain) else _LazyInputs(target)

        def predict(x: torch.Tensor) -> torch.Tensor:
            return model(x.to(device)).float()

        mix = V.mixval_scores(
            predict, inputs, probs.argmax(dim=1), generator=torch.Generator().manual_seed(MIXVAL_SEED)
        )
        scores["mixval"] = mix.score
        details.update(
            mixval_intra=mix.intra,
            mixval_inter=mix.inter,
            mixval_intra_pairs=mix.intra_pairs,
            mixval_inter_pairs=mix.inter_pairs,
        )
    if validation.source is not None and names & set(V.SOURCE_VALIDATORS):
        source_logits, source_features, labels = _outputs(
            model, validation.source, device, workers, features="dev" in names
        )
        if "source_val" in names:
            scores["source_val"] = V.accuracy(source_logits, labels)
        if "dev" in names:
            losses = F.cross_entropy(source_logits.double(), labels, reduction="none")
            generator = torch.Generator().manual_seed(DEV_SEED)
            scores["dev"] = V.dev_score(source_features, losses, target_features, generator)
    return scores, details, probs


def checkpoint_of_pick(model: torch.nn.Module, config: dict[str, Any], config_hash: str, step: int) -> dict[str, Any]:
    """What a kept pick holds: the model's weights and what ``gradharmony eval`` needs to rebuild it."""
    return {"step": step, "config": config, "config_hash": config_hash, "model": model.state_dict()}
