r"""MDD: Margin Disparity Discrepancy (Zhang et al., ICML 2019).

Besides the classifier :math:`C`, an adversarial head :math:`C'` sees the shared features through
a gradient-reversal layer :math:`R_\lambda`.  With :math:`\hat y = \arg\max C(f)` (no gradient),
:math:`p' = \mathrm{softmax}(C'(R_\lambda(f)))` and the margin :math:`\gamma`:

.. math::
    L_{align} = \gamma\,\frac{1}{n_s}\sum_i \mathrm{CE}(C'(f^s_i), \hat y^s_i)
              \;-\; \frac{1}{n_t}\sum_j \log\big(1 - p'_{\hat y^t_j}(f^t_j)\big)
              \;=\; -\,\widehat{\mathrm{MDD}}_\gamma .

The adversary minimises :math:`L_{align}` (agree with :math:`C` on source, disagree on target:
it maximises the discrepancy); through :math:`R_\lambda` the features receive the reversed
gradient and minimise the discrepancy.  ``logs["mdd"]`` is :math:`-L_{align}`.

:math:`\log(1 - p'_k)` is computed exactly as :math:`\mathrm{logsumexp}_{j\neq k} z_j -
\mathrm{logsumexp}_j z_j` (TLlib adds :math:`10^{-6}` inside the log instead).

Defaults follow TLlib / the MDD release: :math:`\gamma = 4`; the reversal ramps to
:math:`h = 0.1` with :math:`\alpha = 1` over a fixed :math:`N = 1000` steps (not the training
length); both heads are ``Linear - ReLU - Dropout(0.5) - Linear`` of width ``bottleneck_dim``;
the bottleneck has dropout 0.5; bottleneck weights :math:`\sim\mathcal N(0, 0.005^2)`, bias 0.1,
head weights :math:`\sim\mathcal N(0, 0.01^2)`, bias 0.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gradharmony.reversal import GradientReversal
from gradharmony.uda.methods.base import Method
from gradharmony.uda.models.heads import ClassifierHead


def log_one_minus_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    r""":math:`\log(1 - \mathrm{softmax}(z)_k)` per row, for class indices ``index`` (stable)."""
    others = logits.scatter(1, index.unsqueeze(1), float("-inf"))
    return torch.logsumexp(others, dim=1) - torch.logsumexp(logits, dim=1)


def _init_linear(module: nn.Module, std: float, bias: float) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, std)
            nn.init.constant_(layer.bias, bias)


class MDD(Method):
    r"""MDD: ``align`` = :math:`-\widehat{\mathrm{MDD}}_\gamma` through the reversal; ``cls`` = source CE.

    Gradients: ``align`` reaches the adversarial head ``adv_head`` (plainly) and the backbone and
    bottleneck (reversed), never the classifier (its predictions enter only through argmax);
    ``cls`` never reaches ``adv_head``.  GH++ lead: ``align`` (our choice: MDD is adversarial like
    DANN/CDAN, where the authors let alignment lead).  Scope: backbone + bottleneck + classifier;
    ``adv_head`` plays the discriminator's part and stays outside.

    Hyper-parameters: ``margin=4.0, width=None`` (= ``bottleneck_dim``), ``head_dropout=0.5,
    bottleneck_dropout=0.5, grl_alpha=1.0, grl_low=0.0, grl_high=0.1, grl_max_steps=1000``
    (``None``: ``max_steps``).

    Example:
        >>> import torch
        >>> from gradharmony.uda.models import build_backbone
        >>> _ = torch.manual_seed(0)
        >>> method = MDD(build_backbone("lenet", 1, 28), num_classes=10, max_steps=1000, bottleneck_dim=64)
        >>> x_s, x_t, y_s = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
        >>> losses = method.compute_losses(x_s, y_s, x_t, step=500)
        >>> round(losses.logs["mdd"] + losses.logs["transfer_loss"], 6)
        0.0
        >>> round(losses.logs["grl_coeff"], 4)
        0.0245
    """

    name = "mdd"
    default_lead = "align"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        max_steps: int,
        bottleneck_dim: int = 256,
        *,
        margin: float = 4.0,
        width: int | None = None,
        head_dropout: float = 0.5,
        bottleneck_dropout: float = 0.5,
        grl_alpha: float = 1.0,
        grl_low: float = 0.0,
        grl_high: float = 0.1,
        grl_max_steps: int | None = 1000,
        **hparams,
    ):
        super().__init__(
            backbone, num_classes, max_steps, bottleneck_dim, bottleneck_dropout=bottleneck_dropout, **hparams
        )
        self.margin, self.width, self.head_dropout = margin, width, head_dropout
        self.grl_alpha, self.grl_low, self.grl_high = grl_alpha, grl_low, grl_high
        self.grl_max_steps = grl_max_steps
        hidden = width or bottleneck_dim
        self.classifier = ClassifierHead(bottleneck_dim, num_classes, hidden=hidden, dropout=head_dropout)
        self.adv_head = ClassifierHead(bottleneck_dim, num_classes, hidden=hidden, dropout=head_dropout)
        self.grl = GradientReversal(max_steps=grl_max_steps or max_steps, alpha=grl_alpha, low=grl_low, high=grl_high)
        _init_linear(self.bottleneck, std=0.005, bias=0.1)
        _init_linear(self.classifier, std=0.01, bias=0.0)
        _init_linear(self.adv_head, std=0.01, bias=0.0)

    def alignment(
        self, features: torch.Tensor, logits: torch.Tensor, n_source: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        adv_logits = self.adv_head(self.grl(features))
        predictions = logits.detach().argmax(dim=1)
        source_disparity = F.cross_entropy(adv_logits[:n_source], predictions[:n_source])
        target_disparity = -log_one_minus_softmax(adv_logits[n_source:], predictions[n_source:]).mean()
        loss = self.margin * source_disparity + target_disparity
        return loss, {"mdd": -loss, "grl_coeff": self.grl.coefficient}
