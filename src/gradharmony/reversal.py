r"""Gradient reversal with a coefficient driven by an explicit training step.

The forward pass is the identity; the backward pass multiplies the incoming gradient by
:math:`-\lambda`.  The DANN warm-start schedule ramps :math:`\lambda` from ``low`` to ``high``:

.. math::
    \lambda(i) = \frac{2 (high - low)}{1 + \exp(-\alpha\, i / N)} - (high - low) + low,

with :math:`i` the training step and :math:`N` = ``max_steps``.

Why an explicit step: reversal layers that advance their step on every forward call (as in some
libraries) would be shifted by any extra forward pass, and a harmonizer's probes, evaluation or a
second forward for perturbed inputs would silently change the schedule.  Here only
:meth:`GradientReversal.set_step` (called by the training loop) moves it; forward and backward
calls never do.

Example:
    >>> import torch
    >>> grl = GradientReversal(max_steps=1000, alpha=10.0)
    >>> grl.set_step(500)
    >>> x = torch.ones(3, requires_grad=True)
    >>> grl(x).sum().backward()
    >>> bool(torch.allclose(x.grad, torch.full((3,), -grl.coefficient)))
    True
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coefficient: float) -> torch.Tensor:
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad_output.neg() * ctx.coefficient, None


def reverse_gradient(x: torch.Tensor, coefficient: float = 1.0) -> torch.Tensor:
    """Identity forward; gradient multiplied by ``-coefficient`` on the way back."""
    return _ReverseGrad.apply(x, float(coefficient))


def warm_start_coefficient(
    step: int, max_steps: int, alpha: float = 10.0, low: float = 0.0, high: float = 1.0
) -> float:
    """The DANN ramp from ``low`` (step 0) towards ``high`` (step ``max_steps`` and beyond)."""
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    span = high - low
    return 2.0 * span / (1.0 + math.exp(-alpha * step / max_steps)) - span + low


class GradientReversal(nn.Module):
    """Gradient-reversal layer whose coefficient follows :func:`warm_start_coefficient`.

    Args:
        max_steps: steps over which the coefficient ramps up (``N`` above).
        alpha, low, high: shape of the ramp.  ``constant`` fixes the coefficient instead.
        constant: if given, the coefficient is always this value and the step is ignored.

    The step is part of the module's state (``get_extra_state``), so it is saved and restored with
    the model's ``state_dict`` and an interrupted run resumes on the same schedule.
    """

    def __init__(
        self,
        max_steps: int = 1000,
        alpha: float = 10.0,
        low: float = 0.0,
        high: float = 1.0,
        constant: float | None = None,
    ):
        super().__init__()
        if max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {max_steps}")
        self.max_steps, self.alpha, self.low, self.high = max_steps, alpha, low, high
        self.constant = constant
        self.step = 0

    def set_step(self, step: int) -> None:
        """Move the schedule to training step ``step`` (the only way it moves)."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        self.step = int(step)

    def get_extra_state(self) -> dict:
        return {"step": self.step}

    def set_extra_state(self, state: dict) -> None:
        self.step = int(state["step"])

    @property
    def coefficient(self) -> float:
        if self.constant is not None:
            return float(self.constant)
        return warm_start_coefficient(self.step, self.max_steps, self.alpha, self.low, self.high)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reverse_gradient(x, self.coefficient)

    def extra_repr(self) -> str:
        if self.constant is not None:
            return f"constant={self.constant}"
        return f"max_steps={self.max_steps}, alpha={self.alpha}, low={self.low}, high={self.high}"
