"""Target and source accuracy of a model on a domain: overall and per class."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from gradharmony.uda.batches import to_input
from gradharmony.uda.data import Domain
from gradharmony.uda.stopping import leave_stopping_to_the_main_process

EVAL_BATCH = 1000
IMAGE_EVAL_BATCH = 64


@dataclass
class Evaluation:
    accuracy: float
    per_class: list[float]

    @property
    def mean_class_accuracy(self) -> float:
        valid = [a for a in self.per_class if not math.isnan(a)]
        return sum(valid) / len(valid) if valid else math.nan


def num_classes_of(data: Domain | Dataset) -> int:
    return data.num_classes if hasattr(data, "num_classes") else data.dataset.num_classes


def eval_batches(data: Domain | Dataset, workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(inputs, labels)`` batches of ``data`` in order, for evaluation."""
    if isinstance(data, Domain):
        for start in range(0, len(data), EVAL_BATCH):
            yield to_input(data.images[start : start + EVAL_BATCH]), data.labels[start : start + EVAL_BATCH]
    else:
        for images, labels in DataLoader(
            data,
            batch_size=IMAGE_EVAL_BATCH,
            num_workers=workers,
            worker_init_fn=leave_stopping_to_the_main_process if workers else None,
        ):
            yield to_input(images), labels


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Domain | Dataset, device: torch.device, workers: int = 0) -> Evaluation:
    """Accuracy and per-class accuracy of ``model`` on a domain (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    num_classes = num_classes_of(data)
    correct = torch.zeros(num_classes, dtype=torch.long)
    total = torch.zeros(num_classes, dtype=torch.long)
    for inputs, labels in eval_batches(data, workers):
        labels = labels.to(device)
        predictions = model(inputs.to(device)).argmax(dim=1)
        total += torch.bincount(labels, minlength=num_classes).cpu()
        correct += torch.bincount(labels[predictions == labels], minlength=num_classes).cpu()
    model.train(was_training)
    per_class = [c / t if t else math.nan for c, t in zip(correct.tolist(), total.tolist())]
    return Evaluation(accuracy=correct.sum().item() / max(1, total.sum().item()), per_class=per_class)
