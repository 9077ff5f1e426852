r"""Source only: the classifier trained on labelled source data, no alignment.

.. math:: L_{cls} = \frac{1}{n_s} \sum_{i} \mathrm{CE}(C(F(x^s_i)), y^s_i), \qquad L_{align} = 0.

The target batch still goes through the forward (its features are returned, and batch-norm sees
both domains, as for the adaptation methods), but no loss depends on it.  ``align`` is a zero
tensor that does not require grad, so a harmonizer sees a zero alignment gradient (its
``tiny_norm`` guard then applies weights 1: plain training).
"""

from __future__ import annotations

import torch

from gradharmony.uda.methods.base import Method


class SourceOnly(Method):
    r"""Source-only baseline: ``cls`` = source cross-entropy, ``align`` = 0 (no grad).

    GH++ lead: ``align`` (irrelevant: the two losses never conflict).  Scope: backbone +
    bottleneck + classifier.

    Example:
        >>> import torch
        >>> from gradharmony.uda.models import build_backbone
        >>> _ = torch.manual_seed(0)
        >>> method = SourceOnly(build_backbone("lenet", 1, 28), num_classes=10, max_steps=100)
        >>> x_s, x_t, y_s = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
        >>> losses = method.compute_losses(x_s, y_s, x_t, step=0)
        >>> losses.align.item(), losses.align.requires_grad, tuple(losses.features.shape)
        (0.0, False, (8, 256))
    """

    name = "source_only"
    default_lead = "align"

    def alignment(
        self, features: torch.Tensor, logits: torch.Tensor, n_source: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return torch.zeros((), dtype=logits.dtype, device=logits.device), {}
