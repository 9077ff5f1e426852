r"""MCD: Maximum Classifier Discrepancy (Saito et al., CVPR 2018), with GH in step B.

A generator :math:`G` (``bottleneck`` of ``backbone``) and two classifiers :math:`F_1, F_2`.
With :math:`p_j = \mathrm{softmax}(F_j(G(x)))` on a batch of :math:`n` rows and :math:`K` classes,

.. math::
    d(p_1, p_2) = \frac{1}{nK}\sum_{i,k} |p_{1,ik} - p_{2,ik}|, \qquad
    E(p) = -\frac{1}{K}\sum_k \log\Big(\frac{1}{n}\sum_i p_{ik} + 10^{-6}\Big),

the discrepancy and TLlib's MCD "entropy" (a class-balance term on the *mean* target prediction,
not the per-sample entropy).  One training step, on ``x = cat(x_s, x_t)`` (one forward per phase,
so batch norm sees both domains, as in TLlib and the GH authors' ``mcd/mcd.py``):

* **step A** (``generator`` and ``classifiers`` step):
  :math:`\min_{G,F_1,F_2} L_A = \mathrm{CE}(F_1(G x_s), y) + \mathrm{CE}(F_2(G x_s), y)
  + \lambda_e\,(E(p^t_1) + E(p^t_2))`;
* **step B** (only ``classifiers`` step; :math:`G` fixed):
  :math:`\min_{F_1,F_2} L_A - t\,d(p^t_1, p^t_2)`: the classifiers stay accurate on the source and
  disagree on the target;
* **step C** (only ``generator`` steps; :math:`F_1, F_2` fixed), ``num_k`` times:
  :math:`\min_G t\,d(p^t_1, p^t_2)`: the generator moves the target features where the
  classifiers agree.

:math:`t` is the engine's ``trade_off`` and :math:`\lambda_e` = ``entropy_weight``.

**GH placement (as the GH authors do, ``mcd/mcd.py``).**  GH acts in step B only: ``cls`` =
:math:`L_A` (source cross-entropy of both heads + the entropy term) and ``align`` = :math:`-d`
(the classifiers' adversarial term); the Gramian is measured over the **generator** (the authors
take ``getgrad(G)`` of both losses) and the weights rescale the classifiers' update, the only
parameters that step in B.  GH++ lead: ``cls`` (the authors probe ``loss_c`` first).  The authors
probe :math:`-t\,d` (after the trade-off); the harmonizer probes before it by default, which is the
same for :math:`t = 1` (their default) and for the angle-only GH++; pass
``Harmonizer(probe_trade_off=True)`` for the authors' probe at any :math:`t`.

Defaults follow TLlib's / the authors' ``mcd.py``: ``num_k=4`` (their argparse default, used for
every benchmark; Saito's release also uses 4), ``entropy_weight=0.01``, ``bottleneck_dim=1024``,
head dropout 0.5, and an SGD generator *without* momentum (``generator_momentum=0``; the
classifiers use the optimizer's momentum).  TLlib keeps the learning rate fixed ("according to the
original paper"): use a recipe with ``lr_gamma: 0`` to match.

Architecture.  TLlib's heads are ``Dropout-Linear-BN-ReLU-Dropout-Linear-BN-ReLU-Linear`` on the
backbone features.  By default here the first ``Linear-BN-ReLU`` is the shared bottleneck (inside
:math:`G`, so GH's scope "the generator" includes it) and each head is ``Dropout-Linear-BN-ReLU-Linear``
of width ``head_hidden`` (``None``: ``bottleneck_dim``; ``0``: a single ``Linear``).  With
``shared_bottleneck=False`` the layout is TLlib's: no bottleneck (:math:`G` is the backbone alone)
and each head is ``Dropout-Linear(in, bottleneck_dim)-BN-ReLU-Dropout-Linear(bottleneck_dim,
head_hidden)-BN-ReLU-Linear``, its own first layer and dropout masks included.

Evaluation: :meth:`MCD.forward` returns :math:`F_1 + F_2` (Saito's "ensemble" output;
``eval_head="f1"`` or ``"f2"`` for one head).  TLlib and the authors report both heads and keep the
better one on the target test set, which selects on target labels; we do not.

Plain training (``context.harmonizer`` is ``None``): step B back-propagates
:math:`L_A - t\,d(p^t_1, p^t_2)` plainly; steps A and C never involve the harmonizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from gradharmony.uda.methods.base import Batch, Losses, Method, StepContext, UpdateResult, scalars
from gradharmony.uda.methods.steps import optimizer_params, pair_backward, step_if_finite, zero_grads

EVAL_HEADS = ("ensemble", "f1", "f2")


# ----------------------------------------------------------------------------- losses and heads
def classifier_discrepancy(p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    r""":math:`\frac{1}{nK}\sum_{i,k}|p_{1,ik} - p_{2,ik}|` of two probability matrices."""
    return (p1 - p2).abs().mean()


def mean_prediction_entropy(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    r"""TLlib's MCD entropy :math:`-\frac{1}{K}\sum_k \log(\bar p_k + \epsilon)`, :math:`\bar p` the batch mean."""
    return -torch.log(p.mean(dim=0) + eps).mean()


class DiscrepancyHead(nn.Sequential):
    """A block ``[Dropout] - Linear - BatchNorm1d - ReLU`` per width in ``hidden``, then ``Linear``.

    ``hidden`` is one width (``0``: no block, a single ``Linear``) or a sequence of widths (TLlib's
    MCD heads: ``(1024, 1024)``).
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int | Sequence[int] = 0, dropout: float = 0.0):
        widths = [hidden] if isinstance(hidden, int) else list(hidden)
        layers: list[nn.Module] = []
        width = in_features
        for block in (w for w in widths if w > 0):
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            layers += [nn.Linear(width, block), nn.BatchNorm1d(block), nn.ReLU()]
            width = block
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
        self.in_features, self.num_classes = in_features, num_classes


class MCD(Method):
    r"""MCD: two classifiers, steps A/B/C; GH in step B with the generator as scope.

    Roles: in step B, ``cls`` = :math:`L_A` (source CE of :math:`F_1, F_2` + entropy term) and
    ``align`` = :math:`-d(p^t_1, p^t_2)`.  GH++ lead: ``cls`` (the authors').  Default scope:
    backbone + bottleneck (the generator; :meth:`scope_modules`).  Optimizers: ``generator``
    (backbone, bottleneck) and ``classifiers`` (:math:`F_1, F_2`).

    :meth:`compute_losses` is a single-forward diagnostic (nothing steps): ``cls`` = :math:`L_A`,
    ``align`` = :math:`d(p^t_1, p^t_2)` as the generator minimises it in step C.

    Hyper-parameters: ``num_k=4, entropy_weight=0.01, head_hidden=None`` (= ``bottleneck_dim``),
    ``head_dropout=0.5, generator_momentum=0.0`` (``None``: the optimizer's), ``eval_head="ensemble"``,
    ``bottleneck_dim=1024``, ``shared_bottleneck=True`` (``False``: TLlib's heads, see the module).

    Example:
        >>> import torch
        >>> from gradharmony import Harmonizer
        >>> from gradharmony.uda.models import build_backbone
        >>> _ = torch.manual_seed(0)
        >>> method = MCD(build_backbone("lenet", 1, 28), num_classes=10, max_steps=100,
        ...              bottleneck_dim=32, num_k=2)
        >>> optimizers = {name: torch.optim.SGD(groups, lr=0.01, momentum=0.9)
        ...               for name, groups in method.optimizer_groups(0.01).items()}
        >>> sorted(optimizers), method.multi_step, method.default_lead
        (['classifiers', 'generator'], True, 'cls')
        >>> harmonizer = Harmonizer(mode="gh", scope=method.scope_modules(), lead=method.default_lead)
        >>> x_s, x_t, y_s = torch.rand(4, 1, 28, 28), torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
        >>> context = StepContext(step=0, optimizers=optimizers, harmonizer=harmonizer, trade_off=1.0)
        >>> result = method.update(Batch(x_s, y_s, x_t), context)
        >>> result.stats.step, result.logs["generator_updates"], method(x_t).shape
        (0, 2.0, torch.Size([4, 10]))
    """

    name = "mcd"
    default_lead = "cls"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        max_steps: int,
        bottleneck_dim: int = 1024,
        *,
        num_k: int = 4,
        entropy_weight: float = 0.01,
        head_hidden: int | None = None,
        head_dropout: float = 0.5,
        generator_momentum: float | None = 0.0,
        eval_head: str = "ensemble",
        shared_bottleneck: bool = True,
        **base_hparams,
    ):
        super().__init__(backbone, num_classes, max_steps, bottleneck_dim, **base_hparams)
        if num_k < 1:
            raise ValueError(f"num_k must be at least 1, got {num_k}")
        if eval_head not in EVAL_HEADS:
            raise ValueError(f"eval_head must be one of {', '.join(EVAL_HEADS)}, got {eval_head!r}")
        if head_hidden is not None and head_hidden < 0:
            raise ValueError(f"head_hidden must be >= 0 or None, got {head_hidden}")
        self.num_k, self.entropy_weight = num_k, entropy_weight
        self.head_hidden, self.head_dropout = head_hidden, head_dropout
        self.generator_momentum, self.eval_head = generator_momentum, eval_head
        self.shared_bottleneck = shared_bottleneck
        hidden = bottleneck_dim if head_hidden is None else head_hidden
        in_features, widths = bottleneck_dim, (hidden,)
        if not shared_bottleneck:  # TLlib's layout: each head owns the first layer
            self.bottleneck = nn.Identity()
            in_features, widths = backbone.out_features, (bottleneck_dim, hidden)
        self.classifier = DiscrepancyHead(in_features, num_classes, widths, head_dropout)
        self.classifier2 = DiscrepancyHead(in_features, num_classes, widths, head_dropout)

    # ------------------------------------------------------------------ model
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits: :math:`F_1 + F_2` (``eval_head="ensemble"``), or one head."""
        f = self.features(x)
        if self.eval_head == "f1":
            return self.classifier(f)
        if self.eval_head == "f2":
            return self.classifier2(f)
        return self.classifier(f) + self.classifier2(f)

    def generator_modules(self) -> list[nn.Module]:
        return [self.backbone, self.bottleneck]

    def scope_modules(self) -> list[nn.Module]:
        """GH scope: the generator (backbone + bottleneck), as the authors' ``getgrad(G)``."""
        return self.generator_modules()

    def parameter_groups(self, lr: float) -> list[dict]:
        """Groups ``backbone``, ``bottleneck``, ``classifiers`` (see :meth:`optimizer_groups`)."""
        groups = self.optimizer_groups(lr)
        return groups["generator"] + groups["classifiers"]

    def optimizer_groups(self, lr: float) -> dict[str, list[dict]]:
        """``generator``: backbone (``backbone_lr_mult``) and bottleneck; ``classifiers``: :math:`F_1, F_2`.

        With ``generator_momentum`` set, the generator's groups carry their own ``momentum`` (and
        ``nesterov=False`` when it is 0), as TLlib's MCD generator optimizer has none.
        """

        def group(name: str, modules: list[nn.Module], mult: float) -> dict:
            params = [p for m in modules for p in m.parameters() if p.requires_grad]
            return {"params": params, "lr": lr * mult, "lr_mult": mult, "name": name}

        generator = [
            group("backbone", [self.backbone], self.backbone_lr_mult),
            group("bottleneck", [self.bottleneck], 1.0),
        ]
        if self.generator_momentum is not None:
            for g in generator:
                g["momentum"] = self.generator_momentum
                if self.generator_momentum == 0:
                    g["nesterov"] = False
        classifiers = [group("classifiers", [self.classifier, self.classifier2], 1.0)]
        return {
            "generator": [g for g in generator if g["params"]],
            "classifiers": [g for g in classifiers if g["params"]],
        }

    # ------------------------------------------------------------------ losses
    def _forward_heads(self, x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor) -> Losses:
        """One forward of ``cat(x_s, x_t)``: ``cls`` = :math:`L_A`, ``align`` = the target discrepancy.

        ``logs`` holds tensors (source CE, entropy term, source accuracy), not yet fetched.
        """
        n = x_s.shape[0]
        features, cut = self.encode(torch.cat((x_s, x_t)))
        y1, y2 = self.classifier(features), self.classifier2(features)
        p1_t, p2_t = F.softmax(y1[n:], dim=1), F.softmax(y2[n:], dim=1)
        ce = F.cross_entropy(y1[:n], y_s) + F.cross_entropy(y2[:n], y_s)
        ent = mean_prediction_entropy(p1_t) + mean_prediction_entropy(p2_t)
        loss_a = ce + self.entropy_weight * ent
        disc = classifier_discrepancy(p1_t, p2_t)
        acc = (y1[:n].argmax(dim=1) == y_s).float().mean()
        return Losses(
            cls=loss_a,
            align=disc,
            features=features,
            cut=cut,
            logs={"source_ce": ce, "entropy": ent, "source_acc": acc},
        )

    def compute_losses(self, x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor, step: int) -> Losses:
        """Diagnostic: ``cls`` = :math:`L_A`, ``align`` = :math:`d(p^t_1, p^t_2)`; one forward."""
        self.set_step(step)
        losses = self._forward_heads(x_s, y_s, x_t)
        losses.logs = scalars(cls_loss=losses.cls, transfer_loss=losses.align, **losses.logs)
        return losses

    # ------------------------------------------------------------------ training step
    def update(self, batch: Batch, context: StepContext) -> UpdateResult:
        """Steps A, B (harmonized, measured on the generator; plain without a harmonizer) and C
        (``num_k`` times)."""
        self.set_step(context.step)
        x_s, y_s, x_t = batch.source, batch.source_labels, batch.target
        optimizers, harmonizer, trade_off = context.optimizers, context.harmonizer, context.trade_off
        generator, classifiers = optimizers["generator"], optimizers["classifiers"]
        every = list(optimizers.values())
        world = context.world
        skipped = 0

        # Step A: everything on the source (+ the entropy term).
        zero_grads(every)
        a = self._forward_heads(x_s, y_s, x_t)
        a.cls.backward()
        skipped += not step_if_finite([generator, classifiers], world=world)

        # Step B: the classifiers only; GH measured on the generator, as the authors do.  Plain
        # training back-propagates into the classifiers alone (the generator's gradient would be
        # discarded): the same update, without the backward pass through the generator.
        zero_grads(every)
        b = self._forward_heads(x_s, y_s, x_t)
        stats = pair_backward(
            harmonizer,
            cls=b.cls,
            align=-b.align,
            trade_off=trade_off,
            features=b.features,
            inputs=optimizer_params([classifiers]),
        )
        skipped += not step_if_finite([classifiers], harmonizer, world)
        zero_grads(every)  # the generator's gradients of step B are discarded

        # Step C: the generator only, num_k times (no gradient is computed for the classifiers).
        n = x_s.shape[0]
        x = torch.cat((x_s, x_t))
        generator_params = optimizer_params([generator])
        disc_c = torch.zeros(())
        for _ in range(self.num_k):
            zero_grads(every)
            f = self.features(x)
            p1_t = F.softmax(self.classifier(f)[n:], dim=1)
            p2_t = F.softmax(self.classifier2(f)[n:], dim=1)
            disc_c = classifier_discrepancy(p1_t, p2_t)
            (trade_off * disc_c).backward(inputs=generator_params)
            skipped += not step_if_finite([generator], world=world)
        zero_grads(every)

        logs = scalars(cls_loss=a.cls, transfer_loss=disc_c, cls_loss_b=b.cls, discrepancy_b=b.align, **a.logs)
        logs.update(generator_updates=float(self.num_k), skipped_phases=float(skipped))
        return UpdateResult.of_phases(stats, logs, not skipped, harmonizer)
