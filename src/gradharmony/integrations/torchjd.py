r"""GH and GH++ as torchjd weightings and aggregators (``pip install 'gradharmony[torchjd]'``).

`torchjd <https://torchjd.org>`_ weights several losses from the Gramian of their Jacobian.  For two
losses with Gramian

.. math:: G = \begin{pmatrix} \|g_0\|^2 & \langle g_0, g_1\rangle \\
                              \langle g_0, g_1\rangle & \|g_1\|^2 \end{pmatrix}

these weightings return the GH / GH++ weights :math:`(w_0, w_1)` of
:func:`gradharmony.harmonize_weights` (loss 0 in the alignment slot, loss 1 in the
classification slot; GH is symmetric, GH++ is not: ``lead`` names the index that leads).  The update
:math:`w_0 g_0 + w_1 g_1` is then what torchjd's ``losses.backward(weights)`` (autogram) or an
aggregator (autojac) applies.  For two losses GH equals torchjd's ``PCGradWeighting`` (PCGrad's
random order does not matter with two rows); GH++ exists only here.

Unlike :class:`gradharmony.Harmonizer`, torchjd measures the Gramian over the parameters of the
modules given to its engine, and nothing here applies the harmonizer's guards beyond those of
:func:`gradharmony.harmonize` (non-finite and tiny norms give weights 1; ``max_weight`` caps).

Example (autogram):
    >>> import torch
    >>> from torch import nn
    >>> from torchjd.autogram import Engine
    >>> from gradharmony.integrations.torchjd import GHPlusPlusWeighting
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    >>> engine = Engine(model, batch_dim=None)    # before the forward pass: it hooks the modules
    >>> x, y = torch.randn(16, 4), torch.randn(16, 1)
    >>> out = model(x)
    >>> losses = torch.stack([-(out ** 2).mean(), ((out - y) ** 2).mean()])  # (alignment, classification)
    >>> weights = GHPlusPlusWeighting(k=0.5, lead=0)(engine.compute_gramian(losses))
    >>> losses.backward(weights)
    >>> weights.shape, all(p.grad is not None for p in model.parameters())
    (torch.Size([2]), True)
"""

from __future__ import annotations

import torch
from torchjd.aggregation import GramianWeightedAggregator, Weighting

from gradharmony.harmonize import check_k_lead, check_mode, harmonize

__all__ = ["GH", "GHPlusPlus", "GHPlusPlusWeighting", "GHWeighting"]


class GHWeighting(Weighting):
    r"""Gramian of two losses :math:`\to` the GH weights :math:`(1 - d/\|g_0\|^2,\; 1 - d/\|g_1\|^2)` on a conflict.

    Args:
        mode: ``gh`` (default), ``gh++``, ``gh++exact`` or ``none`` (see :mod:`gradharmony.harmonize`).
        k, lead: GH++'s parameters; ``lead`` is the index (0 or 1) of the loss that leads.
        max_weight: optional cap on each weight.

    Example:
        >>> import torch
        >>> GHWeighting()(torch.tensor([[1.0, -0.5], [-0.5, 1.0]]))
        tensor([1.5000, 1.5000])
    """

    def __init__(self, mode: str = "gh", k: float = 0.5, lead: int = 0, max_weight: float | None = None):
        super().__init__()
        if lead not in (0, 1):
            raise ValueError(f"lead must be 0 or 1 (the index of the leading loss), got {lead!r}")
        self.mode = check_mode(mode)
        self.k, self.lead, self.max_weight = k, lead, max_weight
        check_k_lead(k, self._lead_name)

    @property
    def _lead_name(self) -> str:
        return "align" if self.lead == 0 else "cls"

    def forward(self, gramian: torch.Tensor, /) -> torch.Tensor:
        if gramian.shape != (2, 2):
            raise ValueError(f"GH and GH++ weight two losses: expected a 2x2 Gramian, got shape {tuple(gramian.shape)}")
        aa, d, cc = gramian.detach().double().flatten()[[0, 1, 3]].tolist()
        result = harmonize(aa, cc, d, mode=self.mode, k=self.k, lead=self._lead_name, max_weight=self.max_weight)
        return torch.tensor([result.w_align, result.w_cls], dtype=gramian.dtype, device=gramian.device)


class GHPlusPlusWeighting(GHWeighting):
    """GH++ (the authors' angle-only rule; ``exact=True``: the norm-preserving rotation).

    Example:
        >>> import torch
        >>> w = GHPlusPlusWeighting(k=0.5, lead=0)(torch.tensor([[1.0, -0.5], [-0.5, 1.0]]))
        >>> [round(v, 6) for v in w.tolist()]
        [1.261052, 0.738948]
    """

    def __init__(self, k: float = 0.5, lead: int = 0, exact: bool = False, max_weight: float | None = None):
        super().__init__(mode="gh++exact" if exact else "gh++", k=k, lead=lead, max_weight=max_weight)


class GH(GramianWeightedAggregator):
    """GH as a torchjd aggregator (``torchjd.autojac``): a two-row Jacobian to ``w_0 g_0 + w_1 g_1``.

    Example:
        >>> import torch
        >>> GH()(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
        tensor([0.5000, 1.5000])
    """

    def __init__(self, max_weight: float | None = None):
        super().__init__(GHWeighting(mode="gh", max_weight=max_weight))


class GHPlusPlus(GramianWeightedAggregator):
    """GH++ as a torchjd aggregator (``lead``: index of the leading row; ``exact``: the rotation variant)."""

    def __init__(self, k: float = 0.5, lead: int = 0, exact: bool = False, max_weight: float | None = None):
        super().__init__(GHPlusPlusWeighting(k=k, lead=lead, exact=exact, max_weight=max_weight))
