"""Backbones, heads, discriminators and the step-driven gradient-reversal layer."""

from gradharmony.reversal import GradientReversal, reverse_gradient, warm_start_coefficient
from gradharmony.uda.models.digits import BACKBONES, DTN, LeNet, LeNet500, build_backbone
from gradharmony.uda.models.heads import Bottleneck, ClassifierHead, DomainDiscriminator
from gradharmony.uda.models.mlp import MLP

# Backbones for pre-extracted feature vectors, built from the feature dimension.
FEATURE_BACKBONES = {"mlp": MLP}

__all__ = [
    "BACKBONES",
    "DTN",
    "FEATURE_BACKBONES",
    "MLP",
    "Bottleneck",
    "ClassifierHead",
    "DomainDiscriminator",
    "GradientReversal",
    "LeNet",
    "LeNet500",
    "build_backbone",
    "reverse_gradient",
    "warm_start_coefficient",
]

# ImageNet-scale image backbones (ResNet, ViT via timm, EfficientNet-Lite): see
# gradharmony.uda.models.backbones.  Imported on first use, so that digit-only runs do not import torchvision.
_IMAGE_EXPORTS = {
    "IMAGE_BACKBONES": "gradharmony.uda.models.backbones",
    "IMAGE_BACKBONE_NAMES": "gradharmony.uda.models.backbones",
    "build_image_backbone": "gradharmony.uda.models.backbones",
    "PretrainedWeightsNotFoundError": "gradharmony.uda.models.pretrained",
}
__all__ += list(_IMAGE_EXPORTS)


def __getattr__(name: str):
    if name in _IMAGE_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_IMAGE_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
