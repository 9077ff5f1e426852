r"""The plug-in: :class:`Harmonizer` replaces ``loss.backward()`` with a harmonized backward.

A training loop that used to do ``(cls + trade_off * align).backward()`` does instead::

    harmonizer = Harmonizer(mode="gh++", scope=model.backbone)
    stats = harmonizer.backward(cls=cls_loss, align=align_loss, trade_off=1.0)
    optimizer.step()

The Gramian of the two per-loss gradients is measured over the *scope* (the shared parameters);
:mod:`gradharmony.harmonize` turns it into weights :math:`(w_a, w_c)`; every parameter, inside the
scope or not (discriminators, heads), then receives the gradient of

.. math:: t \, w_a L_{align} + w_c L_{cls}

with the weights held constant, where :math:`t` is ``trade_off``.  As in the authors' code the
alignment gradient is probed *before* the trade-off multiplies it (``probe_trade_off=True``
measures :math:`t \nabla L_{align}` instead, so the scope's update is exactly the harmonized pair).

More than two losses: ``backward(losses={"cls": ..., "align": ..., "bridge": ...},
trade_offs={...}, pairs=...)`` measures the :math:`K \times K` Gramian of the K gradients and
applies the gradient of :math:`\sum_i t_i w_i L_i` (weights from
:func:`gradharmony.harmonize.harmonize_gramian`): GH over all K losses in a fixed projection
order, or each of the given ``pairs`` harmonized with its own :math:`2 \times 2` Gramian (any
mode).  The two-loss call is the pair ``(align, cls)``.  See :meth:`Harmonizer.backward`.

Strategies (how the per-loss gradients are obtained; ``reweight`` and ``recombine`` give the same
``.grad`` up to rounding; ``features`` measures a different Gramian):

``reweight``
    the authors' scheme: probe each loss over the scope (one backward pass per loss, which only
    traverses the graph between the losses and the scope), then one backward of the weighted loss.
``recombine``
    one backward pass per loss; each ``.grad`` is rebuilt as :math:`\sum_i t_i w_i g_i` from the
    probes, so no extra pass is needed.  When the scope lies entirely above a feature tensor passed
    as ``backward(..., features=h)`` (e.g. a bottleneck scope with ``h`` the backbone output), the
    probes stop at ``h`` and the combined gradient of ``h`` goes through the backbone once: the same
    update at nearly the cost of plain training.
``features``
    the Gramian is measured on the gradients with respect to a shared feature tensor passed as
    ``backward(..., features=f)``; the probes stop there and the backbone is traversed once.  An
    approximation of parameter-space GH; its accuracy is measured in the benchmarks.

``refresh_every=k`` measures the weights on every k-th call only and reuses the last weights in
between with a single weighted backward.

Guards, each counted in the per-step :class:`StepStats` and in :meth:`Harmonizer.summary`:
non-finite probe gradients (no harmonization that step: plain weights, so an AMP ``GradScaler``
still sees the inf and skips the step; or ``on_nonfinite="raise"``), zero or tiny norms,
parameters of the scope that one loss does not reach (zeros, in a fixed order), ``acos`` clamping,
and the optional ``max_weight`` cap.  See :func:`gradharmony.harmonize.harmonize`.

Mixed precision: pass ``scaler=`` (a ``torch.amp.GradScaler``); the losses are scaled for every
backward pass and the Gramian is unscaled before it is measured, so ``.grad`` holds scaled
gradients exactly as after ``scaler.scale(loss).backward()``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from gradharmony import Harmonizer
    >>> _ = torch.manual_seed(1)
    >>> backbone, head, disc = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 1)
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> f = backbone(x)
    >>> cls_loss = nn.functional.cross_entropy(head(f), y)
    >>> align_loss = -disc(f).mean()          # stands in for a reversed adversarial loss
    >>> g_cls = torch.autograd.grad(cls_loss, backbone.weight, retain_graph=True)[0]      # for comparison
    >>> g_align = torch.autograd.grad(align_loss, backbone.weight, retain_graph=True)[0]
    >>> h = Harmonizer(mode="gh", scope=backbone, strategy="recombine")
    >>> stats = h.backward(cls=cls_loss, align=align_loss)
    >>> stats.conflict, round(stats.w_align, 3), round(stats.w_cls, 3)
    (True, 1.029, 1.059)
    >>> torch.allclose(backbone.weight.grad, stats.w_align * g_align + stats.w_cls * g_cls)
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from gradharmony.distributed import (
    World,
    average_,
    averaged_new_gradients,
    check_distributed,
    resolve_world,
    sum_scalars,
)
from gradharmony.gradients import Grads, accumulate, combine, feature_list, gramian, graph_leaves, probe, symmetric
from gradharmony.harmonize import (
    GramianResult,
    HarmonizeResult,
    check_k_lead,
    check_mode,
    harmonize,
    harmonize_gramian,
)
from gradharmony.stats import RunningStats, StepStats

STRATEGIES: tuple[str, ...] = ("reweight", "recombine", "features")
NONFINITE_POLICIES: tuple[str, ...] = ("plain", "raise")
#: The names of the two-loss call's losses, which are also the two slots of every harmonized pair.
ALIGN, CLS = "align", "cls"
_DESCRIPTIONS = {ALIGN: "alignment", CLS: "classification"}


def _scope_parameters(scope: nn.Module | nn.Parameter | Iterable | None) -> list[torch.Tensor] | None:
    """Flatten modules/parameters into a de-duplicated, ordered list of tensors requiring grad."""
    if scope is None:
        return None
    items = [scope] if isinstance(scope, (nn.Module, torch.Tensor)) else list(scope)
    params: list[torch.Tensor] = []
    seen: set[int] = set()
    for item in items:
        tensors = item.parameters() if isinstance(item, nn.Module) else [item]
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"scope items must be modules or tensors, got {type(t).__name__}")
            if t.requires_grad and id(t) not in seen:
                seen.add(id(t))
                params.append(t)
    if not params:
        raise ValueError("the harmonizer scope holds no parameter that requires grad")
    return params


def pair_slots(pair: tuple[str, str]) -> tuple[str, str]:
    """``(alignment slot, classification slot)`` of a pair of loss names.

    A loss named ``align`` or ``cls`` takes its own slot; otherwise the first of the pair takes the
    alignment slot.  GH++'s ``lead`` then names the slot that leads.

    Example:
        >>> pair_slots(("cls", "align")), pair_slots(("bridge_g", "bridge_d")), pair_slots(("cls", "entropy"))
        (('align', 'cls'), ('bridge_g', 'bridge_d'), ('entropy', 'cls'))
    """
    first, second = pair
    return (second, first) if first == CLS or second == ALIGN else (first, second)


@dataclass(frozen=True)
class _Plan:
    """The losses of one backward call, in their order, and how they are harmonized."""

    names: tuple[str, ...]
    losses: tuple[torch.Tensor, ...]
    trade_offs: tuple[float, ...]
    pairs: tuple[tuple[int, int], ...] | None  # (alignment slot, classification slot); None: GH over all

    def units(self) -> list[tuple[int, ...]]:
        """What is measured and cached together: each pair, or all the losses at once."""
        return list(self.pairs) if self.pairs is not None else [tuple(range(len(self.names)))]

    def key(self, unit: tuple[int, ...]) -> str:
        return "|".join(self.names[i] for i in unit)


def _check_known(names: Iterable[str], known: Sequence[str], what: str) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"{what} names unknown losses {unknown}; the losses are {list(known)}")


def _named_plan(
    losses: Mapping[str, torch.Tensor],
    trade_offs: Mapping[str, float] | None,
    pairs: Sequence[tuple[str, str]] | None,
    mode: str,
) -> _Plan:
    """Check the named losses, their trade-offs and pairs; put them in the order of the probes."""
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError("losses must be a non-empty mapping {name: scalar loss}")
    for name, loss in losses.items():
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"loss {name!r} must be a tensor, got {type(loss).__name__}")
        if loss.dim() != 0:
            raise ValueError(
                f"loss {name!r} must be a scalar (call .mean() or .sum() first), got shape {tuple(loss.shape)}"
            )
    names = tuple(losses)
    if len(names) < 2:
        raise ValueError(f"harmonizing needs at least two losses, got only {names[0]!r}")
    trade_offs = dict(trade_offs or {})
    _check_known(trade_offs, names, "trade_offs")
    if pairs is None and len(names) == 2:
        pairs = [names]
    if pairs is None:
        if mode in ("gh++", "gh++exact"):
            raise ValueError(
                f"{mode} is defined for two losses; for {len(names)} losses pass pairs=[(name, name), ...] to "
                "harmonize them pair by pair, or use mode='gh'"
            )
        order, index_pairs = names, None  # GH over all: the given order is the order of the projections
    else:
        order = _pair_order(pairs, names)
        index_pairs = tuple((i, i + 1) for i in range(0, 2 * len(pairs), 2))
    return _Plan(
        names=tuple(order),
        losses=tuple(losses[name] for name in order),
        trade_offs=tuple(float(trade_offs.get(name, 1.0)) for name in order),
        pairs=index_pairs,
    )


def _pair_order(pairs: Sequence[tuple[str, str]], names: Sequence[str]) -> list[str]:
    """The losses pair by pair (alignment slot first), then those in no pair: the order of probes and sums."""
    if not pairs:
        raise ValueError("pairs is empty: give at least one pair of loss names, or pairs=None")
    order: list[str] = []
    for pair in pairs:
        if isinstance(pair, str) or len(pair) != 2 or pair[0] == pair[1]:
            raise ValueError(f"each pair must hold two different loss names, got {pair!r}")
        _check_known(pair, names, f"pair {tuple(pair)}")
        twice = [name for name in pair if name in order]
        if twice:
            raise ValueError(f"loss {twice[0]!r} is in more than one pair; a loss may be in one pair only")
        order.extend(pair_slots(tuple(pair)))
    return order + [name for name in names if name not in order]


@dataclass
class LossesStats:
    r"""What one :meth:`Harmonizer.backward` call over named losses measured and applied.

    ``names`` are the losses in the order they were probed and summed: without pairs, the order
    given (GH's projection order); with pairs, pair by pair (alignment slot first), then the losses
    in no pair.  ``weights`` are the rule's :math:`w_i` (1 for a loss in no pair); the loss
    ``name`` entered the update with :meth:`coefficient` :math:`t_i w_i`.  ``gramian`` is the
    :math:`K \times K` Gramian the rule saw (unscaled, in ``names`` order; NaN on a reused step).
    ``pairs`` holds one :class:`StepStats` per harmonized pair, in the order given (the two-loss
    view: ``w_align`` and ``norm_align`` are those of the pair's alignment slot); ``first_pair`` is
    what :meth:`Harmonizer.summary` records: ``pairs[0]``, or without pairs the first two losses.
    """

    step: int
    mode: str
    strategy: str
    measured: bool
    names: tuple[str, ...]
    weights: dict[str, float]
    trade_offs: dict[str, float]
    gramian: tuple[tuple[float, ...], ...]
    conflict: bool  # some two of the gradients conflict
    guards: tuple[str, ...]
    unreached: dict[str, int]  # scope tensors each loss does not reach (counted as zeros)
    pairs: tuple[StepStats, ...]
    first_pair: StepStats

    def coefficient(self, name: str) -> float:
        """:math:`t_i w_i`: how much of the loss ``name`` the update holds."""
        return self.trade_offs[name] * self.weights[name]

    def cos(self, first: str, second: str) -> float:
        """Cosine of the angle between two losses' gradients (NaN when a norm is zero or unmeasured)."""
        i, j = self.names.index(first), self.names.index(second)
        denominator = math.sqrt(self.gramian[i][i] * self.gramian[j][j])
        return self.gramian[i][j] / denominator if denominator > 0 else math.nan

    def angle(self, first: str, second: str) -> float:
        """The angle between two losses' gradients, in degrees."""
        cos = self.cos(first, second)
        return math.degrees(math.acos(max(-1.0, min(1.0, cos)))) if math.isfinite(cos) else math.nan

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["guards"] = list(self.guards)
        d["gramian"] = [list(row) for row in self.gramian]
        d["pairs"] = [s.as_dict() for s in self.pairs]
        d["first_pair"] = self.first_pair.as_dict()
        return d


def _accumulate(tensor: torch.Tensor, grads: Sequence[torch.Tensor | None], coefficients: Sequence[float]) -> None:
    """``tensor.grad += sum_i c_i g_i`` in the losses' order, two terms at a time."""
    for i in range(0, len(grads), 2):
        second = (grads[i + 1], coefficients[i + 1]) if i + 1 < len(grads) else (None, 0.0)
        accumulate(tensor, grads[i], coefficients[i], *second)


def _weighted_sum(grads: Sequence[torch.Tensor | None], coefficients: Sequence[float]) -> torch.Tensor | None:
    """``sum_i c_i g_i`` in the losses' order (``None`` terms skipped; ``None`` if all are)."""
    total = None
    for i in range(0, len(grads), 2):
        second = (grads[i + 1], coefficients[i + 1]) if i + 1 < len(grads) else (None, 0.0)
        part = combine(grads[i], coefficients[i], *second)
        total = part if total is None else total if part is None else total.add_(part)
    return total


def _degenerate(result: HarmonizeResult | GramianResult) -> bool:
    """A result that must not become the cached weights (they are the plain fallback)."""
    return bool({"nonfinite", "tiny_norm"} & set(result.guards))


def _result_from_state(state: dict[str, Any]) -> HarmonizeResult | GramianResult:
    if "w_align" in state:
        return HarmonizeResult(**{**state, "guards": tuple(state["guards"])})
    return GramianResult(
        weights=tuple(state["weights"]),
        conflict=state["conflict"],
        guards=tuple(state["guards"]),
        pairs=tuple(_result_from_state(p) for p in state["pairs"]),
    )


class Harmonizer:
    """Harmonized backward for a classification loss and an alignment loss, or for K named losses.

    Args:
        mode: ``none``, ``gh``, ``gh++`` or ``gh++exact`` (see :mod:`gradharmony.harmonize`).
            ``none`` still measures the geometry (for diagnostics) and applies weights 1.
        scope: modules and/or parameters over which the Gramian is measured (the shared
            parameters).  ``None``: every parameter the losses reach.
        strategy: ``recombine`` (default; one pass per loss), ``reweight`` (the authors' scheme: one
            more) or ``features`` (Gramian on a feature tensor; the backbone is traversed once).
        k, lead: GH++ parameters (``lead``: ``align`` or ``cls``, the slot that leads in each pair).
        refresh_every: measure the weights every this many calls; reuse them in between.
        max_weight: optional cap on each weight (off by default, as in the authors' code).
        on_nonfinite: ``plain`` (no harmonization that step, counted) or ``raise``.
        probe_trade_off: measure each gradient after its trade-off (default: before, as the
            authors do).
        parameters: for ``recombine``, the tensors whose ``.grad`` to fill; by default every leaf
            of the losses' graphs (what ``loss.backward()`` would fill).
        distributed: ``auto`` (exact averaging when torch.distributed is initialised with more
            than one process), ``exact`` (require it) or ``off``.  In distributed mode the
            harmonizer averages every gradient itself: use an unwrapped model or DDP's
            ``no_sync()``.  See :mod:`gradharmony.distributed`.
        process_group: the group to average over (default: the world).
    """

    def __init__(
        self,
        mode: str = "gh",
        scope: nn.Module | Iterable | None = None,
        strategy: str = "recombine",
        k: float = 0.5,
        lead: str = "align",
        refresh_every: int = 1,
        max_weight: float | None = None,
        on_nonfinite: str = "plain",
        probe_trade_off: bool = False,
        parameters: Iterable[torch.Tensor] | None = None,
        distributed: str = "auto",
        process_group: Any = None,
    ):
        self.mode = check_mode(mode)
        check_k_lead(k, lead)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {refresh_every}")
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}")
        if max_weight is not None and max_weight < 1.0:
            raise ValueError(f"max_weight must be >= 1 (weights of 1 mean 'unchanged'), got {max_weight}")
        self.strategy, self.k, self.lead = strategy, k, lead
        self.refresh_every, self.max_weight = refresh_every, max_weight
        self.on_nonfinite, self.probe_trade_off = on_nonfinite, probe_trade_off
        self.scope = _scope_parameters(scope) if strategy != "features" else None
        self.parameters = list(parameters) if parameters is not None else None
        check_distributed(distributed)
        self.distributed, self.process_group = distributed, process_group
        self.calls = 0
        self.world: World | None = None
        self._cached: dict[str, HarmonizeResult | GramianResult] = {}  # per pair (or all losses), by their names
        self.running = RunningStats()

    def __repr__(self) -> str:
        n = "all" if self.scope is None else str(len(self.scope))
        return (
            f"Harmonizer(mode={self.mode!r}, strategy={self.strategy!r}, k={self.k}, "
            f"lead={self.lead!r}, refresh_every={self.refresh_every}, scope_tensors={n})"
        )

    @property
    def last(self) -> HarmonizeResult | None:
        """The cached weights of the pair ``(align, cls)`` (the two-loss call), once measured."""
        cached = self._cached.get(f"{ALIGN}|{CLS}")
        return cached if isinstance(cached, HarmonizeResult) else None

    # ---------------------------------------------------------------- public API
    def backward(
        self,
        *,
        cls: torch.Tensor | None = None,
        align: torch.Tensor | None = None,
        trade_off: float | None = None,
        losses: Mapping[str, torch.Tensor] | None = None,
        trade_offs: Mapping[str, float] | None = None,
        pairs: Sequence[tuple[str, str]] | None = None,
        features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        retain_graph: bool = False,
    ) -> StepStats | LossesStats:
        r"""Accumulate the harmonized gradient into ``.grad``, as ``loss.backward()`` would.

        Either two losses, ``backward(cls=..., align=..., trade_off=t)``: the gradient of
        :math:`t\,w_a L_{align} + w_c L_{cls}`, and a :class:`StepStats` back; or K named losses,
        ``backward(losses={name: loss}, trade_offs={name: t}, pairs=...)``: the gradient of

        .. math:: \sum_i t_i\, w_i\, L_i

        (weights held constant; :math:`t_i` = ``trade_offs[name]``, 1 where not given), and a
        :class:`LossesStats` back.  The per-loss gradients :math:`g_i` are probed before the
        trade-offs (unless ``probe_trade_off``) and their :math:`K \times K` Gramian over the scope
        gives the weights (:func:`gradharmony.harmonize.harmonize_gramian`):

        * without ``pairs``, ``gh``: GH over all K losses.  For each loss :math:`i` in the order of
          ``losses``, :math:`g_i'` starts as :math:`g_i` and, for each other loss :math:`j` in that
          order, loses its component along the original :math:`g_j` when
          :math:`\langle g_i', g_j \rangle < 0`; the update is :math:`\sum_i g_i' = \sum_j w_j g_j`.
          For two losses this is GH exactly.  ``gh++`` and ``gh++exact`` are defined for two
          losses: with more, pass ``pairs`` (a ``ValueError`` says so).
        * with ``pairs=[(a, b), ...]`` (any mode): each pair is harmonized with its own
          :math:`2 \times 2` Gramian, as the two-loss call does.  In a pair, a loss named
          ``align`` or ``cls`` takes that slot, otherwise the first takes the ``align`` slot;
          ``lead`` picks the slot that leads in GH++.  A loss in no pair gets :math:`w_i = 1`.
          Two losses without ``pairs`` are one pair.

        Cost: one probe per loss (K backward passes through the scope for ``recombine``, K + 1 for
        ``reweight``).  :meth:`summary` follows the first pair (``pairs[0]``, or the first two
        losses).

        Args:
            cls, align: the two losses (scalars) of the two-loss call; ``align`` as the shared
                parameters see it (reversed).
            trade_off: the two-loss call's :math:`t`, multiplying the alignment loss after its probe.
            losses: K >= 2 named scalar losses, in the order that GH's projections follow.
            trade_offs: :math:`t_i` by name (default 1), applied after the probes.
            pairs: pairs of loss names to harmonize each with its own Gramian; a loss in one pair
                at most.
            features: the shared feature tensor(s): required by ``features``; for ``recombine``, a
                cut below the scope that makes the probes cheaper (ignored when the scope reaches
                below it).
            scaler: an AMP ``GradScaler``; the losses are scaled for every backward pass.
            retain_graph: keep the graph after the last backward pass.

        Returns:
            the :class:`StepStats` of a two-loss call, the :class:`LossesStats` of a named one (its
            first pair is added to :meth:`summary`).

        Example:
            Three losses linear in a parameter ``p``, so that their gradients are the rows of ``g``:
            ``cls`` and ``align`` conflict (135 degrees), ``bridge`` is orthogonal to both.

            >>> import torch
            >>> from gradharmony import Harmonizer
            >>> g = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
            >>> p = torch.zeros(3, requires_grad=True)
            >>> losses = {"cls": g[0] @ p, "align": g[1] @ p, "bridge": g[2] @ p}
            >>> stats = Harmonizer(mode="gh", scope=p).backward(losses=losses, trade_offs={"align": 0.5})
            >>> stats.weights, round(stats.angle("cls", "align"), 6), stats.coefficient("align")
            ({'cls': 2.0, 'align': 1.5, 'bridge': 1.0}, 135.0, 0.75)
            >>> p.grad          # 2 g_cls + 0.5 * 1.5 g_align + 1 g_bridge
            tensor([1.2500, 0.7500, 2.0000])

            GH++ over four losses, pair by pair (each pair's first loss in the ``align`` slot, unless
            a loss is named ``align`` or ``cls``):

            >>> p = torch.zeros(3, requires_grad=True)
            >>> losses = {"align": g[1] @ p, "cls": g[0] @ p, "gvbg": g[2] @ p, "gvbd": -g[2] @ p}
            >>> stats = Harmonizer(mode="gh++").backward(losses=losses, pairs=[("cls", "align"), ("gvbg", "gvbd")])
            >>> {name: round(w, 4) for name, w in stats.weights.items()}
            {'align': 1.3902, 'cls': 0.6098, 'gvbg': 1.7654, 'gvbd': 0.2346}
            >>> [round(pair.angle, 1) for pair in stats.pairs]
            [135.0, 180.0]
        """
        if losses is None:
            if cls is None or align is None:
                raise ValueError("backward() needs cls= and align=, or losses={name: loss}")
            if trade_offs is not None or pairs is not None:
                raise ValueError(
                    "trade_offs= and pairs= go with losses={name: loss}; the two-loss call takes trade_off="
                )
            if cls.dim() != 0 or align.dim() != 0:
                raise ValueError("cls and align must be scalar losses (call .mean() or .sum() first)")
            t = 1.0 if trade_off is None else float(trade_off)
            plan = _Plan((ALIGN, CLS), (align, cls), (t, 1.0), ((0, 1),))
        else:
            if cls is not None or align is not None or trade_off is not None:
                raise ValueError("pass either cls=, align=, trade_off= or losses=, trade_offs=, pairs=, not both")
            plan = _named_plan(losses, trade_offs, pairs, self.mode)
        if self.strategy == "features" and features is None:
            raise ValueError("strategy='features' needs backward(..., features=<shared feature tensor>)")
        stats = self._backward(plan, features, scaler, retain_graph)
        self.running.update(stats.first_pair)
        return stats if losses is not None else stats.first_pair

    def summary(self) -> dict[str, Any]:
        """Running conflict rate, mean angle, mean applied weights and guard counts (of the first pair)."""
        return self.running.summary()

    def reset_summary(self) -> None:
        self.running.reset()

    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs: call count, cached weights, running statistics."""
        return {
            "calls": self.calls,
            "cached": {key: asdict(result) for key, result in self._cached.items()},
            "running": self.running.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        cached = dict(state.get("cached", {}))
        if state.get("last"):  # written before K losses: the cached weights of the two-loss call
            cached[f"{ALIGN}|{CLS}"] = state["last"]
        self._cached = {key: _result_from_state(result) for key, result in cached.items()}
        self.running.load_state_dict(state["running"])

    # ---------------------------------------------------------------- internals
    def _backward(
        self,
        plan: _Plan,
        features: torch.Tensor | Sequence[torch.Tensor] | None,
        scaler: torch.amp.GradScaler | None,
        retain_graph: bool,
    ) -> LossesStats:
        losses, scale = plan.losses, 1.0
        if scaler is not None and scaler.is_enabled():
            losses = tuple(scaler.scale(loss) for loss in losses)
            scale = float(scaler.get_scale())
        measure = self.calls % self.refresh_every == 0 or any(plan.key(u) not in self._cached for u in plan.units())
        step = self.calls
        self.calls += 1
        feats = feature_list(features)
        self.world = resolve_world(self.distributed, self.process_group)
        if not measure:
            result = self._reused(plan)
            self._weighted_backward(losses, self._coefficients(plan, result), retain_graph)
            return self._stats(step, plan, result, None, (), ())
        if self.strategy == "reweight":
            inputs = self.scope if self.scope is not None else graph_leaves(*losses)
            probes = [probe(loss, inputs, retain_graph=True) for loss in losses]
            self._average_probes(*probes)
            result, stats = self._measure(step, plan, probes, scale)
            self._weighted_backward(losses, self._coefficients(plan, result), retain_graph)
            return stats
        return self._recombine(step, plan, losses, scale, retain_graph, feats)

    def _measure(
        self, step: int, plan: _Plan, grads: list[Grads], scale: float, extra_guards: tuple[str, ...] = ()
    ) -> tuple[GramianResult, LossesStats]:
        gram = gramian(grads)
        if self.world is not None and self.strategy == "features":
            # Per-sample feature gradients: the global vector concatenates the processes' blocks.
            device = next((g.device for per_loss in grads for g in per_loss if g is not None), torch.device("cpu"))
            entries = [(i, j) for i in range(len(gram)) for j in range(i, len(gram))]
            gram = symmetric(len(gram), entries, sum_scalars([gram[i][j] for i, j in entries], self.world, device))
        unscale = 1.0 / (scale * scale)
        gram = [[value * unscale for value in row] for row in gram]
        if self.probe_trade_off:
            t = plan.trade_offs
            gram = [[value * t[i] * t[j] for j, value in enumerate(row)] for i, row in enumerate(gram)]
        result = harmonize_gramian(
            gram, mode=self.mode, pairs=plan.pairs, k=self.k, lead=self.lead, max_weight=self.max_weight
        )
        if "nonfinite" in result.guards and self.on_nonfinite == "raise":
            which = [_DESCRIPTIONS.get(n, repr(n)) for i, n in enumerate(plan.names) if not math.isfinite(gram[i][i])]
            raise FloatingPointError(
                f"non-finite gradient of the {' and '.join(which) or 'combined'} loss at harmonizer "
                f"step {step}; pass on_nonfinite='plain' to skip harmonization on such steps"
            )
        units = plan.units()
        for unit, unit_result in zip(units, result.pairs if plan.pairs is not None else [result]):
            key = plan.key(unit)
            if key not in self._cached or not _degenerate(unit_result):  # a degenerate step never becomes the cache
                self._cached[key] = unit_result
        unreached = tuple(sum(g is None for g in per_loss) for per_loss in grads)
        return result, self._stats(step, plan, result, gram, unreached, extra_guards)

    def _reused(self, plan: _Plan) -> GramianResult:
        """The cached weights of ``plan``'s pairs (or of all its losses at once)."""
        if plan.pairs is None:
            return self._cached[plan.key(plan.units()[0])]
        results = [self._cached[plan.key(pair)] for pair in plan.pairs]
        return GramianResult.of_pairs(len(plan.names), plan.pairs, results, any(r.conflict for r in results))

    @staticmethod
    def _coefficients(plan: _Plan, result: GramianResult) -> list[float]:
        return [t * w for t, w in zip(plan.trade_offs, result.weights)]

    def _stats(
        self,
        step: int,
        plan: _Plan,
        result: GramianResult,
        gram: list[list[float]] | None,
        unreached: tuple[int, ...],
        extra_guards: tuple[str, ...],
    ) -> LossesStats:
        """The call's statistics; ``gram`` is ``None`` on a reused step."""
        measured = gram is not None
        count = len(plan.names)
        if not measured:
            gram = [[math.nan] * count for _ in range(count)]
            unreached = (0,) * count

        def pair_stats(a: int, b: int, r: HarmonizeResult, guards: tuple[str, ...]) -> StepStats:
            if measured:
                guards = guards + (("unreached",) if unreached[a] or unreached[b] else ()) + extra_guards
            return StepStats(
                step=step,
                mode=self.mode,
                strategy=self.strategy,
                measured=measured,
                cos=r.cos,
                angle=r.angle,
                norm_align=math.sqrt(gram[a][a]) if gram[a][a] >= 0 else math.nan,
                norm_cls=math.sqrt(gram[b][b]) if gram[b][b] >= 0 else math.nan,
                w_align=r.w_align,
                w_cls=r.w_cls,
                conflict=r.conflict,
                trade_off=plan.trade_offs[a],
                guards=guards if measured else ("reused",),
                unreached_align=unreached[a],
                unreached_cls=unreached[b],
            )

        pairs = tuple(pair_stats(a, b, r, r.guards) for (a, b), r in zip(plan.pairs or (), result.pairs))
        if pairs:
            first_pair = pairs[0]
        else:  # GH over all: the geometry of the first two losses, with their weights and the call's guards
            a, b = (plan.names.index(name) for name in pair_slots(plan.names[:2]))
            geometry = harmonize(gram[a][a], gram[b][b], gram[a][b], mode="none") if measured else None
            view = HarmonizeResult(
                w_align=result.weights[a],
                w_cls=result.weights[b],
                cos=geometry.cos if geometry else math.nan,
                angle=geometry.angle if geometry else math.nan,
                conflict=geometry.conflict if geometry else result.conflict,
            )
            first_pair = pair_stats(a, b, view, result.guards)
        any_unreached = ("unreached",) if any(unreached) else ()
        return LossesStats(
            step=step,
            mode=self.mode,
            strategy=self.strategy,
            measured=measured,
            names=plan.names,
            weights=dict(zip(plan.names, result.weights)),
            trade_offs=dict(zip(plan.names, plan.trade_offs)),
            gramian=tuple(tuple(row) for row in gram),
            conflict=result.conflict,
            guards=result.guards + any_unreached + extra_guards if measured else ("reused",),
            unreached=dict(zip(plan.names, unreached)),
            pairs=pairs,
            first_pair=first_pair,
        )

    def _weighted_backward(
        self, losses: Sequence[torch.Tensor], coefficients: Sequence[float], retain_graph: bool
    ) -> None:
        total = losses[0] * coefficients[0]
        for loss, coefficient in zip(losses[1:], coefficients[1:]):
            total = total + loss * coefficient
        with averaged_new_gradients(self._leaves(losses), self.world):
            total.backward(retain_graph=retain_graph)

    def _leaves(self, losses: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if self.world is None:
            return []
        return self.parameters if self.parameters is not None else graph_leaves(*losses)

    def _average_probes(self, *grad_lists: Grads) -> None:
        """Across processes, the Gramian must be that of the averaged gradients."""
        if self.world is not None:
            average_([g for grads in grad_lists for g in grads if g is not None], self.world)

    def _recombine(
        self,
        step: int,
        plan: _Plan,
        losses: Sequence[torch.Tensor],
        scale: float,
        retain_graph: bool,
        feats: list[torch.Tensor],
    ) -> LossesStats:
        """One probe per loss, then every ``.grad`` rebuilt from them: no extra pass.

        With feature tensors given and every parameter of the scope above them, the probes stop
        at the features ("the cut"): the heads are traversed once per loss, and the combined
        feature gradient is sent through the backbone once.  That is the same update, exactly,
        at almost the cost of plain training.
        """
        upper = self._upper_leaves(losses, feats)
        if upper is not None:
            measured_on = feats if self.strategy == "features" else self.scope or upper
        elif self.strategy == "features":  # a parameter bypasses the cut: measure at it, then one full pass
            probes = [probe(loss, feats, retain_graph=True) for loss in losses]
            result, stats = self._measure(step, plan, probes, scale, ("bypass",))
            self._weighted_backward(losses, self._coefficients(plan, result), retain_graph)
            return stats
        else:
            upper = self.parameters if self.parameters is not None else graph_leaves(*losses)
            measured_on = self.scope or upper
            feats = []
        # Measured tensors first, in their fixed order, then every other input of the probes.
        first_ids = {id(t) for t in measured_on}
        inputs = list(measured_on) + [t for t in feats + upper if id(t) not in first_ids]
        last = len(losses) - 1
        probes = [
            probe(loss, inputs, retain_graph=i < last or retain_graph or bool(feats)) for i, loss in enumerate(losses)
        ]
        n = len(measured_on)
        if not feats:  # every gradient comes from the probes: average them all, once
            self._average_probes(*probes)
        elif self.strategy == "recombine":
            self._average_probes(*(per_loss[:n] for per_loss in probes))
        result, stats = self._measure(step, plan, [per_loss[:n] for per_loss in probes], scale)
        coefficients = self._coefficients(plan, result)
        feat_ids = {id(f) for f in feats}
        cut, cut_grads = [], []
        written = self._leaves(losses) if feats else []
        with averaged_new_gradients(written, self.world):
            with torch.no_grad():
                for position, tensor in enumerate(inputs):
                    grads = [per_loss[position] for per_loss in probes]
                    if id(tensor) in feat_ids:
                        combined = _weighted_sum(grads, coefficients)
                        if combined is not None:
                            cut.append(tensor)
                            cut_grads.append(combined)
                    else:
                        _accumulate(tensor, grads, coefficients)
            if cut:
                torch.autograd.backward(cut, grad_tensors=cut_grads, retain_graph=retain_graph)
        return stats

    def _upper_leaves(self, losses: Sequence[torch.Tensor], feats: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Leaves above the cut at ``feats``, or ``None`` if the probes cannot stop there.

        They cannot when a parameter below the features also reaches a loss around them (its
        gradient would be counted twice), or, for ``recombine``, when the scope is not entirely
        above the features.
        """
        if not feats or (self.strategy == "recombine" and self.scope is None):
            return None
        upper = graph_leaves(*losses, stop_at=feats)
        upper_ids = {id(t) for t in upper}
        if self.strategy == "recombine" and not all(id(t) in upper_ids for t in self.scope):
            return None  # checked first: it is the common case and needs no walk below the cut
        if any(id(t) in upper_ids for t in graph_leaves(*feats)):
            return None
        return upper
