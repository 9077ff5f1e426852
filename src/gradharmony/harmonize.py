r"""The maths of Gradient Harmonization: from the Gramian of the gradients to the loss weights.

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

More than two losses
--------------------
:func:`harmonize_gramian` takes the :math:`K \times K` Gramian :math:`G_{ij} = \langle g_i, g_j \rangle`
of :math:`K` gradients and returns one weight per loss, so that the update is
:math:`\sum_j w_j g_j` (the gradient of :math:`\sum_j w_j L_j` with the weights held constant).

*Pair by pair* (``pairs``, any mode): each pair :math:`(i, j)` is harmonized with its own
:math:`2 \times 2` Gramian :math:`(G_{ii}, G_{jj}, G_{ij})` exactly as :func:`harmonize` does,
:math:`i` in the alignment slot and :math:`j` in the classification slot; a loss in no pair keeps
weight 1.

*GH over all K* (``mode="gh"``, no pairs): projection in a fixed order, the PCGrad form made
deterministic.  For :math:`i = 1, \dots, K` in turn, start from :math:`g_i' = g_i` and for
:math:`j = 1, \dots, K`, :math:`j \ne i`, in turn:

.. math::
    \text{if } \langle g_i', g_j \rangle < 0: \qquad
    g_i' \leftarrow g_i' - \frac{\langle g_i', g_j \rangle}{\|g_j\|^2}\, g_j

(projected against the *original* :math:`g_j`, the conflict tested with the current
:math:`g_i'`).  Every :math:`g_i'` stays a combination of the originals, :math:`g_i' = \sum_m
A_{im} g_m` with :math:`A` starting at the identity, and :math:`\langle g_i', g_j \rangle =
(A G)_{ij}`, so the whole procedure runs on the Gramian: a projection subtracts
:math:`(AG)_{ij} / G_{jj}` from :math:`A_{ij}`.  The update is :math:`\sum_i g_i' = \sum_j w_j g_j`
with :math:`w_j = \sum_i A_{ij}`.  For :math:`K = 2` this is GH exactly:
:math:`w_1 = 1 - G_{12}/G_{11}`, :math:`w_2 = 1 - G_{12}/G_{22}` (bit for bit).  For
:math:`K > 2` a projected :math:`g_i'` is orthogonal to the last :math:`g_j` it was projected on,
not necessarily to every earlier one (as in PCGrad), and the result depends on the order.

GH++ and GH++exact are defined for two gradients: with more than two, pass ``pairs``.

Guards (each reported in :attr:`HarmonizeResult.guards`)
--------------------------------------------------------
``nonfinite``
    a Gramian entry is NaN or inf: no harmonization (weights 1, 1).
``tiny_norm``
    a squared norm is below ``abs_eps`` or below ``rel_eps`` times the other (a norm ratio under
    1e-8 with the default, which is below float32 resolution of the summed update): weights 1, 1
    (over K losses: that pair's projections are skipped).
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
>>> harmonize_gramian([[1.0, -0.5, 0.0], [-0.5, 1.0, 0.0], [0.0, 0.0, 4.0]], mode="gh").weights
(1.5, 1.5, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def _too_small(aa: float, cc: float, abs_eps: float, rel_eps: float) -> bool:
    """Whether one of two squared norms is too small to harmonize against (the ``tiny_norm`` guard)."""
    return min(aa, cc) <= max(abs_eps, rel_eps * max(aa, cc))


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
    if _too_small(aa, cc, abs_eps, rel_eps):
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


@dataclass(frozen=True)
class GramianResult:
    """Weights of K losses (:func:`harmonize_gramian`) and what produced them (plain floats)."""

    weights: tuple[float, ...]
    conflict: bool  # some two of the gradients conflict (negative inner product, both norms usable)
    guards: tuple[str, ...] = field(default_factory=tuple)
    pairs: tuple[HarmonizeResult, ...] = field(default_factory=tuple)  # one per pair, when given pairs

    @classmethod
    def of_pairs(
        cls, count: int, pairs: Sequence[tuple[int, int]], results: Sequence[HarmonizeResult], conflict: bool
    ) -> GramianResult:
        """The K weights of harmonized pairs: each pair ``(i, j)`` gives ``w_i = w_align``,
        ``w_j = w_cls``; a loss in no pair keeps 1.  Guards: those of the pairs, in order, once each."""
        weights = [1.0] * count
        for (i, j), r in zip(pairs, results):
            weights[i], weights[j] = r.w_align, r.w_cls
        guards = tuple(dict.fromkeys(g for r in results for g in r.guards))
        return cls(tuple(weights), conflict, guards, tuple(results))


def _check_gramian(gram: Sequence[Sequence[float]] | torch.Tensor) -> list[list[float]]:
    rows = gram.detach().double().tolist() if isinstance(gram, torch.Tensor) else [list(map(float, r)) for r in gram]
    if not rows or any(len(row) != len(rows) for row in rows):
        raise ValueError(
            f"the Gramian must be a non-empty square matrix, got {len(rows)} rows of lengths "
            f"{[len(row) for row in rows]}"
        )
    return rows


def _check_pairs(pairs: Sequence[tuple[int, int]], count: int) -> list[tuple[int, int]]:
    checked: list[tuple[int, int]] = []
    seen: set[int] = set()
    for pair in pairs:
        i, j = pair
        if not (0 <= i < count and 0 <= j < count) or i == j:
            raise ValueError(f"pair {pair} must name two different losses among 0..{count - 1}")
        if i in seen or j in seen:
            raise ValueError(f"pair {pair}: a loss may be in one pair only")
        seen.update((i, j))
        checked.append((i, j))
    return checked


def _projected_weights(gram: list[list[float]], abs_eps: float, rel_eps: float) -> tuple[list[float], bool]:
    """GH over all K gradients in the fixed order of the module docstring; also whether a pair was skipped.

    ``rows[i]`` holds the coefficients of the projected :math:`g_i'` on the original gradients.
    """
    count = len(gram)
    rows = [[1.0 if m == i else 0.0 for m in range(count)] for i in range(count)]
    skipped = False
    for i in range(count):
        for j in range(count):
            if j == i:
                continue
            if _too_small(gram[i][i], gram[j][j], abs_eps, rel_eps):
                skipped = True
                continue
            along = math.fsum(rows[i][m] * gram[m][j] for m in range(count))  # <g_i', g_j>
            if along < 0.0:
                rows[i][j] -= along / gram[j][j]
    return [math.fsum(rows[i][j] for i in range(count)) for j in range(count)], skipped


def harmonize_gramian(
    gram: Sequence[Sequence[float]] | torch.Tensor,
    mode: str = "gh",
    pairs: Sequence[tuple[int, int]] | None = None,
    k: float = 0.5,
    lead: str = "align",
    max_weight: float | None = None,
    abs_eps: float = ABS_EPS,
    rel_eps: float = REL_EPS,
) -> GramianResult:
    r"""One weight per loss from the :math:`K \times K` Gramian of their gradients.

    The update :math:`\sum_j w_j g_j` is the gradient of :math:`\sum_j w_j L_j` with the weights
    held constant.  See "More than two losses" in this module's docstring for the maths.

    Args:
        gram: :math:`G_{ij} = \langle g_i, g_j \rangle` (nested sequences or a tensor).
        mode: ``none`` (weights 1), ``gh``, ``gh++`` or ``gh++exact``.
        pairs: index pairs ``(i, j)`` harmonized each with its own :math:`2 \times 2` Gramian, ``i``
            in the alignment slot (it leads in GH++ when ``lead="align"``), ``j`` in the
            classification slot; each loss in one pair at most; a loss in no pair keeps weight 1.
            ``None``: GH over all K losses (``gh``; K = 2 is GH exactly), or the single pair
            ``(0, 1)`` when K = 2 (``gh++``, ``gh++exact``).
        k, lead, max_weight, abs_eps, rel_eps: as in :func:`harmonize`.

    Raises:
        ValueError: GH++ or GH++exact over more than two losses without ``pairs``; a malformed
            Gramian or pair.

    Example:
        >>> g = [[1.0, -0.5, 0.0], [-0.5, 1.0, 0.0], [0.0, 0.0, 4.0]]   # losses 0 and 1 conflict
        >>> harmonize_gramian(g, mode="gh").weights
        (1.5, 1.5, 1.0)
        >>> r = harmonize_gramian(g, mode="gh++", pairs=[(0, 1)], k=0.5, lead="align")
        >>> [round(w, 6) for w in r.weights], r.pairs[0].conflict
        ([1.261052, 0.738948, 1.0], True)
    """
    mode = check_mode(mode)
    check_k_lead(k, lead)
    rows = _check_gramian(gram)
    count = len(rows)
    if pairs is None and mode in ("gh++", "gh++exact") and count > 2:
        raise ValueError(
            f"{mode} is defined for two losses; for {count} losses pass pairs=[(i, j), ...] to harmonize "
            "them pair by pair, or use mode='gh'"
        )
    if pairs is None and count == 2 and mode != "gh":
        pairs = [(0, 1)]
    if pairs is not None:
        checked = _check_pairs(pairs, count)
        results = tuple(
            harmonize(
                rows[i][i],
                rows[j][j],
                rows[i][j],
                mode=mode,
                k=k,
                lead=lead,
                max_weight=max_weight,
                abs_eps=abs_eps,
                rel_eps=rel_eps,
            )
            for i, j in checked
        )
        conflict = all(map(math.isfinite, _entries(rows))) and _any_conflict(rows, abs_eps, rel_eps)
        return GramianResult.of_pairs(count, checked, results, conflict)

    if not all(map(math.isfinite, _entries(rows))):
        return GramianResult((1.0,) * count, False, ("nonfinite",))
    conflict = _any_conflict(rows, abs_eps, rel_eps)
    if mode == "none" or count == 1:
        return GramianResult((1.0,) * count, conflict, ())
    weights, skipped = _projected_weights(rows, abs_eps, rel_eps)
    guards = ["tiny_norm"] if skipped else []
    if max_weight is not None and max(weights) > max_weight:
        guards.append("clipped")
        weights = [min(w, max_weight) for w in weights]
    return GramianResult(tuple(weights), conflict, tuple(guards))


def _entries(rows: list[list[float]]) -> list[float]:
    return [v for row in rows for v in row]


def _any_conflict(rows: list[list[float]], abs_eps: float, rel_eps: float) -> bool:
    count = len(rows)
    return any(
        rows[i][j] < 0.0 and not _too_small(rows[i][i], rows[j][j], abs_eps, rel_eps)
        for i in range(count)
        for j in range(i + 1, count)
    )


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
