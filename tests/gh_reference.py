"""GH and GH++ weights written out by hand, for the tests to check the library against.

Independent of the library's weight functions (``gradharmony.harmonize``): each rule is written here
from DESIGN.md section 2 (GH: each gradient loses its component along the other; GH++: the authors'
released rule, in degrees), in plain float arithmetic.  ``test_harmonizer.geometric_weights``
derives the same weights a second way, from the geometry of the two gradients.
"""

from __future__ import annotations

import math

import torch


def flat(grads, params) -> torch.Tensor:
    """``grads`` of ``params`` as one vector, zeros where a parameter has none (``None``)."""
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """The gradient of ``loss`` over ``params`` as one vector (zeros where it does not reach; graph kept)."""
    return flat(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)


def gh_weights(g1: torch.Tensor, g2: torch.Tensor) -> tuple[float, float]:
    """GH's weights of two gradients: ``1 - d / |g1|^2`` and ``1 - d / |g2|^2`` when they conflict
    (``d = g1 . g2 < 0``); ``1, 1`` otherwise, and when either gradient is zero."""
    aa, cc, d = float(g1 @ g1), float(g2 @ g2), float(g1 @ g2)
    if aa == 0.0 or cc == 0.0 or d >= 0.0:
        return 1.0, 1.0
    return 1.0 - d / aa, 1.0 - d / cc


def gh_weights_of(loss1: torch.Tensor, loss2: torch.Tensor, params: list[torch.Tensor]) -> tuple[float, float]:
    """GH's weights of two losses (``gh1`` on ``loss1``, ``gh2`` on ``loss2``), measured over ``params``."""
    return gh_weights(flat_grad(loss1, params), flat_grad(loss2, params))


def ghpp_released(angle: float, k: float) -> tuple[float, float]:
    """``(w_lead, w_other)`` of the authors' released GH++ rule at an obtuse ``angle`` (degrees)."""
    beta = k * (angle - 90.0)
    w_lead = 1.0 + 2.0 * math.sin(math.radians(beta / 2.0))
    w_other = 1.0 + 2.0 * math.sin(math.radians((beta + 90.0 - angle) / 2.0))
    return w_lead, w_other


def ghpp_weights(angle: float, k: float, lead: str) -> tuple[float, float]:
    """``(w_align, w_cls)`` of the released GH++ rule with ``lead`` leading; ``1, 1`` without conflict."""
    if angle <= 90.0:
        return 1.0, 1.0
    w_lead, w_other = ghpp_released(angle, k)
    return (w_lead, w_other) if lead == "align" else (w_other, w_lead)


def reference_weights(
    g_align: torch.Tensor, g_cls: torch.Tensor, mode: str, lead: str = "align", k: float = 0.5
) -> tuple[float, float]:
    """``(w_align, w_cls)`` of ``mode`` (``gh`` or ``gh++``) for two flat gradients."""
    aa, cc, d = float(g_align @ g_align), float(g_cls @ g_cls), float(g_align @ g_cls)
    if aa == 0.0 or cc == 0.0 or d >= 0.0:  # a missing gradient, or no conflict: unchanged
        return 1.0, 1.0
    if mode == "gh":
        return gh_weights(g_align, g_cls)
    assert mode == "gh++"
    return ghpp_weights(math.degrees(math.acos(max(-1.0, d / math.sqrt(aa * cc)))), k, lead)
