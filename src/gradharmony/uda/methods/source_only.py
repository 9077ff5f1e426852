r"""Source only: the classifier trained on labelled source data, no alignment.

.. math:: L_{cls} = \frac{1}{n_s} \sum_{i} \mathrm{CE}(C(F(x^s_i)), y^s_i), \qquad L_{align} = 0.

By default the target batch still goes through the forward (its features are returned, and
batch-norm sees both domains, as for the adaptation methods), but no loss depends on it.  With
``forward_target=False`` only the source batch is forwarded, so batch-norm statistics are the
source's alone (TLlib's ``erm.py``; a stricter source-only baseline, since batch-norm statistics
that include target data already adapt the model a little).  With ``use_bottleneck=False`` the
classifier sits directly on the backbone (TLlib's ``erm.py`` has no bottleneck): with the source
batch alone, the bottleneck's batch norm would normalise target features by source statistics.  ``align`` is a zero
tensor that does not require grad, so a harmonizer sees a zero alignment gradient (its
``tiny_norm`` guard then applies weights 1: plain training).
"""

from __future__ import annotations

import torch

from gradharmony.uda.methods.base import Losses, Method
from gradharmony.uda.models.heads import ClassifierHead


class SourceOnly(Method):
    r"""Source-only baseline: ``cls`` = source cross-entropy, ``align`` = 0 (no grad).

    GH++ lead: ``align`` (irrelevant: the two losses never conflict).  Scope: backbone +
    bottleneck + classifier.

    Hyper-parameters: ``forward_target=True`` (``False``: forward the source batch alone),
    ``use_bottleneck=True`` (``False``: no bottleneck; the features are the backbone's output).

    Example:
        >>> import torch
        >>> from gradharmony.uda.models import build_backbone
        >>> _ = torch.manual_seed(0)
        >>> method = SourceOnly(build_backbone("lenet", 1, 28), num_classes=10, max_steps=100)
        >>> x_s, x_t, y_s = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
        >>> losses = method.compute_losses(x_s, y_s, x_t, step=0)
        >>> losses.align.item(), losses.align.requires_grad, tuple(losses.features.shape)
        (0.0, False, (8, 256))
        >>> strict = SourceOnly(build_backbone("lenet", 1, 28), num_classes=10, max_steps=100, forward_target=False)
        >>> tuple(strict.compute_losses(x_s, y_s, x_t, step=0).features.shape)
        (4, 256)
        >>> erm = SourceOnly(build_backbone("lenet", 1, 28), 10, 100, forward_target=False, use_bottleneck=False)
        >>> tuple(erm.compute_losses(x_s, y_s, x_t, step=0).features.shape), erm.classifier
        ((4, 800), ClassifierHead(
          (0): Linear(in_features=800, out_features=10, bias=True)
        ))
    """

    name = "source_only"
    default_lead = "align"

    def __init__(
        self,
        backbone: torch.nn.Module,
        num_classes: int,
        max_steps: int,
        bottleneck_dim: int = 256,
        *,
        forward_target: bool = True,
        use_bottleneck: bool = True,
        **base_hparams,
    ):
        super().__init__(backbone, num_classes, max_steps, bottleneck_dim, **base_hparams)
        self.forward_target, self.use_bottleneck = forward_target, use_bottleneck
        if not use_bottleneck:
            self.bottleneck = torch.nn.Identity()
            self.classifier = ClassifierHead(backbone.out_features, num_classes)

    def compute_losses(self, x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor, step: int) -> Losses:
        """The base class's forward, of the source batch alone when ``forward_target`` is off."""
        return super().compute_losses(x_s, y_s, x_t if self.forward_target else x_t[:0], step)

    def alignment(
        self, features: torch.Tensor, logits: torch.Tensor, n_source: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return torch.zeros((), dtype=logits.dtype, device=logits.device), {}
