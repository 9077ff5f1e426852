r"""CDAN and CDAN+E: conditional domain-adversarial networks (Long et al., 2018).

The discriminator sees the features conditioned on the classifier's predictions
:math:`g = \mathrm{softmax}(C(f))` through the multilinear map
:math:`T_\otimes(f, g) = g \otimes f \in \mathbb{R}^{K d}` (flattened outer product) or, with
``randomized=True``, the randomized multilinear map

.. math:: T_\odot(f, g) = \frac{1}{\sqrt{m}} (R_f^\top f) \odot (R_g^\top g),
          \qquad R_f \in \mathbb{R}^{d\times m},\; R_g \in \mathbb{R}^{K\times m}
          \text{ fixed, } \sim \mathcal{N}(0, 1),

of dimension :math:`m` = ``randomized_dim`` (the matrices are buffers: saved with the model, never
trained).  With :math:`h_i = T(f_i, g_i)` and the gradient-reversal layer :math:`R_\lambda`:

.. math::
    L_{align} = \tfrac{1}{2}\Big[\tfrac{1}{n_s}\sum_i w_i\,\mathrm{BCE}(D(R_\lambda(h^s_i)), 1)
              + \tfrac{1}{n_t}\sum_j w_j\,\mathrm{BCE}(D(R_\lambda(h^t_j)), 0)\Big].

CDAN: :math:`w = 1`.  CDAN+E (entropy conditioning): :math:`w_i = 1 + e^{-H(g_i)}`, normalised to
mean 1 *within each domain* (the CDAN code divides each domain's weights by their sum; TLlib
normalises over the whole batch instead), with the normalisers held constant.

Detach choices (checked against the CDAN release, which the GH authors' CDAN code is built on,
and TLlib):

* the predictions in the map are detached (both references do it): the discriminator's
  gradient reaches the features only through :math:`f`, not the classifier.  ``detach_predictions=False``
  lets it through :math:`g` too (reversed, like :math:`f`);
* CDAN+E's entropy weights keep their gradient, reversed by the same :math:`R_\lambda`, as in the
  CDAN release (it hooks a reversal on the entropy), so ``align`` reaches the classifier.  TLlib
  detaches them: ``entropy_grad=False``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from gradharmony.uda.methods.base import entropy
from gradharmony.uda.methods.dann import AdversarialMethod, domain_adversarial_loss


class MultilinearMap(nn.Module):
    r""":math:`g \otimes f`, flattened: ``(N, d), (N, K) -> (N, K * d)``."""

    def __init__(self, features_dim: int, num_classes: int):
        super().__init__()
        self.out_features = features_dim * num_classes

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (g.unsqueeze(2) * f.unsqueeze(1)).flatten(1)


class RandomizedMultilinearMap(nn.Module):
    r""":math:`(R_f^\top f) \odot (R_g^\top g) / \sqrt{m}` with fixed Gaussian :math:`R_f, R_g`."""

    def __init__(self, features_dim: int, num_classes: int, output_dim: int = 1024):
        super().__init__()
        self.register_buffer("random_f", torch.randn(features_dim, output_dim))
        self.register_buffer("random_g", torch.randn(num_classes, output_dim))
        self.out_features = output_dim

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (f @ self.random_f) * (g @ self.random_g) / math.sqrt(self.out_features)


def entropy_weights(ent: torch.Tensor, n_source: int) -> torch.Tensor:
    r""":math:`w = 1 + e^{-H}`, divided by its (constant) mean within each domain."""
    w = 1.0 + torch.exp(-ent)
    source, target = w[:n_source], w[n_source:]
    return torch.cat((source / source.detach().mean(), target / target.detach().mean()))


class CDAN(AdversarialMethod):
    r"""CDAN: ``align`` = domain BCE of :math:`D(R_\lambda(T(f, g)))`; ``cls`` = source cross-entropy.

    Gradients (defaults): ``align`` reaches the discriminator, and the backbone and bottleneck
    reversed; not the classifier (detached predictions).  GH++ lead: ``align`` (the authors').
    Scope: backbone + bottleneck + classifier (the authors' CDAN scope).

    Hyper-parameters: ``randomized=False, randomized_dim=1024, detach_predictions=True`` and those
    of DANN (``grl_alpha=10, grl_low=0, grl_high=1, grl_max_steps=None``, ``disc_hidden=1024``, ...).

    Example:
        >>> import torch
        >>> from gradharmony.uda.models import build_backbone
        >>> _ = torch.manual_seed(0)
        >>> method = CDAN(build_backbone("lenet", 1, 28), num_classes=10, max_steps=1000,
        ...               bottleneck_dim=64, randomized=True, randomized_dim=128)
        >>> x_s, x_t, y_s = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
        >>> losses = method.compute_losses(x_s, y_s, x_t, step=200)
        >>> method.map.out_features, method.discriminator.in_features, tuple(losses.features.shape)
        (128, 128, (8, 64))
        >>> bool(losses.align.isfinite()) and losses.align.requires_grad
        True
    """

    name = "cdan"
    default_lead = "align"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        max_steps: int,
        bottleneck_dim: int = 256,
        *,
        randomized: bool = False,
        randomized_dim: int = 1024,
        detach_predictions: bool = True,
        **hparams,
    ):
        super().__init__(backbone, num_classes, max_steps, bottleneck_dim, **hparams)
        self.randomized, self.randomized_dim = randomized, randomized_dim
        self.detach_predictions = detach_predictions
        if randomized:
            self.map: nn.Module = RandomizedMultilinearMap(bottleneck_dim, num_classes, randomized_dim)
        else:
            self.map = MultilinearMap(bottleneck_dim, num_classes)
        self.discriminator = self._discriminator(self.map.out_features)

    def sample_weights(self, logits: torch.Tensor, n_source: int) -> torch.Tensor | None:
        return None

    def alignment(
        self, features: torch.Tensor, logits: torch.Tensor, n_source: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        g = F.softmax(logits, dim=1)
        if self.detach_predictions:
            g = g.detach()
        domain_logits = self.discriminator(self.grl(self.map(features, g)))
        weight = self.sample_weights(logits, n_source)
        loss, accuracy = domain_adversarial_loss(domain_logits, n_source, weight)
        return loss, {"domain_acc": accuracy, "grl_coeff": self.grl.coefficient}


class CDANE(CDAN):
    r"""CDAN+E: CDAN with entropy conditioning, :math:`w_i = 1 + e^{-H(g_i)}` per domain.

    Confident (low-entropy) samples weigh more in the discriminator's loss.  With
    ``entropy_grad=True`` (default, the CDAN release) the weights are differentiated through a
    reversal of the same coefficient, so ``align`` also reaches the classifier; ``False`` detaches
    them (TLlib).  GH++ lead: ``align`` (the authors').  Scope: backbone + bottleneck + classifier.

    Example:
        >>> import torch
        >>> from gradharmony.uda.models import build_backbone
        >>> _ = torch.manual_seed(0)
        >>> method = CDANE(build_backbone("lenet", 1, 28), num_classes=10, max_steps=1000, bottleneck_dim=64)
        >>> x_s, x_t, y_s = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
        >>> losses = method.compute_losses(x_s, y_s, x_t, step=200)
        >>> method.map.out_features, method.name
        (640, 'cdan+e')
        >>> head_grads = torch.autograd.grad(losses.align, list(method.classifier.parameters()))
        >>> all(bool(g.abs().sum() > 0) for g in head_grads)
        True
    """

    name = "cdan+e"
    default_lead = "align"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        max_steps: int,
        bottleneck_dim: int = 256,
        *,
        entropy_grad: bool = True,
        **hparams,
    ):
        super().__init__(backbone, num_classes, max_steps, bottleneck_dim, **hparams)
        self.entropy_grad = entropy_grad

    def sample_weights(self, logits: torch.Tensor, n_source: int) -> torch.Tensor:
        ent = entropy(logits)
        ent = self.grl(ent) if self.entropy_grad else ent.detach()
        return entropy_weights(ent, n_source)
