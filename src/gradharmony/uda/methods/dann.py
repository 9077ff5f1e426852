r"""DANN: domain-adversarial training (Ganin et al., 2016).

A discriminator :math:`D` tells source features (label 1) from target features (label 0); the
features reach it through a gradient-reversal layer :math:`R_\lambda`, so one loss trains
:math:`D` to discriminate and the feature extractor to confuse it:

.. math::
    L_{align} = \tfrac{1}{2}\Big[\tfrac{1}{n_s}\sum_i \mathrm{BCE}(D(R_\lambda(f^s_i)), 1)
              + \tfrac{1}{n_t}\sum_j \mathrm{BCE}(D(R_\lambda(f^t_j)), 0)\Big],

with :math:`f = \mathrm{bottleneck}(\mathrm{backbone}(x))`.  :math:`R_\lambda` is the identity
forward and multiplies the gradient by :math:`-\lambda(i)` backward, with the warm-start ramp
:math:`\lambda(i) = 2(h-l)/(1+e^{-\alpha i/N}) - (h-l) + l`, by default :math:`\alpha=10,
l=0, h=1, N` = training steps (the DANN paper's schedule).  TLlib's ``DomainAdversarialLoss``
ramps more slowly, :math:`\alpha=1, N=1000` (``grl_alpha=1, grl_max_steps=1000``: its digit recipe).
The two domain means are averaged, so unequal batch sizes weigh the domains equally.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gradharmony.reversal import GradientReversal
from gradharmony.uda.methods.base import Method
from gradharmony.uda.models.heads import DomainDiscriminator


def domain_adversarial_loss(
    domain_logits: torch.Tensor, n_source: int, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(loss, accuracy)`` of domain logits for ``n_source`` source rows then target rows.

    ``loss`` is the mean of the per-domain means of :math:`w_i\,\mathrm{BCE}_i` (source label 1,
    target label 0; ``weight`` defaults to 1); ``accuracy`` is the discriminator's accuracy.
    """
    labels = torch.zeros_like(domain_logits)
    labels[:n_source] = 1.0
    per_sample = F.binary_cross_entropy_with_logits(domain_logits, labels, reduction="none")
    if weight is not None:
        per_sample = per_sample * weight
    loss = 0.5 * (per_sample[:n_source].mean() + per_sample[n_source:].mean())
    accuracy = ((domain_logits > 0).to(labels.dtype) == labels).float().mean()
    return loss, accuracy


class AdversarialMethod(Method):
    """Shared plumbing of methods with a gradient-reversal layer (DANN, CDAN)."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        max_steps: int,
        bottleneck_dim: int = 256,
        *,
        grl_alpha: float = 10.0,
        grl_low: float = 0.0,
        grl_high: float = 1.0,
        grl_max_steps: int | None = None,
        disc_hidden: int = 1024,
        disc_batch_norm: bool = True,
        disc_dropout: float = 0.0,
        **base_hparams,
    ):
        super().__init__(backbone, num_classes, max_steps, bottleneck_dim, **base_hparams)
        self.grl_alpha, self.grl_low, self.grl_high = grl_alpha, grl_low, grl_high
        self.grl_max_steps = grl_max_steps
        self.disc_hidden, self.disc_batch_norm, self.disc_dropout = disc_hidden, disc_batch_norm, disc_dropout
        self.grl = GradientReversal(max_steps=grl_max_steps or max_steps, alpha=grl_alpha, low=grl_low, high=grl_high)

    def _discriminator(self, in_features: int) -> DomainDiscriminator:
        return DomainDiscriminator(
            in_features, hidden=self.disc_hidden, batch_norm=self.disc_batch_norm, dropout=self.disc_dropout
        )


class DANN(AdversarialMethod):
    r"""DANN: ``align`` = domain BCE of :math:`D(R_\lambda(f))`; ``cls`` = source cross-entropy.

    Gradients: ``align`` reaches the discriminator (plainly) and the backbone and bottleneck
    (reversed, times :math:`\lambda`), never the classifier; ``cls`` never reaches the
    discriminator.  GH++ lead: ``align`` (as in the authors' code).  Scope: backbone + bottleneck
    + classifier (the authors' scope; the classifier gets no alignment gradient, so it only adds
    to :math:`\|g_c\|`).

    Hyper-parameters: ``grl_alpha=10, grl_low=0, grl_high=1, grl_max_steps=None`` (= ``max_steps``);
    discriminator ``disc_hidden=1024, disc_batch_norm=True, disc_dropout=0``.

    Example:
        >>> import torch
        >>> from gradharmony.uda.models import build_backbone
        >>> _ = torch.manual_seed(0)
        >>> method = DANN(build_backbone("lenet", 1, 28), num_classes=10, max_steps=1000)
        >>> x_s, x_t, y_s = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
        >>> losses = method.compute_losses(x_s, y_s, x_t, step=500)
        >>> method.grl.step, round(losses.logs["grl_coeff"], 4)
        (500, 0.9866)
        >>> sorted(losses.logs)
        ['cls_loss', 'domain_acc', 'grl_coeff', 'source_acc', 'transfer_loss']
    """

    name = "dann"
    default_lead = "align"

    def __init__(self, backbone: nn.Module, num_classes: int, max_steps: int, bottleneck_dim: int = 256, **hparams):
        super().__init__(backbone, num_classes, max_steps, bottleneck_dim, **hparams)
        self.discriminator = self._discriminator(bottleneck_dim)

    def alignment(
        self, features: torch.Tensor, logits: torch.Tensor, n_source: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        loss, accuracy = domain_adversarial_loss(self.discriminator(self.grl(features)), n_source)
        return loss, {"domain_acc": accuracy, "grl_coeff": self.grl.coefficient}
