r"""Heads on top of a backbone: bottleneck, classifier, domain discriminator.

Example:
    >>> import torch
    >>> bottleneck, head = Bottleneck(800, 256), ClassifierHead(256, 10)
    >>> disc = DomainDiscriminator(256)
    >>> f = bottleneck(torch.randn(4, 800))
    >>> head(f).shape, disc(f).shape
    (torch.Size([4, 10]), torch.Size([4]))
"""

from __future__ import annotations

import torch
from torch import nn


class Bottleneck(nn.Sequential):
    """``Linear - BatchNorm1d - ReLU`` (``- Dropout`` when ``dropout > 0``): the shared features."""

    def __init__(self, in_features: int, out_features: int = 256, dropout: float = 0.0):
        layers: list[nn.Module] = [nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)
        self.in_features, self.out_features = in_features, out_features


class ClassifierHead(nn.Sequential):
    """Class logits: one ``Linear``, or ``Linear - ReLU - Dropout - Linear`` when ``hidden`` is set."""

    def __init__(self, in_features: int, num_classes: int, hidden: int | None = None, dropout: float = 0.0):
        if hidden is None:
            layers: list[nn.Module] = [nn.Linear(in_features, num_classes)]
        else:
            layers = [nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)]
        super().__init__(*layers)
        self.in_features, self.num_classes = in_features, num_classes


class DomainDiscriminator(nn.Module):
    r"""Domain logit :math:`D(h)` (source = 1), used with ``binary_cross_entropy_with_logits``.

    Two hidden layers ``Linear - [BatchNorm1d] - ReLU - [Dropout]`` of width ``hidden`` (1024 as in
    TLlib and the CDAN code), then ``Linear -> 1``.  Returns logits of shape ``(N,)``: no sigmoid,
    so the loss is computed stably.
    """

    def __init__(self, in_features: int, hidden: int = 1024, batch_norm: bool = True, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(*hidden_layers(in_features, hidden, batch_norm, dropout), nn.Linear(hidden, 1))
        self.in_features = in_features

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h).squeeze(-1)


def hidden_layers(in_features: int, hidden: int, batch_norm: bool, dropout: float, depth: int = 2) -> nn.Sequential:
    """``depth`` blocks ``Linear - [BatchNorm1d] - ReLU - [Dropout]`` of width ``hidden`` (discriminators)."""
    layers: list[nn.Module] = []
    width = in_features
    for _ in range(depth):
        layers.append(nn.Linear(width, hidden))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.ReLU())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = hidden
    return nn.Sequential(*layers)
