"""Backbones, heads, discriminators and the step-driven gradient-reversal layer."""

from gradharmony.models.digits import BACKBONES, DTN, LeNet, build_backbone
from gradharmony.models.grl import GradientReversal, reverse_gradient, warm_start_coefficient
from gradharmony.models.heads import Bottleneck, ClassifierHead, DomainDiscriminator

__all__ = [
    "BACKBONES", "DTN", "Bottleneck", "ClassifierHead", "DomainDiscriminator", "GradientReversal",
    "LeNet", "build_backbone", "reverse_gradient", "warm_start_coefficient",
]
