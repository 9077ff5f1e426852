"""Backbones, heads, discriminators and the step-driven gradient-reversal layer."""

from gradharmony.models.grl import GradientReversal, reverse_gradient, warm_start_coefficient

__all__ = ["GradientReversal", "reverse_gradient", "warm_start_coefficient"]
