"""A small fully connected feature extractor for pre-extracted features (Office-Caltech10)."""

from __future__ import annotations

from torch import nn


class MLP(nn.Sequential):
    """``Linear(in_features, hidden) - ReLU - Dropout`` as the backbone; ``out_features = hidden``.

    Example:
        >>> import torch
        >>> MLP(800, hidden=64)(torch.randn(5, 800)).shape
        torch.Size([5, 64])
    """

    def __init__(self, in_features: int, hidden: int = 512, dropout: float = 0.5):
        if in_features < 1 or hidden < 1:
            raise ValueError(f"in_features and hidden must be positive, got {in_features}, {hidden}")
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.in_features, self.out_features = in_features, hidden
