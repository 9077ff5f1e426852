r"""MCC: Minimum Class Confusion (Jin et al., ECCV 2020).

On the target batch, predictions at temperature :math:`T`, :math:`\hat Y = \mathrm{softmax}(z / T)
\in \mathbb{R}^{n_t \times K}`; sample weights from their entropy,
:math:`w_j = n_t\,(1 + e^{-H(\hat y_j)}) / \sum_{j'} (1 + e^{-H(\hat y_{j'})})` (constant);
the class confusion :math:`M = \hat Y^\top \mathrm{diag}(w)\, \hat Y`, each row normalised to
sum 1 (:math:`\tilde M_{kk'} = M_{kk'} / \sum_{k''} M_{kk''}`), and

.. math:: L_{align} = \frac{1}{K} \sum_{k \neq k'} \tilde M_{kk'} \in [0, 1],

the mean confusion between different classes.  No adversary and no reversal: ``align`` is
minimised by every parameter it reaches (backbone, bottleneck, classifier).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gradharmony.uda.methods.base import Method, entropy


def class_confusion_loss(logits: torch.Tensor, temperature: float = 2.5) -> torch.Tensor:
    """The MCC loss of a batch of (target) logits."""
    batch_size, num_classes = logits.shape
    scaled = logits / temperature
    predictions = F.softmax(scaled, dim=1)
    weight = 1.0 + torch.exp(-entropy(scaled).detach())
    weight = batch_size * weight / weight.sum()
    confusion = (predictions * weight.unsqueeze(1)).t() @ predictions
    confusion = confusion / confusion.sum(dim=1, keepdim=True)
    return (confusion.sum() - confusion.trace()) / num_classes


class MCC(Method):
    r"""MCC: ``align`` = class confusion of the target predictions; ``cls`` = source cross-entropy.

    Gradients: ``align`` reaches backbone, bottleneck and classifier (no other module exists).
    GH++ lead: ``align`` (our choice, the library default: the GH authors' code has no MCC host
    to follow).  Scope: backbone + bottleneck + classifier.

    Hyper-parameters: ``temperature=2.5`` (TLlib).

    Example:
        >>> import torch
        >>> from gradharmony.uda.models import build_backbone
        >>> _ = torch.manual_seed(0)
        >>> method = MCC(build_backbone("lenet", 1, 28), num_classes=10, max_steps=1000, bottleneck_dim=64)
        >>> x_s, x_t, y_s = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
        >>> losses = method.compute_losses(x_s, y_s, x_t, step=0)
        >>> 0.0 <= losses.align.item() <= 1.0
        True
    """

    name = "mcc"
    default_lead = "align"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        max_steps: int,
        bottleneck_dim: int = 256,
        *,
        temperature: float = 2.5,
        **hparams,
    ):
        super().__init__(backbone, num_classes, max_steps, bottleneck_dim, **hparams)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def alignment(
        self, features: torch.Tensor, logits: torch.Tensor, n_source: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        return class_confusion_loss(logits[n_source:], self.temperature), {}
