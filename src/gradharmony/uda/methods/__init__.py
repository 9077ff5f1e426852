"""UDA methods: each turns a batch into named losses (``cls``, ``align``) and trains through one
contract, ``method.update(Batch, StepContext) -> UpdateResult``; see :mod:`.base`.  The helpers
that multi-step methods share live in :mod:`.steps`.

Example:
    >>> from gradharmony.uda.models import build_backbone
    >>> sorted(METHODS)
    ['cdan', 'cdan+e', 'dann', 'dwl', 'gvb', 'mcc', 'mcd', 'mdd', 'source_only', 'ssrt']
    >>> method = build_method("dann", build_backbone("lenet", 1, 28), num_classes=10, max_steps=100,
    ...                       grl_alpha=5.0)
    >>> method.name, method.default_lead, method.hparams["grl_alpha"]
    ('dann', 'align', 5.0)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gradharmony.uda.methods.base import Batch, Losses, Method, StepContext, UpdateResult, entropy
from gradharmony.uda.methods.cdan import CDAN, CDANE
from gradharmony.uda.methods.dann import DANN, domain_adversarial_loss
from gradharmony.uda.methods.dwl import DWL
from gradharmony.uda.methods.gvb import GVB
from gradharmony.uda.methods.mcc import MCC, class_confusion_loss
from gradharmony.uda.methods.mcd import MCD, classifier_discrepancy
from gradharmony.uda.methods.mdd import MDD
from gradharmony.uda.methods.source_only import SourceOnly
from gradharmony.uda.methods.ssrt import SSRT

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (SourceOnly, DANN, CDAN, CDANE, MDD, MCC)}
# Multi-step methods (they override Method.update with their phases; same contract).
METHODS.update({cls.name: cls for cls in (MCD, GVB, DWL)})
# SSRT (ViT host; its update adds the safe-training restarts).
METHODS.update({SSRT.name: SSRT})


def build_method(name: str, backbone: nn.Module, num_classes: int, max_steps: int, **hparams: Any) -> Method:
    """The method registered as ``name``, built with ``hparams`` (checked against its defaults)."""
    key = name.lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    cls = METHODS[key]
    accepted = cls.hparam_defaults()
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise TypeError(
            f"unknown hyper-parameter(s) {', '.join(unknown)} for method {key!r}; "
            f"accepted: {', '.join(sorted(accepted))}"
        )
    return cls(backbone, num_classes, max_steps, **hparams)


__all__ = [
    "CDAN",
    "CDANE",
    "DANN",
    "DWL",
    "GVB",
    "MCC",
    "MCD",
    "MDD",
    "METHODS",
    "SSRT",
    "Batch",
    "Losses",
    "Method",
    "SourceOnly",
    "StepContext",
    "UpdateResult",
    "build_method",
    "class_confusion_loss",
    "classifier_discrepancy",
    "domain_adversarial_loss",
    "entropy",
]
