r"""The maths of Gradient Harmonization: from the 2x2 Gramian to two loss weights.

Everything here is pure: floats in, floats out (vector helpers take tensors for tests and
diagnostics).  Nothing here knows about modules, optimizers or UDA.

Notation (Huang, Song, Zhang, "Gradient Harmonization in Unsupervised Domain Adaptation",
TPAMI 2024): :math:`g_a` is the gradient of the alignment loss as the shared parameters receive it
(already reversed by a gradient-reversal layer), :math:`g_c` the gradient of the classification
loss.  The rules need only the Gramian

.. math::
    aa = \|g_a\|^2, \qquad cc = \|g_c\|^2, \qquad d = \langle g_a, g_c \rangle,
    \qquad \cos\theta = \frac{d}{\|g_a\|\,\|g_c\|}.

Every rule acts only on a conflict, :math:`d < 0` (obtuse angle); otherwise both weights are
exactly 1.  Each rule returns weights :math:`(w_a, w_c)` such that the harmonized update is
:math:`w_a g_a + w_c g_c`, which is also the gradient of :math:`w_a L_{align} + w_c L_{cls}` with
the weights held constant (the paper's "integral operator" form).

Modes
-----
``none``
    :math:`w_a = w_c = 1`.
``gh``
    Each gradient loses its component along the other,
    :math:`g_a' = g_a - \frac{d}{cc} g_c`, :math:`g_c' = g_c - \frac{d}{aa} g_a`, so
    :math:`w_a = 1 - d/aa`, :math:`w_c = 1 - d/cc`; the angle becomes :math:`180^\circ - \theta`.
``gh++``
    The authors' released rule (angles in degrees, :math:`k \in [0, 1]`):
    :math:`\beta = k(\theta - 90)`, :math:`w_{lead} = 1 + 2\sin(\beta/2)`,
    :math:`w_{other} = 1 + 2\sin((\beta + 90 - \theta)/2)`.  Not symmetric: ``lead`` names the loss
    that gets :math:`w_{lead}`.
``gh++exact``
    Rotate both gradients inside :math:`\mathrm{span}\{g_a, g_c\}`, keeping their norms, until they
    are exactly perpendicular; the lead turns by :math:`k(\theta - 90)`, the other by
    :math:`(1-k)(\theta - 90)`.  Turning :math:`v` by :math:`\varphi` towards :math:`u` gives
    :math:`v' = \frac{\sin(\theta-\varphi)}{\sin\theta} v
    + \frac{\|v\|}{\|u\|}\frac{\sin\varphi}{\sin\theta} u`, hence norm-dependent weights.

Guards (each reported in :attr:`HarmonizeResult.guards`)
--------------------------------------------------------
``nonfinite``
    a Gramian entry is NaN or inf: no harmonization (weights 1, 1).
``tiny_norm``
    a squared norm is below ``abs_eps`` or below ``rel_eps`` times the other (a norm ratio under
    1e-8 with the default, which is below float32 resolution of the summed update): weights 1, 1.
``cos_clamped``
    rounding put :math:`|\cos\theta|` above 1; it was clamped before ``acos``.
``antiparallel``
    ``gh++exact`` with :math:`\sin\theta \approx 0`, where the rotation plane is undefined: the GH
    weights are used instead (which cancel the antiparallel pair).
``clipped``
    a weight exceeded ``max_weight`` (only when a cap is set) and was clipped.

Example
-------
>>> from gradharmony import harmonize_weights
>>> harmonize_weights(1.0, 1.0, -0.5, mode="gh")
(1.5, 1.5)
>>> harmonize_weights(1.0, 4.0, 1.0, mode="gh++")      # no conflict: unchanged
(1.0, 1.0)
>>> w_align, w_cls = harmonize_weights(1.0, 1.0, -0.5, mode="gh++", k=0.5, lead="align")
>>> round(w_align, 6), round(w_cls, 6)
(1.261052, 0.738948)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

Mode = Literal["none", "gh", "gh++", "gh++exact"]
Lead = Literal["align", "cls"]

MODES: tuple[str, ...] = ("none", "gh", "gh++", "gh++exact")
LEADS: tuple[str, ...] = ("align", "cls")

#: Squared norms at or below this are treated as zero.
ABS_EPS = 1e-30
#: A squared-norm ratio below this (norm ratio 1e-8) is below float32 resolution of the sum.
REL_EPS = 1e-16
#: ``sin(theta)`` below this makes the ``gh++exact`` rotation plane undefined.
SIN_EPS = 1e-6


@dataclass(frozen=True)
class HarmonizeResult:
    """Weights and the geometry they came from (all plain floats)."""

    w_align: float
    w_cls: float
    cos: float
    angle: float  # degrees; nan when undefined (a zero or non-finite gradient)
    conflict: bool
    guards: tuple[str, ...] = field(default_factory=tuple)


def _as_float(x: float | torch.Tensor, name: str) -> float:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(x.shape)}")
        return float(x.detach().cpu().item())
    return float(x)


def check_mode(mode: str) -> str:
    """Return ``mode`` normalised (``ghpp`` -> ``gh++``), or raise a clear ``ValueError``."""
    aliases = {
        "ghpp": "gh++",
        "gh++exact": "gh++exact",
        "ghpp-exact": "gh++exact",
        "ghppexact": "gh++exact",
        "gh++-exact": "gh++exact",
    }
    normalised = aliases.get(mode, mode)
    if normalised not in MODES:
        raise ValueError(f"unknown harmonizer mode {mode!r}; choose one of {', '.join(MODES)}")
    return normalised


def check_k_lead(k: float, lead: str) -> None:
    if not 0.0 <= k <= 1.0:
        raise ValueError(f"k must lie in [0, 1], got {k}")
    if lead not in LEADS:
        raise ValueError(f"lead must be 'align' or 'cls', got {lead!r}")


def _gh_weights(aa: float, cc: float, d: float) -> tuple[float, float]:
    return 1.0 - d / aa, 1.0 - d / cc


def _ghpp_authors_weights(angle: float, k: float) -> tuple[float, float]:
    """(w_lead, w_other) of the authors' released GH++ rule; ``angle`` in degrees."""
    beta = k * (angle - 90.0)
    w_lead = 1.0 + 2.0 * math.sin(math.radians(beta / 2.0))
    w_other = 1.0 + 2.0 * math.sin(math.radians((beta + 90.0 - angle) / 2.0))
    return w_lead, w_other


def _turn(theta: float, turn: float, norm_self: float, norm_other: float) -> tuple[float, float]:
    """Coefficients (on self, on other) of a vector turned by ``turn`` radians towards the other.

    Turning ``v`` towards ``u`` (angle ``theta`` apart) inside their span, keeping ``|v|``:
    ``v' = sin(theta - turn)/sin(theta) * v + (|v|/|u|) * sin(turn)/sin(theta) * u``.
    """
    s = math.sin(theta)
    return math.sin(theta - turn) / s, (norm_self / norm_other) * math.sin(turn) / s


def _exact_turns(theta: float, k: float) -> tuple[float, float]:
    """Turns (lead, other) in radians that close an obtuse ``theta`` to a right angle."""
    excess = theta - math.pi / 2.0
    return k * excess, (1.0 - k) * excess


def harmonize(
    aa: float | torch.Tensor,
    cc: float | torch.Tensor,
    d: float | torch.Tensor,
    mode: str = "gh",
    k: float = 0.5,
    lead: str = "align",
    max_weight: float | None = None,
    abs_eps: float = ABS_EPS,
    rel_eps: float = REL_EPS,
) -> HarmonizeResult:
    """Weights of ``mode`` for the Gramian ``(aa, cc, d)``, with the geometry and guard events.

    Args:
        aa: squared norm of the alignment gradient, :math:`\\|g_a\\|^2`.
        cc: squared norm of the classification gradient, :math:`\\|g_c\\|^2`.
        d: inner product :math:`\\langle g_a, g_c \\rangle`.
        mode: ``none``, ``gh``, ``gh++`` or ``gh++exact``.
        k: GH++ split of the correction between the two gradients, in [0, 1].
        lead: which loss leads in GH++ (``align`` or ``cls``); ignored by ``none`` and ``gh``.
        max_weight: optional cap on each weight (``None``: no cap, as in the authors' code).
        abs_eps, rel_eps: the ``tiny_norm`` thresholds on squared norms.

    Example:
        >>> r = harmonize(4.0, 1.0, -1.0, mode="gh")
        >>> r.w_align, r.w_cls, r.conflict, round(r.angle, 1)
        (1.25, 2.0, True, 120.0)
    """
    mode = check_mode(mode)
    check_k_lead(k, lead)
    aa, cc, d = _as_float(aa, "aa"), _as_float(cc, "cc"), _as_float(d, "d")
    guards: list[str] = []

    if not (math.isfinite(aa) and math.isfinite(cc) and math.isfinite(d)):
        return HarmonizeResult(1.0, 1.0, math.nan, math.nan, False, ("nonfinite",))
    if min(aa, cc) <= max(abs_eps, rel_eps * max(aa, cc)):
        return HarmonizeResult(1.0, 1.0, math.nan, math.nan, False, ("tiny_norm",))

    norm_a, norm_c = math.sqrt(aa), math.sqrt(cc)
    cos = d / (norm_a * norm_c)
    if abs(cos) > 1.0:
        guards.append("cos_clamped")
        cos = max(-1.0, min(1.0, cos))
    theta = math.acos(cos)
    angle = math.degrees(theta)
    conflict = d < 0.0

    if not conflict or mode == "none":
        return HarmonizeResult(1.0, 1.0, cos, angle, conflict, tuple(guards))

    if mode == "gh":
        w_a, w_c = _gh_weights(aa, cc, d)
    elif mode == "gh++":
        w_lead, w_other = _ghpp_authors_weights(angle, k)
        w_a, w_c = (w_lead, w_other) if lead == "align" else (w_other, w_lead)
    else:  # gh++exact
        if math.sin(theta) < SIN_EPS:
            guards.append("antiparallel")
            w_a, w_c = _gh_weights(aa, cc, d)
        else:
            turn_lead, turn_other = _exact_turns(theta, k)
            n_lead, n_other = (norm_a, norm_c) if lead == "align" else (norm_c, norm_a)
            lead_self, lead_on_other = _turn(theta, turn_lead, n_lead, n_other)
            other_self, other_on_lead = _turn(theta, turn_other, n_other, n_lead)
            w_lead, w_other = lead_self + other_on_lead, other_self + lead_on_other
            w_a, w_c = (w_lead, w_other) if lead == "align" else (w_other, w_lead)

    if max_weight is not None and max(w_a, w_c) > max_weight:
        guards.append("clipped")
        w_a, w_c = min(w_a, max_weight), min(w_c, max_weight)
    return HarmonizeResult(w_a, w_c, cos, angle, conflict, tuple(guards))


def harmonize_weights(
    aa: float | torch.Tensor,
    cc: float | torch.Tensor,
    d: float | torch.Tensor,
    mode: str = "gh",
    k: float = 0.5,
    lead: str = "align",
    max_weight: float | None = None,
) -> tuple[float, float]:
    """The two weights ``(w_align, w_cls)`` of :func:`harmonize`, as floats.

    Example:
        >>> harmonize_weights(1.0, 1.0, -1.0, mode="gh")   # antiparallel: both cancel
        (2.0, 2.0)
    """
    r = harmonize(aa, cc, d, mode=mode, k=k, lead=lead, max_weight=max_weight)
    return r.w_align, r.w_cls


def gramian(g_align: torch.Tensor, g_cls: torch.Tensor) -> tuple[float, float, float]:
    """``(aa, cc, d)`` of two gradient vectors (any shapes, flattened), in float64."""
    a = g_align.detach().reshape(-1).double()
    c = g_cls.detach().reshape(-1).double()
    return float(a @ a), float(c @ c), float(a @ c)


def harmonize_vectors(
    g_align: torch.Tensor, g_cls: torch.Tensor, mode: str = "gh", k: float = 0.5, lead: str = "align"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two harmonized gradients themselves (for tests and diagnostics).

    ``gh`` returns the projections :math:`g_a - (d/cc) g_c` and :math:`g_c - (d/aa) g_a`;
    ``gh++exact`` returns the rotated, norm-preserving pair; ``gh++`` (whose released rule defines
    only weights) returns :math:`w_a g_a` and :math:`w_c g_c`; ``none`` returns the inputs.
    In every mode the two outputs sum to :math:`w_a g_a + w_c g_c`.

    Example:
        >>> import torch
        >>> ga, gc = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
        >>> a, c = harmonize_vectors(ga, gc, mode="gh")
        >>> float(a @ gc) == 0.0 and float(c @ ga) == 0.0
        True
    """
    mode = check_mode(mode)
    aa, cc, d = gramian(g_align, g_cls)
    r = harmonize(aa, cc, d, mode=mode, k=k, lead=lead)
    acted = r.conflict and mode != "none" and not {"nonfinite", "tiny_norm"} & set(r.guards)
    if not acted or mode == "gh++":
        return g_align * r.w_align, g_cls * r.w_cls
    if mode == "gh" or "antiparallel" in r.guards:
        return g_align - (d / cc) * g_cls, g_cls - (d / aa) * g_align
    theta = math.acos(r.cos)
    turn_lead, turn_other = _exact_turns(theta, k)
    lead_vec, other_vec = (g_align, g_cls) if lead == "align" else (g_cls, g_align)
    n_lead, n_other = math.sqrt(aa if lead == "align" else cc), math.sqrt(cc if lead == "align" else aa)
    lead_self, lead_on_other = _turn(theta, turn_lead, n_lead, n_other)
    other_self, other_on_lead = _turn(theta, turn_other, n_other, n_lead)
    new_lead = lead_self * lead_vec + lead_on_other * other_vec
    new_other = other_self * other_vec + other_on_lead * lead_vec
    return (new_lead, new_other) if lead == "align" else (new_other, new_lead)
