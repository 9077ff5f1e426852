"""UDA methods: each turns a batch into named losses (``cls``, ``align``); see :mod:`.base`.

Example:
    >>> from gradharmony.models import build_backbone
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

from gradharmony.methods.base import Losses, Method, UpdateResult, entropy
from gradharmony.methods.cdan import CDAN, CDANE
from gradharmony.methods.dann import DANN, domain_adversarial_loss
from gradharmony.methods.dwl import DWL
from gradharmony.methods.gvb import GVB
from gradharmony.methods.mcc import MCC, class_confusion_loss
from gradharmony.methods.mcd import MCD, classifier_discrepancy
from gradharmony.methods.mdd import MDD
from gradharmony.methods.source_only import SourceOnly
from gradharmony.methods.ssrt import SSRT

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (SourceOnly, DANN, CDAN, CDANE, MDD, MCC)}
# Multi-step methods (they own their update order: Method.update).
METHODS.update({cls.name: cls for cls in (MCD, GVB, DWL)})
# SSRT (ViT host; multi-step for its safe-training restarts).
METHODS.update({SSRT.name: SSRT})


def build_method(name: str, backbone: nn.Module, num_classes: int, max_steps: int,
                 **hparams: Any) -> Method:
    """The method registered as ``name``, built with ``hparams`` (checked against its defaults)."""
    key = name.lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    cls = METHODS[key]
    accepted = cls.hparam_defaults()
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise TypeError(f"unknown hyper-parameter(s) {', '.join(unknown)} for method {key!r}; "
                        f"accepted: {', '.join(sorted(accepted))}")
    return cls(backbone, num_classes, max_steps, **hparams)


__all__ = [
    "CDAN", "CDANE", "DANN", "DWL", "GVB", "MCC", "MCD", "MDD", "METHODS", "Losses", "Method", "SSRT", "SourceOnly",
    "UpdateResult", "build_method", "class_confusion_loss", "classifier_discrepancy", "domain_adversarial_loss",
    "entropy",
]
