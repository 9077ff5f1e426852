r"""Digit backbones trained from scratch: LeNet and DTN, and the backbone registry.

Both end at the flattened convolutional features; the method's bottleneck plays the role of the
fully-connected layer that some digit setups append.  ``out_features`` is computed for the image
size, so a method can size its bottleneck without a dummy forward.  Inputs are float images
already scaled or normalised by the data pipeline; nothing is normalised here.

Example:
    >>> import torch
    >>> net = build_backbone("lenet", in_channels=1, image_size=28)
    >>> net.out_features, net(torch.rand(2, 1, 28, 28)).shape
    (800, torch.Size([2, 800]))
    >>> build_backbone("dtn", in_channels=3, image_size=32).out_features
    4096
    >>> build_backbone("lenet500", in_channels=1, image_size=28).out_features
    500
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def _conv_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _check_size(name: str, image_size: int, min_size: int) -> None:
    if image_size < min_size:
        raise ValueError(f"{name} needs images of at least {min_size}x{min_size} pixels, got {image_size}")


class LeNet(nn.Sequential):
    r"""LeNet of the ADDA / MCD / TLlib digit experiments, without its fully-connected layer.

    ``conv(in, 20, 5) - maxpool 2 - ReLU - conv(20, 50, 5) - dropout2d(p) - maxpool 2 - ReLU - flatten``;
    ``out_features`` = :math:`50 \lfloor(\lfloor(s-4)/2\rfloor - 4)/2\rfloor^2` for images of side
    :math:`s` (800 for 28, 1250 for 32).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, dropout: float = 0.5):
        _check_size("LeNet", image_size, 16)
        super().__init__(
            nn.Conv2d(in_channels, 20, kernel_size=5),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(20, 50, kernel_size=5),
            nn.Dropout2d(dropout),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Flatten(),
        )
        side = _conv_size(_conv_size(image_size, 5) // 2, 5) // 2
        self.in_channels, self.image_size = in_channels, image_size
        self.out_features = 50 * side * side


class LeNet500(nn.Sequential):
    r"""LeNet with its fully-connected layer: TLlib's digit ``lenet`` (and the ADDA / MCD LeNet).

    :class:`LeNet`, then ``Linear(out, 500) - ReLU - Dropout(p)``; ``out_features`` is 500.  With a
    bottleneck on top this is the network of TLlib's digit benchmark (``-a lenet --no-pool``):
    ``conv - pool - conv - pool - fc500 - bottleneck 256 - classifier``.
    """

    def __init__(self, in_channels: int = 1, image_size: int = 28, dropout: float = 0.5, width: int = 500):
        convolutions = LeNet(in_channels, image_size, dropout)
        super().__init__(*convolutions, nn.Linear(convolutions.out_features, width), nn.ReLU(), nn.Dropout(dropout))
        self.in_channels, self.image_size = in_channels, image_size
        self.out_features = width


class DTN(nn.Sequential):
    r"""The DTN digit network (MNIST -> SVHN / MNIST-M setups), without its fully-connected layer.

    Three blocks ``conv(k=5, stride 2, padding 2) - BatchNorm2d - dropout2d - ReLU`` with 64, 128
    and 256 channels and dropout 0.1, 0.3, 0.5, then flatten.  Each block maps a side :math:`s` to
    :math:`\lfloor (s-1)/2 \rfloor + 1`, so ``out_features`` is 4096 for 32x32 and 28x28 images.
    """

    def __init__(
        self, in_channels: int = 3, image_size: int = 32, dropout: tuple[float, float, float] = (0.1, 0.3, 0.5)
    ):
        _check_size("DTN", image_size, 1)
        layers: list[nn.Module] = []
        channels, side = in_channels, image_size
        for width, p in zip((64, 128, 256), dropout):
            layers += [
                nn.Conv2d(channels, width, kernel_size=5, stride=2, padding=2),
                nn.BatchNorm2d(width),
                nn.Dropout2d(p),
                nn.ReLU(),
            ]
            channels, side = width, _conv_size(side, 5, stride=2, padding=2)
        super().__init__(*layers, nn.Flatten())
        self.in_channels, self.image_size = in_channels, image_size
        self.out_features = channels * side * side


BACKBONES: dict[str, Callable[[int, int], nn.Module]] = {"lenet": LeNet, "lenet500": LeNet500, "dtn": DTN}


def build_backbone(name: str, in_channels: int, image_size: int) -> nn.Module:
    """A backbone by name (``lenet``, ``lenet500`` or ``dtn``); the module has an ``out_features`` attribute."""
    key = name.lower()
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))}")
    return BACKBONES[key](in_channels, image_size)
