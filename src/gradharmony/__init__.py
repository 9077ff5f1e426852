"""gradharmony: Gradient Harmonization (GH, GH++) for any PyTorch training loop.

Three lines add GH to a loop that used to call ``loss.backward()``::

    harmonizer = Harmonizer(mode="gh++", scope=model.backbone)
    stats = harmonizer.backward(cls=cls_loss, align=transfer_loss)   # instead of loss.backward()
    optimizer.step()

This package is the plug-in and needs torch alone: the maths (:mod:`gradharmony.harmonize`), the
harmonizer (:mod:`gradharmony.harmonizer`), gradient reversal (:mod:`gradharmony.reversal`), the
distributed helpers and the statistics.  The UDA toolkit built on it (methods, models, data, the
training engine, sweeps, reports, the ``gradharmony`` command) is :mod:`gradharmony.uda`, installed
with ``pip install 'gradharmony[uda]'``; ``import gradharmony`` never imports it.
"""

from gradharmony import _legacy
from gradharmony.harmonize import (
    MODES,
    GramianResult,
    HarmonizeResult,
    harmonize,
    harmonize_gramian,
    harmonize_vectors,
    harmonize_weights,
)
from gradharmony.harmonizer import STRATEGIES, Harmonizer, LossesStats, StepStats
from gradharmony.reversal import GradientReversal, reverse_gradient

_legacy.install()

__all__ = [
    "MODES",
    "STRATEGIES",
    "GradientReversal",
    "GramianResult",
    "HarmonizeResult",
    "Harmonizer",
    "LossesStats",
    "StepStats",
    "harmonize",
    "harmonize_gramian",
    "harmonize_vectors",
    "harmonize_weights",
    "reverse_gradient",
]
__version__ = "0.2.0"
