r"""GVB-GD: Gradually Vanishing Bridge (Cui et al., CVPR 2020), with GH on both loss pairs.

**Generator bridge** (GVB-G).  The classifier has a second linear map, the bridge
:math:`b(f)`, and outputs :math:`z = C(f) - b(f)` (training and evaluation alike); the penalty
:math:`L_{bg} = \mathrm{mean}|b(f)|` over the batch and classes makes the bridge vanish gradually.

**Discriminator bridge** (GVB-D).  The discriminator sees the predictions
:math:`p = \mathrm{softmax}(z)` through a gradient-reversal layer :math:`R_\lambda` and has two
outputs on a shared hidden representation :math:`h`: :math:`a(h)` and its bridge :math:`e(h)`; the
domain logit is :math:`a(h) - e(h)` and :math:`L_{bd} = \mathrm{mean}|e(h)|`.  As in the authors'
code the bridge penalty is taken *through* :math:`R_\lambda`: it trains the discriminator's bridge
plainly and reaches the classifier reversed.

**Transfer loss** (entropy-conditioned, as CDAN+E but with :math:`w = e^{-H}`):

.. math::
    L_{align} = \tfrac12\Big[\frac{\sum_{i\in s} w_i\,\mathrm{BCE}(a_i - e_i, 1)}{\sum_{i\in s} w_i}
              + \frac{\sum_{j\in t} w_j\,\mathrm{BCE}(a_j - e_j, 0)}{\sum_{j\in t} w_j}\Big],
    \qquad w = \exp(-R_\lambda(H(p))),

with the normalisers held constant and the entropy reversed by the same :math:`R_\lambda` (the
authors hook a reversal on it); ``entropy_grad=False`` detaches it.  ``cls`` is
:math:`\mathrm{CE}(z^s, y)`.  The authors' total loss is
:math:`t L_{align} + L_{cls} + \lambda L_{bg} + \mu L_{bd}` (``gvbg_weight`` :math:`\lambda`,
``gvbd_weight`` :math:`\mu`, both 1).

**GH on both pairs (the authors' ``gvb/train_image.py``).**  They measure two Gramians over the
base network (backbone + bottleneck + classifier, the bridge included): pair 1 =
(:math:`L_{align}`, :math:`L_{cls}`) and pair 2 = (:math:`L_{bg}`, :math:`L_{bd}`), the first of
each pair leading in GH++, and do one backward of
:math:`t w_1 L_{align} + w_2 L_{cls} + \lambda w_3 L_{bg} + \mu w_4 L_{bd}`.  :meth:`GVB.update`
does the same with one call of the engine's harmonizer over four named losses,
``losses = {align:`` :math:`L_{align}`, ``cls:`` :math:`L_{cls}`, ``bridge_g:`` :math:`L_{bg}`,
``bridge_d:`` :math:`\mu L_{bd}` ``}``, ``trade_offs = {align:`` :math:`t`, ``bridge_g:``
:math:`\lambda` ``}`` and ``pairs = [(align, cls), (bridge_g, bridge_d)]``: each pair is harmonized
with its own Gramian (:meth:`gradharmony.Harmonizer.backward`), :math:`L_{bg}` in the ``align``
slot (so it leads like the authors' first loss) and :math:`\mu L_{bd}` in the ``cls`` slot.  The
probes are taken before :math:`t` and :math:`\lambda` (as the authors do); :math:`\mu` is inside
the fourth probe, which matches them exactly for their :math:`\mu = 1` and for GH++ (angle-only) at
any :math:`\mu`.  One optimizer step follows.  The step's statistics are pair 1's; pair 2's are
logged as ``bridge_angle``, ``bridge_w_align``, ``bridge_w_cls``, ``bridge_conflict``.  Plain
training (no harmonizer in the step's context): one backward of the authors' total loss
:math:`t L_{align} + L_{cls} + \lambda L_{bg} + \mu L_{bd}`.

:meth:`GVB.compute_losses` gives the single-pair form for a plain loop:
``cls`` = :math:`L_{cls} + \lambda L_{bg}`, ``align`` = :math:`L_{align} + \mu L_{bd}`.

Defaults follow the authors' release: :math:`\lambda = \mu = 1`; reversal ramp
:math:`\alpha = 10`, to 1 over a fixed 10,000 steps (their ``calc_coeff``, which equals their
default run length); discriminator ``Linear-ReLU-Dropout(0.5)`` twice, width 1024, no batch norm;
Kaiming-normal weights and zero biases for the classifier, the bridge and the discriminator.  A
weight of 0 switches that bridge off (the authors subtract a bridge only when its flag is exactly 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from gradharmony.uda.methods.base import Batch, Losses, StepContext, UpdateResult, entropy, scalars
from gradharmony.uda.methods.dann import AdversarialMethod, domain_adversarial_loss
from gradharmony.uda.methods.steps import pair_backward, step_if_finite, zero_grads
from gradharmony.uda.models.heads import hidden_layers

if TYPE_CHECKING:
    from gradharmony.stats import StepStats


def _kaiming(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight)
            nn.init.zeros_(layer.bias)


class BridgedClassifier(nn.Module):
    r"""Logits :math:`C(f) - b(f)` (or :math:`C(f)` with ``use_bridge=False``); :meth:`parts` gives both."""

    def __init__(self, in_features: int, num_classes: int, use_bridge: bool = True):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)
        self.bridge = nn.Linear(in_features, num_classes)
        self.use_bridge = use_bridge
        self.in_features, self.num_classes = in_features, num_classes
        _kaiming(self)

    def parts(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, bridge)``."""
        bridge = self.bridge(f)
        logits = self.fc(f)
        return (logits - bridge if self.use_bridge else logits), bridge

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.parts(f)[0]


class BridgedDiscriminator(nn.Module):
    r"""Two hidden ``Linear - [BatchNorm1d] - ReLU - [Dropout]`` layers, then heads :math:`a` and :math:`e`.

    :meth:`forward` returns ``(domain_logit, bridge)`` with ``domain_logit = a - e`` (``a`` alone
    with ``use_bridge=False``), each of shape ``(N,)``.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int = 1024,
        batch_norm: bool = False,
        dropout: float = 0.5,
        use_bridge: bool = True,
    ):
        super().__init__()
        self.hidden = hidden_layers(in_features, hidden, batch_norm, dropout)
        self.head = nn.Linear(hidden, 1)
        self.bridge = nn.Linear(hidden, 1)
        self.use_bridge = use_bridge
        self.in_features = in_features
        _kaiming(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden(x)
        a, e = self.head(h).squeeze(-1), self.bridge(h).squeeze(-1)
        return (a - e if self.use_bridge else a), e


class GVB(AdversarialMethod):
    r"""GVB-GD: generator and discriminator bridges; GH on (align, cls) and on (bridge_g, bridge_d).

    Roles, pair 1: ``align`` = the entropy-weighted domain BCE through :math:`R_\lambda`, ``cls`` =
    source CE of the bridged logits.  Pair 2: ``bridge_g`` = :math:`L_{bg}` (``align`` slot),
    ``bridge_d`` = :math:`\mu L_{bd}` (``cls`` slot).  GH++ lead: ``align`` (the authors').  Scope:
    backbone + bottleneck + classifier (the classifier holds the generator bridge).  ``multi_step``:
    :meth:`update` does one harmonized backward of the four losses, pair by pair, and one step of
    every optimizer (a single ``all`` optimizer by default).

    Gradients: ``align`` reaches the discriminator plainly and, reversed, the classifier (``fc`` and
    ``bridge``), bottleneck and backbone; ``cls`` reaches backbone, bottleneck and classifier, not
    the discriminator; :math:`L_{bg}` reaches backbone, bottleneck and the bridge only;
    :math:`L_{bd}` reaches the discriminator's hidden layers and bridge plainly and the base network
    reversed.

    Hyper-parameters: ``gvbg_weight=1.0, gvbd_weight=1.0, entropy_grad=True``, reversal
    ``grl_alpha=10, grl_low=0, grl_high=1, grl_max_steps=10000``, discriminator ``disc_hidden=1024,
    disc_batch_norm=False, disc_dropout=0.5``.

    Example:
        >>> import torch
        >>> from gradharmony import Harmonizer
        >>> from gradharmony.uda.models import build_backbone
        >>> _ = torch.manual_seed(0)
        >>> method = GVB(build_backbone("lenet", 1, 28), num_classes=10, max_steps=100, bottleneck_dim=32,
        ...              disc_hidden=16)
        >>> x_s, x_t, y_s = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
        >>> optimizers = {name: torch.optim.SGD(groups, lr=0.01, momentum=0.9)
        ...               for name, groups in method.optimizer_groups(0.01).items()}
        >>> harmonizer = Harmonizer(mode="gh++", scope=method.scope_modules(), lead=method.default_lead)
        >>> context = StepContext(step=5, optimizers=optimizers, harmonizer=harmonizer, trade_off=1.0)
        >>> result = method.update(Batch(x_s, y_s, x_t), context)
        >>> method.grl.step, harmonizer.calls
        (5, 1)
        >>> sorted(k for k in result.logs if k.startswith("bridge_"))
        ['bridge_angle', 'bridge_conflict', 'bridge_w_align', 'bridge_w_cls']
    """

    name = "gvb"
    default_lead = "align"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        max_steps: int,
        bottleneck_dim: int = 256,
        *,
        gvbg_weight: float = 1.0,
        gvbd_weight: float = 1.0,
        entropy_grad: bool = True,
        grl_max_steps: int | None = 10000,
        disc_hidden: int = 1024,
        disc_batch_norm: bool = False,
        disc_dropout: float = 0.5,
        **hparams,
    ):
        super().__init__(
            backbone,
            num_classes,
            max_steps,
            bottleneck_dim,
            grl_max_steps=grl_max_steps,
            disc_hidden=disc_hidden,
            disc_batch_norm=disc_batch_norm,
            disc_dropout=disc_dropout,
            **hparams,
        )
        if gvbg_weight < 0 or gvbd_weight < 0:
            raise ValueError(f"bridge weights must be non-negative, got {gvbg_weight}, {gvbd_weight}")
        self.gvbg_weight, self.gvbd_weight, self.entropy_grad = gvbg_weight, gvbd_weight, entropy_grad
        self.classifier = BridgedClassifier(bottleneck_dim, num_classes, use_bridge=gvbg_weight != 0)
        self.discriminator = BridgedDiscriminator(
            num_classes, disc_hidden, disc_batch_norm, disc_dropout, use_bridge=gvbd_weight != 0
        )

    # ------------------------------------------------------------------ losses
    def _terms(self, x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor, step: int) -> Losses:
        """One forward of ``cat(x_s, x_t)``: ``cls``, ``align`` (pair 1), ``extra`` = ``bridge_g``,
        ``bridge_d`` (pair 2), the features, and log scalars (tensors, not yet fetched)."""
        self.set_step(step)
        n = x_s.shape[0]
        features, cut = self.encode(torch.cat((x_s, x_t)))
        logits, bridge = self.classifier.parts(features)
        cls = F.cross_entropy(logits[:n], y_s)
        p = F.softmax(logits, dim=1)
        domain_logits, disc_bridge = self.discriminator(self.grl(p))
        ent = entropy(logits)
        ent = self.grl(ent) if self.entropy_grad else ent.detach()
        w = torch.exp(-ent)
        w = torch.cat((w[:n] / w[:n].detach().mean(), w[n:] / w[n:].detach().mean()))
        transfer, domain_acc = domain_adversarial_loss(domain_logits, n, w)
        bridge_g, bridge_d = bridge.abs().mean(), disc_bridge.abs().mean()
        source_acc = (logits[:n].argmax(dim=1) == y_s).float().mean()
        logs = dict(
            cls_loss=cls,
            transfer_loss=transfer,
            gvbg=bridge_g,
            gvbd=bridge_d,
            mean_entropy=torch.exp(-entropy(logits.detach())).mean(),
            source_acc=source_acc,
            domain_acc=domain_acc,
        )
        return Losses(
            cls=cls,
            align=transfer,
            features=features,
            cut=cut,
            logs=logs,
            extra={"bridge_g": bridge_g, "bridge_d": bridge_d},
        )

    def compute_losses(self, x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor, step: int) -> Losses:
        r"""Single-pair form: ``cls`` = :math:`L_{cls} + \lambda L_{bg}`, ``align`` = :math:`L_{align} + \mu L_{bd}`."""
        t = self._terms(x_s, y_s, x_t, step)
        logs = scalars(**t.logs, grl_coeff=self.grl.coefficient)
        return Losses(
            cls=t.cls + self.gvbg_weight * t.extra["bridge_g"],
            align=t.align + self.gvbd_weight * t.extra["bridge_d"],
            features=t.features,
            cut=t.cut,
            logs=logs,
            extra=t.extra,
        )

    # ------------------------------------------------------------------ checkpoints
    def get_extra_state(self) -> dict[str, Any]:
        """Nothing of its own: both pairs' cached weights live in the engine's harmonizer."""
        return {}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Accepts checkpoints written when a second harmonizer, saved here, handled pair 2.

        Its state (cached weights, statistics) is not carried over: it mattered only for
        ``refresh_every > 1``, where the first reusing step after such a resume measures afresh.
        """

    # ------------------------------------------------------------------ training step
    def update(self, batch: Batch, context: StepContext) -> UpdateResult:
        """One forward; one harmonized backward of both pairs (each with its own Gramian); one step.

        Without a harmonizer: one plain backward of the total loss, then the step.
        """
        every = list(context.optimizers.values())
        harmonizer, trade_off = context.harmonizer, context.trade_off
        zero_grads(every)
        t = self._terms(batch.source, batch.source_labels, batch.target, context.step)
        bridge_g, bridge_d = t.extra["bridge_g"], t.extra["bridge_d"]
        bridges = self.gvbg_weight != 0 or self.gvbd_weight != 0
        stats: StepStats | None = None
        bridge_stats: StepStats | None = None
        if harmonizer is None:  # plain training: the authors' total loss, one backward
            cls = t.cls + self.gvbd_weight * bridge_d + self.gvbg_weight * bridge_g if bridges else t.cls
            pair_backward(None, cls=cls, align=t.align, trade_off=trade_off)
        else:
            losses = {"align": t.align, "cls": t.cls}
            trade_offs = {"align": trade_off}
            pairs = [("align", "cls")]
            if bridges:
                losses.update(bridge_g=bridge_g, bridge_d=self.gvbd_weight * bridge_d)
                trade_offs["bridge_g"] = self.gvbg_weight
                pairs.append(("bridge_g", "bridge_d"))
            harmonized = harmonizer.backward(losses=losses, trade_offs=trade_offs, pairs=pairs, features=t.features)
            stats, *others = harmonized.pairs
            bridge_stats = others[0] if others else None
        finite = step_if_finite(every, harmonizer, context.world)
        logs = scalars(**t.logs, grl_coeff=self.grl.coefficient)
        if bridge_stats is not None:
            logs.update(
                bridge_angle=bridge_stats.angle,
                bridge_w_align=bridge_stats.w_align,
                bridge_w_cls=bridge_stats.w_cls,
                bridge_conflict=float(bridge_stats.conflict),
            )
        return UpdateResult.of_phases(stats, logs, finite, harmonizer)
