r"""What every UDA method shares: the update contract and the :class:`Method` base class.

A method turns one batch into two named losses and knows nothing of GH; the harmonizer combines
them (``trade_off`` included), the engine wires the two.  The model is
``classifier(bottleneck(backbone(x)))``; a method adds its own adversaries (discriminators,
adversarial heads) and defines

* ``cls``: what the classifier is trained on (source cross-entropy, plus any entropy term);
* ``align``: the alignment loss *as the shared parameters receive it*: a gradient-reversal layer,
  if the method has one, sits inside the graph, so differentiating ``align`` gives the shared
  parameters the reversed (and scaled) gradient and the adversary the plain one.

One forward's losses are a :class:`Losses` (for every method, whatever further terms it needs).
:meth:`Method.compute_losses` runs **one** forward of the concatenated source + target batch (so
batch-norm statistics are shared, as in TLlib) after moving every gradient-reversal layer to the
given step; no forward call ever moves a schedule.

**The update contract.**  Every method trains through :meth:`Method.update`::

    result = method.update(Batch(x_s, y_s, x_t), StepContext(step, optimizers, harmonizer, trade_off))

a whole training step (zero the gradients, forward(s), backward(s), optimizer steps) that returns
an :class:`UpdateResult`.  The base class's default is one forward (under the context's autocast),
one backward and one step of every optimizer; multi-step methods (MCD, GVB-GD, DWL, SSRT) override
it with their phases, with the same signature.  ``context.harmonizer`` is a
:class:`~gradharmony.Harmonizer`, or ``None`` for plain training: the backward of
:math:`L_{cls} + t\,L_{align}` (the engine trains ``--harmonizer none`` that way except on the
steps where it measures the geometry).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from gradharmony.distributed import World, averaged_new_gradients, check_distributed, resolve_world
from gradharmony.reversal import GradientReversal
from gradharmony.uda.methods.steps import grads_finite, pair_backward, zero_grads
from gradharmony.uda.models.heads import Bottleneck, ClassifierHead

if TYPE_CHECKING:
    from gradharmony.harmonizer import Harmonizer
    from gradharmony.stats import StepStats

# Positional arguments of every method's constructor: not hyper-parameters.
_STRUCTURAL = ("self", "backbone", "num_classes", "max_steps")


@dataclass
class Losses:
    """One forward's losses, for every method.

    ``cls``, ``align``: the two losses GH weighs (scalars).  ``features``: the shared features
    (the bottleneck output, or a list of per-domain tensors), what a ``features`` strategy measures
    at.  ``cut``: the backbone output the features are computed from (``None`` if the method does
    not expose it); under a bottleneck scope the harmonizer's probes can stop there.  ``logs``:
    scalars to log (floats, or 0-dim tensors not fetched yet: :func:`scalars` turns them into
    floats with one synchronisation).  ``extra``: any further named terms a method needs besides
    the two losses (GVB-GD's bridge penalties, SSRT's domain and refinement losses, ...).
    """

    cls: torch.Tensor
    align: torch.Tensor
    features: torch.Tensor | Sequence[torch.Tensor]
    cut: torch.Tensor | Sequence[torch.Tensor] | None = None
    logs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    """One training batch: labelled source examples and unlabelled target examples."""

    source: torch.Tensor
    source_labels: torch.Tensor
    target: torch.Tensor


@dataclass
class StepContext:
    """Everything :meth:`Method.update` needs besides the batch.

    Args:
        step: the training step (moves gradient-reversal schedules and the methods' own clocks).
        optimizers: name -> optimizer (:meth:`Method.optimizer_groups`); their ``lr`` is set.
        harmonizer: the :class:`~gradharmony.Harmonizer` of the harmonized backward passes, or
            ``None`` for plain training (one backward of :math:`L_{cls} + t\\,L_{align}`).
        trade_off: :math:`t`, the weight of the alignment loss.
        autocast_dtype: mixed precision of the forward (``torch.bfloat16``, ``torch.float16``),
            ``None``: off.
        device_type: the autocast device type (``"cpu"``, ``"cuda"``).
        scaler: a ``torch.amp.GradScaler`` (fp16), or ``None``.
        use_cut: pass :attr:`Losses.cut` (the backbone output) as the harmonizer's ``features=``
            instead of :attr:`Losses.features` (the engine sets it for the ``bottleneck`` and
            ``heads`` scopes under the ``recombine`` strategy: the probes stop at the backbone output).
        distributed, process_group: how gradients of plain training are averaged across
            processes (``auto``: over the initialised group of more than one process, if any;
            ``off``: never), as :class:`~gradharmony.Harmonizer`'s arguments of the same names.
    """

    step: int
    optimizers: dict[str, torch.optim.Optimizer]
    harmonizer: Harmonizer | None = None
    trade_off: float = 1.0
    autocast_dtype: torch.dtype | None = None
    device_type: str = "cpu"
    scaler: torch.amp.GradScaler | None = None
    use_cut: bool = False
    distributed: str = "auto"
    process_group: Any = None

    def __post_init__(self) -> None:
        check_distributed(self.distributed)

    @property
    def world(self) -> World | None:
        """The process group that gradients are averaged over, or ``None`` (one process)."""
        return resolve_world(self.distributed, self.process_group)

    def autocast(self) -> AbstractContextManager:
        """The forward's autocast context (disabled when ``autocast_dtype`` is ``None``)."""
        return torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)


@dataclass
class UpdateResult:
    """What :meth:`Method.update` did in one training step.

    ``stats``: the harmonizer's statistics of the call where GH is applied (``None`` if none was:
    plain training, or nothing to harmonize); ``loss_cls``, ``loss_align``: the step's losses as
    plain floats (NaN when the step, or a phase of it, was skipped for non-finite gradients, so
    that the engine counts the step as skipped); ``logs``: extra scalars; ``guards``: why
    ``stats`` is ``None`` (``plain``: trained without a harmonizer; ``no_align``: the method has
    no alignment loss).
    """

    stats: StepStats | None
    loss_cls: float
    loss_align: float
    logs: dict[str, float] = field(default_factory=dict)
    guards: tuple[str, ...] = ()

    @property
    def finite(self) -> bool:
        """Whether the step was taken: both losses finite."""
        return math.isfinite(self.loss_cls) and math.isfinite(self.loss_align)

    @classmethod
    def of_phases(
        cls, stats: StepStats | None, logs: dict[str, float], taken: bool, harmonizer: Harmonizer | None
    ) -> UpdateResult:
        """The result of a multi-phase step: the losses are ``logs["cls_loss"]`` and
        ``logs["transfer_loss"]`` (NaN where absent, and both NaN unless ``taken``, i.e. when a phase
        was skipped for non-finite gradients); ``guards`` is ``plain`` without a harmonizer,
        ``no_harmonizer`` if one was given but no phase went through it."""
        nan = math.nan
        return cls(
            stats=stats,
            loss_cls=logs.get("cls_loss", nan) if taken else nan,
            loss_align=logs.get("transfer_loss", nan) if taken else nan,
            logs=logs,
            guards=("plain",) if harmonizer is None else ("no_harmonizer",) if stats is None else (),
        )


def entropy(logits: torch.Tensor) -> torch.Tensor:
    r"""Per-sample entropy :math:`H(p) = -\sum_k p_k \log p_k` of ``softmax(logits)`` (stable)."""
    log_p = F.log_softmax(logits, dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def scalars(**values: torch.Tensor | float) -> dict[str, float]:
    """Detached Python floats, fetched with one device synchronisation."""
    names = list(values)
    tensors = [torch.as_tensor(v).detach().float().reshape(()) for v in values.values()]
    if not tensors:
        return {}
    device = tensors[0].device
    return dict(zip(names, torch.stack([t.to(device) for t in tensors]).tolist()))


class Method(nn.Module):
    r"""Base class: backbone, bottleneck and classifier, one forward per step, shared plumbing.

    Subclasses set ``name`` and ``default_lead`` and implement :meth:`alignment`.  Every
    hyper-parameter is a keyword argument with a default and is stored as an attribute of the same
    name, so :attr:`hparams` lists the resolved values.

    Args:
        backbone: a module with an ``out_features`` attribute.
        num_classes: number of classes.
        max_steps: training steps (the horizon of gradient-reversal schedules).
        bottleneck_dim: width of the bottleneck (the shared features).
        backbone_lr_mult: learning-rate multiplier of the backbone (1.0 for digit backbones
            trained from scratch; 0.1 for pretrained ones, as in TLlib).
        bottleneck_dropout: dropout after the bottleneck's ReLU.
    """

    name: ClassVar[str] = ""
    default_lead: ClassVar[str] = "align"
    #: ``True`` for methods that override :meth:`update` with several phases (MCD, GVB-GD, DWL,
    #: SSRT); set for every subclass from whether it overrides :meth:`update`.  Informational
    #: only: the engine calls :meth:`update` for every method alike.
    multi_step: ClassVar[bool] = False
    #: Why the method cannot train data-parallel (``None``: it can); the engine refuses to start
    #: it in several processes with this reason.  The built-in multi-step methods can: every
    #: phase steps through :func:`~gradharmony.uda.methods.steps.step_if_finite`, which averages the
    #: phase's gradients across processes, and the statistics that drive decisions are those of
    #: the global batch (DWL sums its window statistics, SSRT gathers its target predictions).
    distributed_blocker: ClassVar[str | None] = None
    #: Whether :meth:`update` runs its forwards under ``context.autocast()`` and its backward passes
    #: through ``context.scaler`` (``amp`` bf16 / fp16).  The base update does; a subclass that
    #: overrides :meth:`update` is taken not to unless it sets this itself, and the config refuses
    #: ``amp`` for it instead of training silently in full precision.
    supports_amp: ClassVar[bool] = True

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        max_steps: int,
        bottleneck_dim: int = 256,
        *,
        backbone_lr_mult: float = 1.0,
        bottleneck_dropout: float = 0.0,
    ):
        super().__init__()
        in_features = getattr(backbone, "out_features", None)
        if not isinstance(in_features, int):
            raise TypeError("the backbone must have an integer `out_features` attribute")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {max_steps}")
        self.num_classes, self.max_steps = num_classes, max_steps
        self.bottleneck_dim, self.backbone_lr_mult = bottleneck_dim, backbone_lr_mult
        self.bottleneck_dropout = bottleneck_dropout
        self.backbone = backbone
        self.bottleneck = Bottleneck(in_features, bottleneck_dim, dropout=bottleneck_dropout)
        self.classifier: nn.Module = ClassifierHead(bottleneck_dim, num_classes)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.multi_step = cls.update is not Method.update
        if "update" in cls.__dict__ and "supports_amp" not in cls.__dict__:
            cls.supports_amp = False

    # ------------------------------------------------------------------ hyper-parameters
    @classmethod
    def hparam_defaults(cls) -> dict[str, Any]:
        """Every hyper-parameter the constructor accepts, with its default (subclass wins)."""
        defaults: dict[str, Any] = {}
        for klass in cls.__mro__:
            if not (isinstance(klass, type) and issubclass(klass, Method)):
                continue
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.name in _STRUCTURAL or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                    continue
                defaults.setdefault(p.name, p.default)
        return defaults

    @property
    def hparams(self) -> dict[str, Any]:
        """The resolved hyper-parameters of this instance."""
        return {name: getattr(self, name) for name in self.hparam_defaults()}

    # ------------------------------------------------------------------ model
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, cut)``: the shared features ``bottleneck(h)`` and the backbone output ``h``."""
        cut = self.backbone(x)
        return self.bottleneck(cut), cut

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The shared features: ``bottleneck(backbone(x))``."""
        return self.encode(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (for evaluation)."""
        return self.classifier(self.features(x))

    def set_step(self, step: int) -> None:
        """Move every gradient-reversal layer of the method to training step ``step``."""
        for module in self.modules():
            if isinstance(module, GradientReversal):
                module.set_step(step)

    # ------------------------------------------------------------------ losses
    def compute_losses(self, x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor, step: int) -> Losses:
        """One forward of ``cat(x_s, x_t)`` at training step ``step``; see :class:`Losses`."""
        self.set_step(step)
        n_source = x_s.shape[0]
        features, cut = self.encode(torch.cat((x_s, x_t)))
        logits = self.classifier(features)
        cls = F.cross_entropy(logits[:n_source], y_s)
        align, logs = self.alignment(features, logits, n_source)
        source_acc = (logits[:n_source].argmax(dim=1) == y_s).float().mean()
        logs = scalars(cls_loss=cls, transfer_loss=align, source_acc=source_acc, **logs)
        return Losses(cls=cls, align=align, features=features, cut=cut, logs=logs)

    def alignment(
        self, features: torch.Tensor, logits: torch.Tensor, n_source: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """The alignment loss and extra log scalars, from the concatenated batch's outputs."""
        raise NotImplementedError

    # ------------------------------------------------------------------ GH and optimiser
    def scope_modules(self) -> list[nn.Module]:
        """Default GH scope: backbone + bottleneck + classifier (the authors' CDAN scope)."""
        return [self.backbone, self.bottleneck, self.classifier]

    def parameter_groups(self, lr: float) -> list[dict]:
        """SGD parameter groups ``backbone``, ``heads`` (bottleneck, classifier), ``adversary``.

        Each group carries ``name`` and ``lr_mult`` (its ``lr`` is ``lr * lr_mult``) so that a
        scheduler can rescale it; empty groups are left out.
        """
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        heads = [p for m in (self.bottleneck, self.classifier) for p in m.parameters() if p.requires_grad]
        taken = {id(p) for p in backbone + heads}
        adversary = [p for p in self.parameters() if p.requires_grad and id(p) not in taken]
        groups = [("backbone", backbone, self.backbone_lr_mult), ("heads", heads, 1.0), ("adversary", adversary, 1.0)]
        return [
            {"params": params, "lr": lr * mult, "lr_mult": mult, "name": name}
            for name, params, mult in groups
            if params
        ]

    def optimizer_groups(self, lr: float) -> dict[str, list[dict]]:
        """Named optimizers -> their SGD parameter groups (each with ``lr``, ``lr_mult``, ``name``).

        Default: one optimizer, ``{"all": self.parameter_groups(lr)}``.
        """
        return {"all": self.parameter_groups(lr)}

    # ------------------------------------------------------------------ whole training step
    def update(self, batch: Batch, context: StepContext) -> UpdateResult:
        r"""A whole training step: zero the gradients, forward(s), backward(s), optimizer steps.

        The caller sets every group's ``lr`` before the call.  Default (single-step methods): one
        :meth:`compute_losses` under ``context.autocast()``, then one backward:

        * with ``context.harmonizer``: the harmonized backward of the pair (``features=`` is
          :attr:`Losses.cut` when ``context.use_cut``, else :attr:`Losses.features`), which
          averages its gradients across processes itself;
        * without (``None``, plain training): one backward of :math:`L_{cls} + t\,L_{align}`, its
          gradients averaged across processes (``context.world``);
        * an alignment loss that does not require grad (source only): one backward of
          :math:`L_{cls}`, whatever the harmonizer (nothing to harmonize; ``guards`` ``no_align``).

        Losses are scaled by ``context.scaler`` if given; every optimizer then steps through it
        (the scaler skips overflowing steps itself).  Without a scaler every optimizer steps unless
        a gradient or a loss is non-finite: then nothing steps, the gradients are cleared and the
        losses are reported as NaN.  Multi-step methods override this method, same signature.

        Example:
            >>> import torch
            >>> from gradharmony import Harmonizer
            >>> from gradharmony.uda.methods import Batch, StepContext, build_method
            >>> from gradharmony.uda.models import build_backbone
            >>> _ = torch.manual_seed(0)
            >>> method = build_method("dann", build_backbone("lenet", 1, 28), num_classes=10,
            ...                       max_steps=100, bottleneck_dim=32, disc_hidden=16)
            >>> optimizers = {name: torch.optim.SGD(groups, lr=0.01, momentum=0.9)
            ...               for name, groups in method.optimizer_groups(0.01).items()}
            >>> batch = Batch(torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,)), torch.rand(4, 1, 28, 28))
            >>> harmonizer = Harmonizer(mode="gh++", scope=method.scope_modules(), lead=method.default_lead)
            >>> result = method.update(batch, StepContext(step=50, optimizers=optimizers,
            ...                                           harmonizer=harmonizer, trade_off=1.0))
            >>> result.stats.mode, result.finite, harmonizer.calls
            ('gh++', True, 1)
            >>> plain = method.update(batch, StepContext(step=51, optimizers=optimizers))  # no harmonizer
            >>> plain.stats, plain.guards, harmonizer.calls
            (None, ('plain',), 1)
        """
        every = list(context.optimizers.values())
        with context.autocast():
            losses = self.compute_losses(batch.source, batch.source_labels, batch.target, context.step)
        zero_grads(every)
        no_align = not losses.align.requires_grad  # source only: nothing to harmonize
        harmonizer = None if no_align else context.harmonizer
        stats, guards = None, ()
        if harmonizer is not None:
            features = losses.cut if context.use_cut and losses.cut is not None else losses.features
            stats = pair_backward(
                harmonizer,
                cls=losses.cls,
                align=losses.align,
                trade_off=context.trade_off,
                features=features,
                scaler=context.scaler,
            )
        else:
            world = context.world
            leaves = [p for p in self.parameters() if p.requires_grad] if world is not None else []
            with averaged_new_gradients(leaves, world):
                if no_align:
                    cls = losses.cls
                    (context.scaler.scale(cls) if context.scaler is not None else cls).backward()
                else:
                    pair_backward(
                        None, cls=losses.cls, align=losses.align, trade_off=context.trade_off, scaler=context.scaler
                    )
            guards = ("no_align",) if no_align else ("plain",)
        logs = losses.logs
        loss_cls = logs["cls_loss"] if "cls_loss" in logs else float(losses.cls.detach())
        loss_align = logs["transfer_loss"] if "transfer_loss" in logs else float(losses.align.detach())
        if context.scaler is not None:  # the scaler skips overflowing steps itself and lowers its scale
            for optimizer in every:
                context.scaler.step(optimizer)
            context.scaler.update()
            return UpdateResult(stats, loss_cls, loss_align, logs, guards)
        if math.isfinite(loss_cls) and math.isfinite(loss_align) and grads_finite(self.parameters()):
            for optimizer in every:
                optimizer.step()
        else:
            zero_grads(every)
            loss_cls = loss_align = math.nan
        return UpdateResult(stats, loss_cls, loss_align, logs, guards)
