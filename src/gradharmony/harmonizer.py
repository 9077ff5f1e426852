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

Strategies (how the per-loss gradients are obtained; ``reweight`` and ``recombine`` give the same
``.grad`` up to rounding; ``features`` measures a different Gramian):

``reweight``
    the authors' scheme: probe each loss over the scope (two backward passes, which only traverse
    the graph between the losses and the scope), then one backward of the weighted loss.
``recombine``
    two backward passes; each ``.grad`` is rebuilt as :math:`t w_a g_a + w_c g_c` from the
    probes, so no third pass is needed.  When the scope lies entirely above a feature tensor passed
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
from collections.abc import Iterable, Sequence
from dataclasses import asdict
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
from gradharmony.gradients import Grads, accumulate, combine, feature_list, gramian_of, graph_leaves, probe
from gradharmony.harmonize import HarmonizeResult, check_k_lead, check_mode, harmonize
from gradharmony.stats import RunningStats, StepStats

STRATEGIES: tuple[str, ...] = ("reweight", "recombine", "features")
NONFINITE_POLICIES: tuple[str, ...] = ("plain", "raise")


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


class Harmonizer:
    """Harmonized backward for a classification loss and an alignment loss.

    Args:
        mode: ``none``, ``gh``, ``gh++`` or ``gh++exact`` (see :mod:`gradharmony.harmonize`).
            ``none`` still measures the geometry (for diagnostics) and applies weights 1.
        scope: modules and/or parameters over which the Gramian is measured (the shared
            parameters).  ``None``: every parameter the two losses reach.
        strategy: ``recombine`` (default; two passes), ``reweight`` (the authors' three passes) or
            ``features`` (Gramian on a feature tensor; the backbone is traversed once).
        k, lead: GH++ parameters (``lead``: ``align`` or ``cls``).
        refresh_every: measure the weights every this many calls; reuse them in between.
        max_weight: optional cap on each weight (off by default, as in the authors' code).
        on_nonfinite: ``plain`` (no harmonization that step, counted) or ``raise``.
        probe_trade_off: measure the alignment gradient after the trade-off (default: before,
            as the authors do).
        parameters: for ``recombine``, the tensors whose ``.grad`` to fill; by default every leaf
            of the two losses' graphs (what ``loss.backward()`` would fill).
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
        self.last: HarmonizeResult | None = None
        self.running = RunningStats()

    def __repr__(self) -> str:
        n = "all" if self.scope is None else str(len(self.scope))
        return (
            f"Harmonizer(mode={self.mode!r}, strategy={self.strategy!r}, k={self.k}, "
            f"lead={self.lead!r}, refresh_every={self.refresh_every}, scope_tensors={n})"
        )

    # ---------------------------------------------------------------- public API
    def backward(
        self,
        *,
        cls: torch.Tensor,
        align: torch.Tensor,
        trade_off: float = 1.0,
        features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        retain_graph: bool = False,
    ) -> StepStats:
        """Accumulate the harmonized gradient into ``.grad``, as ``loss.backward()`` would.

        Args:
            cls: the classification loss (scalar).
            align: the alignment loss (scalar), as the shared parameters see it (reversed).
            trade_off: multiplies the alignment loss after its probe.
            features: the shared feature tensor(s): required by ``features``; for ``recombine``, a
                cut below the scope that makes the probes cheaper (ignored when the scope reaches
                below it).
            scaler: an AMP ``GradScaler``; the losses are scaled for every backward pass.
            retain_graph: keep the graph after the last backward pass.

        Returns:
            the :class:`StepStats` of this call (also added to :meth:`summary`).
        """
        if cls.dim() != 0 or align.dim() != 0:
            raise ValueError("cls and align must be scalar losses (call .mean() or .sum() first)")
        if self.strategy == "features" and features is None:
            raise ValueError("strategy='features' needs backward(..., features=<shared feature tensor>)")
        trade_off = float(trade_off)
        scale = 1.0
        if scaler is not None and scaler.is_enabled():
            cls, align = scaler.scale(cls), scaler.scale(align)
            scale = float(scaler.get_scale())

        measure = self.last is None or self.calls % self.refresh_every == 0
        step = self.calls
        self.calls += 1
        feats = feature_list(features)
        self.world = resolve_world(self.distributed, self.process_group)
        if not measure:
            result = self.last
            self._weighted_backward(cls, align, trade_off, result, retain_graph)
            stats = self._stats(step, False, result, math.nan, math.nan, trade_off, (), 0, 0)
        elif self.strategy == "reweight":
            inputs = self.scope if self.scope is not None else graph_leaves(align, cls)
            g_align = probe(align, inputs, retain_graph=True)
            g_cls = probe(cls, inputs, retain_graph=True)
            self._average_probes(g_align, g_cls)
            result, stats = self._measure(step, g_align, g_cls, trade_off, scale)
            self._weighted_backward(cls, align, trade_off, result, retain_graph)
        else:
            stats = self._recombine(step, cls, align, trade_off, scale, retain_graph, feats)
        self.running.update(stats)
        return stats

    def summary(self) -> dict[str, Any]:
        """Running conflict rate, mean angle, mean applied weights and guard counts."""
        return self.running.summary()

    def reset_summary(self) -> None:
        self.running.reset()

    def state_dict(self) -> dict[str, Any]:
        """What an exact resume needs: call count, cached weights, running statistics."""
        return {
            "calls": self.calls,
            "last": asdict(self.last) if self.last else None,
            "running": self.running.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        last = state["last"]
        self.last = HarmonizeResult(**{**last, "guards": tuple(last["guards"])}) if last else None
        self.running.load_state_dict(state["running"])

    # ---------------------------------------------------------------- internals
    def _measure(
        self,
        step: int,
        g_align: Grads,
        g_cls: Grads,
        trade_off: float,
        scale: float,
        extra_guards: tuple[str, ...] = (),
    ) -> tuple[HarmonizeResult, StepStats]:
        aa, cc, d = gramian_of(g_align, g_cls)
        if self.world is not None and self.strategy == "features":
            # Per-sample feature gradients: the global vector concatenates the processes' blocks.
            device = next((g.device for g in g_align + g_cls if g is not None), torch.device("cpu"))
            aa, cc, d = sum_scalars([aa, cc, d], self.world, device)
        unscale = 1.0 / (scale * scale)
        aa, cc, d = aa * unscale, cc * unscale, d * unscale
        if self.probe_trade_off:
            aa, d = aa * trade_off * trade_off, d * trade_off
        result = harmonize(aa, cc, d, mode=self.mode, k=self.k, lead=self.lead, max_weight=self.max_weight)
        if "nonfinite" in result.guards and self.on_nonfinite == "raise":
            which = [name for name, v in (("alignment", aa), ("classification", cc)) if not math.isfinite(v)]
            raise FloatingPointError(
                f"non-finite gradient of the {' and '.join(which) or 'combined'} loss at harmonizer "
                f"step {step}; pass on_nonfinite='plain' to skip harmonization on such steps"
            )
        if "nonfinite" not in result.guards and "tiny_norm" not in result.guards:
            self.last = result  # a degenerate step never becomes the cached weights
        elif self.last is None:
            self.last = result
        unreached_a = sum(g is None for g in g_align)
        unreached_c = sum(g is None for g in g_cls)
        guards = result.guards + (("unreached",) if unreached_a or unreached_c else ()) + extra_guards
        stats = self._stats(step, True, result, aa, cc, trade_off, guards, unreached_a, unreached_c)
        return result, stats

    def _stats(
        self,
        step: int,
        measured: bool,
        r: HarmonizeResult,
        aa: float,
        cc: float,
        trade_off: float,
        guards: tuple[str, ...],
        unreached_a: int,
        unreached_c: int,
    ) -> StepStats:
        if not measured:
            guards = ("reused",)
        return StepStats(
            step=step,
            mode=self.mode,
            strategy=self.strategy,
            measured=measured,
            cos=r.cos,
            angle=r.angle,
            norm_align=math.sqrt(aa) if aa >= 0 else math.nan,
            norm_cls=math.sqrt(cc) if cc >= 0 else math.nan,
            w_align=r.w_align,
            w_cls=r.w_cls,
            conflict=r.conflict,
            trade_off=trade_off,
            guards=guards,
            unreached_align=unreached_a,
            unreached_cls=unreached_c,
        )

    def _weighted_backward(
        self, cls: torch.Tensor, align: torch.Tensor, trade_off: float, r: HarmonizeResult, retain_graph: bool
    ) -> None:
        total = align * (trade_off * r.w_align) + cls * r.w_cls
        with averaged_new_gradients(self._leaves(cls, align), self.world):
            total.backward(retain_graph=retain_graph)

    def _leaves(self, cls: torch.Tensor, align: torch.Tensor) -> list[torch.Tensor]:
        if self.world is None:
            return []
        return self.parameters if self.parameters is not None else graph_leaves(align, cls)

    def _average_probes(self, *grad_lists: Grads) -> None:
        """Across processes, the Gramian must be that of the averaged gradients."""
        if self.world is not None:
            average_([g for grads in grad_lists for g in grads if g is not None], self.world)

    def _recombine(
        self,
        step: int,
        cls: torch.Tensor,
        align: torch.Tensor,
        trade_off: float,
        scale: float,
        retain_graph: bool,
        feats: list[torch.Tensor],
    ) -> StepStats:
        """Two probe passes, then every ``.grad`` rebuilt from them: no third pass.

        With feature tensors given and every parameter of the scope above them, the probes stop
        at the features ("the cut"): the heads are traversed once per loss, and the combined
        feature gradient is sent through the backbone once.  That is the same update, exactly,
        at almost the cost of plain training.
        """
        upper = self._upper_leaves(cls, align, feats)
        if upper is not None:
            measured_on = feats if self.strategy == "features" else self.scope or upper
        elif self.strategy == "features":  # a parameter bypasses the cut: measure at it, then one full pass
            g_align = probe(align, feats, retain_graph=True)
            g_cls = probe(cls, feats, retain_graph=True)
            result, stats = self._measure(step, g_align, g_cls, trade_off, scale, ("bypass",))
            self._weighted_backward(cls, align, trade_off, result, retain_graph)
            return stats
        else:
            upper = self.parameters if self.parameters is not None else graph_leaves(align, cls)
            measured_on = self.scope or upper
            feats = []
        # Measured tensors first, in their fixed order, then every other input of the probes.
        first_ids = {id(t) for t in measured_on}
        inputs = list(measured_on) + [t for t in feats + upper if id(t) not in first_ids]
        g_align = probe(align, inputs, retain_graph=True)
        g_cls = probe(cls, inputs, retain_graph=retain_graph or bool(feats))
        n = len(measured_on)
        if not feats:  # every gradient comes from the probes: average them all, once
            self._average_probes(g_align, g_cls)
        elif self.strategy == "recombine":
            self._average_probes(g_align[:n], g_cls[:n])
        result, stats = self._measure(step, g_align[:n], g_cls[:n], trade_off, scale)
        coef_align, coef_cls = trade_off * result.w_align, result.w_cls
        feat_ids = {id(f) for f in feats}
        cut, cut_grads = [], []
        written = self._leaves(cls, align) if feats else []
        with averaged_new_gradients(written, self.world):
            with torch.no_grad():
                for tensor, ga, gc in zip(inputs, g_align, g_cls):
                    if id(tensor) in feat_ids:
                        combined = combine(ga, coef_align, gc, coef_cls)
                        if combined is not None:
                            cut.append(tensor)
                            cut_grads.append(combined)
                    else:
                        accumulate(tensor, ga, coef_align, gc, coef_cls)
            if cut:
                torch.autograd.backward(cut, grad_tensors=cut_grads, retain_graph=retain_graph)
        return stats

    def _upper_leaves(
        self, cls: torch.Tensor, align: torch.Tensor, feats: list[torch.Tensor]
    ) -> list[torch.Tensor] | None:
        """Leaves above the cut at ``feats``, or ``None`` if the probes cannot stop there.

        They cannot when a parameter below the features also reaches a loss around them (its
        gradient would be counted twice), or, for ``recombine``, when the scope is not entirely
        above the features.
        """
        if not feats or (self.strategy == "recombine" and self.scope is None):
            return None
        upper = graph_leaves(align, cls, stop_at=feats)
        upper_ids = {id(t) for t in upper}
        if self.strategy == "recombine" and not all(id(t) in upper_ids for t in self.scope):
            return None  # checked first: it is the common case and needs no walk below the cut
        if any(id(t) in upper_ids for t in graph_leaves(*feats)):
            return None
        return upper
