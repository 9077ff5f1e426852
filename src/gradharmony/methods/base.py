r"""What every UDA method shares: :class:`Losses` and the :class:`Method` base class.

A method turns one batch into two named losses and knows nothing of GH; the harmonizer combines
them (``trade_off`` included), the engine wires the two.  The model is
``classifier(bottleneck(backbone(x)))``; a method adds its own adversaries (discriminators,
adversarial heads) and defines

* ``cls``: what the classifier is trained on (source cross-entropy, plus any entropy term);
* ``align``: the alignment loss *as the shared parameters receive it*: a gradient-reversal layer,
  if the method has one, sits inside the graph, so differentiating ``align`` gives the shared
  parameters the reversed (and scaled) gradient and the adversary the plain one.

:meth:`Method.compute_losses` runs **one** forward of the concatenated source + target batch (so
batch-norm statistics are shared, as in TLlib) after moving every gradient-reversal layer to the
given step; no forward call ever moves a schedule.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from gradharmony.models.grl import GradientReversal
from gradharmony.models.heads import Bottleneck, ClassifierHead

if TYPE_CHECKING:
    from gradharmony.harmonizer import Harmonizer
    from gradharmony.stats import StepStats

# Positional arguments of every method's constructor: not hyper-parameters.
_STRUCTURAL = ("self", "backbone", "num_classes", "max_steps")


@dataclass
class Losses:
    """The two losses of one step, the shared features, and scalars to log."""

    cls: torch.Tensor
    align: torch.Tensor
    features: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


@dataclass
class UpdateResult:
    """What :meth:`Method.update` did in one training step.

    ``stats``: the harmonizer's statistics of the call where GH is applied (``None`` if none was);
    ``loss_cls``, ``loss_align``: the step's losses as plain floats (NaN when a phase was skipped
    for non-finite gradients, so that the engine counts the step as skipped); ``logs``: extra scalars.
    """

    stats: "StepStats | None"
    loss_cls: float
    loss_align: float
    logs: dict[str, float] = field(default_factory=dict)


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
    #: ``True``: the method owns its update order (MCD, GVB-GD, DWL): the engine calls
    #: :meth:`update` instead of :meth:`compute_losses` + ``harmonizer.backward``.
    multi_step: ClassVar[bool] = False
    #: Why the method cannot train data-parallel (``None``: it can); the engine refuses to start
    #: it in several processes with this reason.  The built-in multi-step methods can: every
    #: phase steps through :func:`~gradharmony.methods.mcd.step_if_finite`, which averages the
    #: phase's gradients across processes, and the statistics that drive decisions are those of
    #: the global batch (DWL sums its window statistics, SSRT gathers its target predictions).
    distributed_blocker: ClassVar[str | None] = None

    def __init__(self, backbone: nn.Module, num_classes: int, max_steps: int,
                 bottleneck_dim: int = 256, *, backbone_lr_mult: float = 1.0,
                 bottleneck_dropout: float = 0.0):
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
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The shared features: ``bottleneck(backbone(x))``."""
        return self.bottleneck(self.backbone(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (for evaluation)."""
        return self.classifier(self.features(x))

    def set_step(self, step: int) -> None:
        """Move every gradient-reversal layer of the method to training step ``step``."""
        for module in self.modules():
            if isinstance(module, GradientReversal):
                module.set_step(step)

    # ------------------------------------------------------------------ losses
    def compute_losses(self, x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor,
                       step: int) -> Losses:
        """One forward of ``cat(x_s, x_t)`` at training step ``step``; see :class:`Losses`."""
        self.set_step(step)
        n_source = x_s.shape[0]
        features = self.features(torch.cat((x_s, x_t)))
        logits = self.classifier(features)
        cls = F.cross_entropy(logits[:n_source], y_s)
        align, logs = self.alignment(features, logits, n_source)
        source_acc = (logits[:n_source].argmax(dim=1) == y_s).float().mean()
        logs = scalars(cls_loss=cls, transfer_loss=align, source_acc=source_acc, **logs)
        return Losses(cls=cls, align=align, features=features, logs=logs)

    def alignment(self, features: torch.Tensor, logits: torch.Tensor,
                  n_source: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
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
        groups = [("backbone", backbone, self.backbone_lr_mult), ("heads", heads, 1.0),
                  ("adversary", adversary, 1.0)]
        return [{"params": params, "lr": lr * mult, "lr_mult": mult, "name": name}
                for name, params, mult in groups if params]

    def optimizer_groups(self, lr: float) -> dict[str, list[dict]]:
        """Named optimizers -> their SGD parameter groups (each with ``lr``, ``lr_mult``, ``name``).

        Default: one optimizer, ``{"all": self.parameter_groups(lr)}``.
        """
        return {"all": self.parameter_groups(lr)}

    # ------------------------------------------------------------------ whole training step
    def update(self, x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor, step: int,
               optimizers: dict[str, torch.optim.Optimizer], harmonizer: "Harmonizer",
               trade_off: float) -> UpdateResult:
        """A whole training step: zero_grad, forward(s), backward(s) (through the harmonizer where GH
        applies), optimizer steps.  The engine sets every group's ``lr`` before the call.

        Default (single-step methods): :meth:`compute_losses`, one harmonized backward, then every
        optimizer steps, unless a gradient is non-finite (no step; the losses are reported as NaN).
        Multi-step methods override it.
        """
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        losses = self.compute_losses(x_s, y_s, x_t, step)
        stats = None
        if losses.align.requires_grad:
            stats = harmonizer.backward(cls=losses.cls, align=losses.align, trade_off=trade_off,
                                        features=losses.features)
        else:
            losses.cls.backward()
        grads = [p.grad for opt in optimizers.values() for g in opt.param_groups for p in g["params"]
                 if p.grad is not None]
        finite = not grads or bool(torch.isfinite(torch.stack([g.detach().float().norm() for g in grads])).all())
        loss_cls = losses.logs.get("cls_loss", float(losses.cls.detach()))
        loss_align = losses.logs.get("transfer_loss", float(losses.align.detach()))
        if finite:
            for optimizer in optimizers.values():
                optimizer.step()
        else:
            for optimizer in optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            loss_cls = loss_align = float("nan")
        return UpdateResult(stats=stats, loss_cls=loss_cls, loss_align=loss_align, logs=dict(losses.logs))
