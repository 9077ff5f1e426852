"""Counting backward traversals: how many times the harmonizer's passes go through a module."""

from __future__ import annotations

import torch


class CountBackward(torch.autograd.Function):
    """Identity that counts how often a backward pass traverses it (reset ``calls`` before counting)."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        CountBackward.calls += 1
        return grad
