"""gradharmony: Gradient Harmonization (GH, GH++) for unsupervised domain adaptation.

Three lines add GH to any training loop::

    harmonizer = Harmonizer(mode="gh++", scope=model.backbone)
    stats = harmonizer.backward(cls=cls_loss, align=transfer_loss)   # instead of loss.backward()
    optimizer.step()
"""

from gradharmony.harmonize import MODES, HarmonizeResult, harmonize, harmonize_vectors, harmonize_weights
from gradharmony.harmonizer import STRATEGIES, Harmonizer, StepStats
from gradharmony.models.grl import GradientReversal, reverse_gradient

__all__ = [
    "MODES", "STRATEGIES", "GradientReversal", "HarmonizeResult", "Harmonizer", "StepStats",
    "harmonize", "harmonize_vectors", "harmonize_weights", "reverse_gradient",
]
__version__ = "0.1.0"
