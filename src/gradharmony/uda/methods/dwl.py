r"""DWL: Dynamic Weighted Learning (Xiao & Zhang, CVPR 2021), with GH on the generator's update.

As released with the GH authors' code (``dwl/solver.py``, built on MCD): a generator :math:`G`
(``bottleneck`` of ``backbone``), a classifier :math:`C`, two auxiliary classifiers
:math:`C_1, C_2` and a discriminator :math:`D` (sigmoid output :math:`\sigma(D(\cdot))`).  Source
and target go through :math:`G` *separately* (per-domain batch norm), as there.  With
:math:`d(\cdot,\cdot)` the mean absolute difference of softmax outputs (MCD's discrepancy), one
training step is:

1. ``num_k1`` times (8): :math:`\min_{G,C} \mathrm{CE}(C(G x_s), y)`.
2. ``num_k2`` times (1):
   (a) :math:`\min_D\ \beta_D L_D` with :math:`\beta_D` = ``disc_weight`` (0.1);
   (b) :math:`\min_{C,C_1,C_2} \sum_{c\in\{C,C_1,C_2\}} \mathrm{CE}(c(G x_s), y) - d(C_1, C_2)^t`
   (:math:`G` fixed).
3. ``num_k3`` times (8), the generator only:
   :math:`\min_G\ T\,L_{adv} + (1 - T)\,L_{dis}` with
   :math:`L_{adv} = -\beta_G L_D` (:math:`\beta_G` = ``adv_weight``, 0.2) and
   :math:`L_{dis} = d(C_1, C_2)^t + d(C, C_1)^t + d(C, C_2)^t`.
4. ``num_k4`` times (1), target pseudo-labels :math:`\hat y = \arg\max C(G x_t)`:
   :math:`\min_{G,C}\ 2\,(\mu\,\mathrm{CE}(C(G x_t), \hat y) + (1-\mu) H)` with
   :math:`H = -\frac{1}{nK}\sum_{i,k} p_{ik}\log p_{ik}` and
   :math:`\mu = (e^{-H} - 1/K) / (1 - 1/K)`; :math:`H` and :math:`\mu` are constants (the release
   wraps :math:`H` in a new leaf ``Variable``), so only :math:`2\mu\,\mathrm{CE}` has a gradient.

Domain loss :math:`L_D`.  ``domain_loss="authors"`` (default, the release):
:math:`L_D = \mathrm{BCE}(\sigma(D(f_s)), \sigma(D(f_t)))` with the target outputs detached as the
soft labels (so it needs equal source and target batch sizes).  ``"standard"``: the usual domain
BCE, source 1 and target 0 (the paper's adversarial loss).

**The dynamic weight** :math:`T`.  Over a window of ``stats_window`` steps (the release's epoch,
100 iterations) the generator features of every step's batches are accumulated (after the step,
without gradient), with source labels and target pseudo-labels.  At the end of a window:

* alignment :math:`A = \|\bar f_s - \bar f_t\|^2` (the release's linear MMD of the window's paired
  features); :math:`A_{max} = \max(A_{max}, A)`, :math:`A_{min} = \min(A_{min}, A)`,
  :math:`\hat A = |A - A_{min}| / (A_{max} - A_{min} + 10^{-6})`;
* discriminability (LDA) per domain :math:`J = \frac{1}{K}\sum_{top\ K-1}\mathrm{eig}((S_w +
  10^{-6} I)^{-1} S_b)`, computed exactly as :math:`\frac{1}{K}\mathrm{tr}((S_w + 10^{-6}I)^{-1} S_b)`
  (:math:`S_b` has rank at most :math:`K-1`, so both are the same sum); running
  :math:`J_{max}, J_{min}` over both domains; :math:`J = \min(J_s, J_t)`,
  :math:`\hat J = (J - J_{min}) / (J_{max} - J_{min} + 10^{-6})`;

.. math:: T = \frac{\hat A}{\hat A + 1 - \hat J},

used for the next window.  Start values as in the release: :math:`\hat A = \hat J = 0.5` (so
:math:`T = 0.5` in the first window), :math:`A_{min} = A_{max} = 0`, :math:`J_{min} = J_{max} = 1`,
and :math:`J_{min} \leftarrow J_{max}` after the first window.  ``mmd_per_step=True`` updates
:math:`\hat A` after every step from that step's batch (the release does so for SVHN sources).
Strong misalignment (large :math:`\hat A`) or already discriminative features (large
:math:`\hat J`) shift the generator's effort to alignment.  Classes absent from a window are left
out of the LDA (the release stops instead).  The statistics are buffers: saved and resumed with the
model.

**GH placement (the authors').**  GH acts in phase 3 on every generator update: ``align`` =
:math:`L_{adv}`, ``cls`` = :math:`L_{dis}`, Gramian measured over the generator, probes taken
before :math:`T` and :math:`1 - T`, i.e. the generator's gradient is exactly
:math:`t\,T\,w_a \nabla L_{adv} + (1 - T)\,w_c \nabla L_{dis}` (:math:`t` = ``trade_off``, 1 in
the release).  It is obtained with the harmonizer's ``trade_off`` set to :math:`tT/(1-T)` and the
generator's gradient then multiplied by :math:`1 - T` (:math:`T < 1` always).  GH++ lead:
``align`` (the authors probe the adversarial loss first).  Plain training (no harmonizer in the
step's context): phase 3 back-propagates :math:`t\,T L_{adv} + (1 - T) L_{dis}` plainly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from gradharmony.distributed import World, average_, sum_
from gradharmony.uda.methods.base import Batch, Losses, Method, StepContext, UpdateResult, scalars
from gradharmony.uda.methods.mcd import DiscrepancyHead, classifier_discrepancy
from gradharmony.uda.methods.steps import step_if_finite, zero_grads

if TYPE_CHECKING:
    from gradharmony.harmonizer import Harmonizer
    from gradharmony.stats import StepStats

DOMAIN_LOSSES = ("authors", "standard")
_EPS = 1e-6
# Indices into the `dwl_state` buffer.
A_MIN, A_MAX, J_MIN, J_MAX, A_NORM, J_NORM, WINDOWS, STEPS = range(8)
_INITIAL_STATE = (0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0)


def dynamic_weight(a_norm: float, j_norm: float) -> float:
    r""":math:`T = \hat A / (\hat A + 1 - \hat J)` (0 when both terms vanish)."""
    denominator = a_norm + 1.0 - j_norm
    return a_norm / denominator if denominator > 0 else 0.0


def lda_criterion(
    scatter: torch.Tensor, class_sums: torch.Tensor, class_counts: torch.Tensor, num_classes: int, eps: float = _EPS
) -> float:
    r""":math:`\frac{1}{K}\mathrm{tr}((S_w + \epsilon I)^{-1} S_b)` from accumulated statistics.

    ``scatter`` = :math:`\sum_i f_i f_i^\top`, ``class_sums[c]`` = :math:`\sum_{y_i = c} f_i`,
    ``class_counts[c]``; classes with no sample are left out; 0 with fewer than two classes.
    """
    present = class_counts > 0
    if int(present.sum()) < 2:
        return 0.0
    counts = class_counts[present].double()
    sums = class_sums[present].double()
    means = sums / counts.unsqueeze(1)
    between_raw = sums.T @ means  # sum_c n_c mu_c mu_c^T
    within = scatter.double() - between_raw
    total = counts.sum()
    mean = sums.sum(dim=0) / total
    between = between_raw - total * torch.outer(mean, mean)
    eye = torch.eye(within.shape[0], dtype=within.dtype, device=within.device)
    return float(torch.linalg.solve(within + eps * eye, between).diagonal().sum()) / num_classes


def authors_domain_loss(d_source: torch.Tensor, d_target: torch.Tensor) -> torch.Tensor:
    r"""The release's :math:`\mathrm{BCE}(\sigma(D_s), \sigma(D_t))`, target detached (logits in)."""
    if d_source.shape != d_target.shape:
        raise ValueError(
            "domain_loss='authors' pairs source and target rows: the batch sizes must be "
            f"equal, got {d_source.shape[0]} and {d_target.shape[0]}; use 'standard'"
        )
    return F.binary_cross_entropy_with_logits(d_source, torch.sigmoid(d_target).detach())


def standard_domain_loss(d_source: torch.Tensor, d_target: torch.Tensor) -> torch.Tensor:
    """Domain BCE, source 1 and target 0, mean of the two domain means."""
    return 0.5 * (
        F.binary_cross_entropy_with_logits(d_source, torch.ones_like(d_source))
        + F.binary_cross_entropy_with_logits(d_target, torch.zeros_like(d_target))
    )


class DWL(Method):
    r"""DWL: MCD-style phases with a dynamic weight :math:`T` between alignment and discriminability.

    Roles (phase 3, where GH acts): ``align`` = :math:`L_{adv} = -\beta_G L_D`, ``cls`` =
    :math:`L_{dis}` (the three target discrepancies).  GH++ lead: ``align``.  Default scope: the
    generator (backbone + bottleneck).  Optimizers: ``generator`` (backbone, bottleneck),
    ``classifier`` (:math:`C`), ``aux_classifiers`` (:math:`C_1, C_2`), ``discriminator``
    (:math:`D`).  :meth:`forward` returns :math:`C`'s logits (the release reports C, C1, C2 and two
    ensembles and keeps the best on the target test set; we do not select on target labels).

    :meth:`compute_losses` is a single-forward diagnostic (nothing steps, :math:`T` unchanged):
    ``cls`` = source CE of :math:`C, C_1, C_2`, ``align`` = :math:`T L_{adv} + (1-T) L_{dis}`.

    Architecture: the release's predictors are ``Linear(1024)-BN-ReLU-Linear`` on the backbone
    features; here the first layer is the shared bottleneck (``bottleneck_dim=1024``) and each
    classifier is a ``Linear`` (``head_hidden=0``).  :math:`D` is ``Linear(disc_hidden) - ReLU -
    Dropout(0.5) - Linear(1)``, weights :math:`\mathcal N(0, 0.01^2)` and :math:`\mathcal N(0, 0.3^2)`,
    biases 0 (the release).

    Hyper-parameters: ``num_k1=8, num_k2=1, num_k3=8, num_k4=1, disc_weight=0.1, adv_weight=0.2,
    pseudo_weight=2.0, domain_loss="authors", stats_window=100, mmd_per_step=False, head_hidden=0,
    disc_hidden=1024, disc_dropout=0.5``.

    Example:
        >>> import torch
        >>> from gradharmony import Harmonizer
        >>> from gradharmony.uda.models import build_backbone
        >>> _ = torch.manual_seed(0)
        >>> method = DWL(build_backbone("lenet", 1, 28), num_classes=3, max_steps=100, bottleneck_dim=16,
        ...              num_k1=1, num_k3=2, stats_window=2, disc_hidden=16)
        >>> optimizers = {name: torch.optim.SGD(groups, lr=0.01, momentum=0.9)
        ...               for name, groups in method.optimizer_groups(0.01).items()}
        >>> sorted(optimizers)
        ['aux_classifiers', 'classifier', 'discriminator', 'generator']
        >>> harmonizer = Harmonizer(mode="gh", scope=method.scope_modules(), lead=method.default_lead)
        >>> x_s, x_t, y_s = torch.rand(6, 1, 28, 28), torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2] * 2)
        >>> method.dynamic_weight
        0.5
        >>> for step in range(2):
        ...     context = StepContext(step=step, optimizers=optimizers, harmonizer=harmonizer, trade_off=1.0)
        ...     result = method.update(Batch(x_s, y_s, x_t), context)
        >>> harmonizer.calls, int(method.dwl_state[WINDOWS])  # 2 GH calls per step; one window closed
        (4, 1)
        >>> 0.0 <= method.dynamic_weight < 1.0
        True
    """

    name = "dwl"
    default_lead = "align"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        max_steps: int,
        bottleneck_dim: int = 1024,
        *,
        num_k1: int = 8,
        num_k2: int = 1,
        num_k3: int = 8,
        num_k4: int = 1,
        disc_weight: float = 0.1,
        adv_weight: float = 0.2,
        pseudo_weight: float = 2.0,
        domain_loss: str = "authors",
        stats_window: int = 100,
        mmd_per_step: bool = False,
        head_hidden: int = 0,
        disc_hidden: int = 1024,
        disc_dropout: float = 0.5,
        **base_hparams,
    ):
        super().__init__(backbone, num_classes, max_steps, bottleneck_dim, **base_hparams)
        for key, value in (("num_k1", num_k1), ("num_k2", num_k2), ("num_k3", num_k3), ("num_k4", num_k4)):
            if value < 0:
                raise ValueError(f"{key} must be non-negative, got {value}")
        if domain_loss not in DOMAIN_LOSSES:
            raise ValueError(f"domain_loss must be one of {', '.join(DOMAIN_LOSSES)}, got {domain_loss!r}")
        if stats_window < 1:
            raise ValueError(f"stats_window must be positive, got {stats_window}")
        self.num_k1, self.num_k2, self.num_k3, self.num_k4 = num_k1, num_k2, num_k3, num_k4
        self.disc_weight, self.adv_weight, self.pseudo_weight = disc_weight, adv_weight, pseudo_weight
        self.domain_loss, self.stats_window, self.mmd_per_step = domain_loss, stats_window, mmd_per_step
        self.head_hidden, self.disc_hidden, self.disc_dropout = head_hidden, disc_hidden, disc_dropout
        self.classifier = DiscrepancyHead(bottleneck_dim, num_classes, head_hidden)
        self.classifier1 = DiscrepancyHead(bottleneck_dim, num_classes, head_hidden)
        self.classifier2 = DiscrepancyHead(bottleneck_dim, num_classes, head_hidden)
        layers: list[nn.Module] = [nn.Linear(bottleneck_dim, disc_hidden), nn.ReLU()]
        if disc_dropout > 0:
            layers.append(nn.Dropout(disc_dropout))
        layers.append(nn.Linear(disc_hidden, 1))
        self.discriminator = nn.Sequential(*layers)
        nn.init.normal_(layers[0].weight, 0.0, 0.01)
        nn.init.normal_(layers[-1].weight, 0.0, 0.3)
        nn.init.zeros_(layers[0].bias)
        nn.init.zeros_(layers[-1].bias)
        d, k = bottleneck_dim, num_classes
        self.register_buffer("dwl_scatter", torch.zeros(2, d, d, dtype=torch.float64))
        self.register_buffer("dwl_class_sums", torch.zeros(2, k, d, dtype=torch.float64))
        self.register_buffer("dwl_class_counts", torch.zeros(2, k, dtype=torch.float64))
        self.register_buffer("dwl_state", torch.tensor(_INITIAL_STATE, dtype=torch.float64))

    # ------------------------------------------------------------------ model
    def generator_modules(self) -> list[nn.Module]:
        return [self.backbone, self.bottleneck]

    def scope_modules(self) -> list[nn.Module]:
        """GH scope: the generator (backbone + bottleneck), as the authors' ``getgrad(self.G)``."""
        return self.generator_modules()

    def optimizer_groups(self, lr: float) -> dict[str, list[dict]]:
        """``generator`` (backbone with ``backbone_lr_mult``, bottleneck), ``classifier``,
        ``aux_classifiers``, ``discriminator``: one optimizer each, as the release's
        ``opt_g, opt_c, opt_c1 + opt_c2, opt_d``."""

        def group(name: str, modules: list[nn.Module], mult: float = 1.0) -> dict:
            params = [p for m in modules for p in m.parameters() if p.requires_grad]
            return {"params": params, "lr": lr * mult, "lr_mult": mult, "name": name}

        groups = {
            "generator": [
                group("backbone", [self.backbone], self.backbone_lr_mult),
                group("bottleneck", [self.bottleneck]),
            ],
            "classifier": [group("classifier", [self.classifier])],
            "aux_classifiers": [group("aux_classifiers", [self.classifier1, self.classifier2])],
            "discriminator": [group("discriminator", [self.discriminator])],
        }
        return {name: [g for g in gs if g["params"]] for name, gs in groups.items()}

    def parameter_groups(self, lr: float) -> list[dict]:
        """Every group of :meth:`optimizer_groups`, in one list."""
        return [g for groups in self.optimizer_groups(lr).values() for g in groups]

    @property
    def dynamic_weight(self) -> float:
        r"""The current :math:`T`."""
        state = self.dwl_state.tolist()
        return dynamic_weight(state[A_NORM], state[J_NORM])

    # ------------------------------------------------------------------ losses
    def _domain_loss(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        d_s, d_t = self.discriminator(f_s).squeeze(-1), self.discriminator(f_t).squeeze(-1)
        if self.domain_loss == "authors":
            return authors_domain_loss(d_s, d_t)
        return standard_domain_loss(d_s, d_t)

    def _discrepancies(self, f_t: torch.Tensor) -> torch.Tensor:
        p = F.softmax(self.classifier(f_t), dim=1)
        p1 = F.softmax(self.classifier1(f_t), dim=1)
        p2 = F.softmax(self.classifier2(f_t), dim=1)
        return classifier_discrepancy(p1, p2) + classifier_discrepancy(p, p1) + classifier_discrepancy(p, p2)

    def _source_ce3(self, f_s: torch.Tensor, y_s: torch.Tensor) -> torch.Tensor:
        return sum(F.cross_entropy(c(f_s), y_s) for c in (self.classifier, self.classifier1, self.classifier2))

    def compute_losses(self, x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor, step: int) -> Losses:
        r"""Diagnostic: ``cls`` = CE of :math:`C, C_1, C_2`; ``align`` = :math:`T L_{adv} + (1-T) L_{dis}`."""
        self.set_step(step)
        f_s, f_t = self.features(x_s), self.features(x_t)
        cls = self._source_ce3(f_s, y_s)
        adv = -self.adv_weight * self._domain_loss(f_s, f_t)
        dis = self._discrepancies(f_t)
        weight = self.dynamic_weight
        align = weight * adv + (1.0 - weight) * dis
        acc = (self.classifier(f_s).argmax(dim=1) == y_s).float().mean()
        logs = scalars(cls_loss=cls, transfer_loss=align, adversarial=adv, discrepancy=dis, source_acc=acc)
        logs["dwl_T"] = weight
        return Losses(cls=cls, align=align, features=torch.cat((f_s, f_t)), logs=logs)

    # ------------------------------------------------------------------ the dynamic weight
    def _accumulate(self, x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor, world: World | None) -> None:
        """After the step: the generator features of both batches (no gradient), then maybe close the window.

        ``world``: the step's process group (:attr:`StepContext.world`), whose batches make the global one.
        """
        with torch.no_grad():
            f_s, f_t = self.features(x_s), self.features(x_t)
            pseudo = self.classifier(f_t).argmax(dim=1)
            f_s, f_t = f_s.double(), f_t.double()
            k = self.num_classes
            for i, (f, y) in enumerate(((f_s, y_s), (f_t, pseudo))):
                self.dwl_scatter[i] += f.T @ f
                self.dwl_class_sums[i].index_add_(0, y, f)
                self.dwl_class_counts[i] += torch.bincount(y, minlength=k).double()
            state = self.dwl_state.tolist()
            if self.mmd_per_step:
                means = [f_s.mean(0), f_t.mean(0)]
                if world is not None:  # the global batch's means (equal batch sizes per process)
                    average_(means, world)
                self._update_alignment(state, float((means[0] - means[1]).pow(2).sum()))
            state[STEPS] += 1
            if state[STEPS] >= self.stats_window:
                self._close_window(state, world)
            self.dwl_state.copy_(torch.tensor(state, dtype=torch.float64))

    @staticmethod
    def _update_alignment(state: list[float], a: float) -> None:
        state[A_MAX] = max(abs(state[A_MAX]), abs(a))
        state[A_MIN] = min(abs(state[A_MIN]), abs(a))
        state[A_NORM] = abs(a - state[A_MIN]) / (state[A_MAX] - state[A_MIN] + _EPS)

    def _close_window(self, state: list[float], world: World | None = None) -> None:
        k = self.num_classes
        if world is not None:  # the window's statistics over every process's batches: sums add up
            sum_([self.dwl_scatter, self.dwl_class_sums, self.dwl_class_counts], world)
        if not self.mmd_per_step:
            n_s, n_t = self.dwl_class_counts[0].sum(), self.dwl_class_counts[1].sum()
            mean_s = self.dwl_class_sums[0].sum(0) / n_s.clamp_min(1)
            mean_t = self.dwl_class_sums[1].sum(0) / n_t.clamp_min(1)
            self._update_alignment(state, float((mean_s - mean_t).pow(2).sum()))
        j = []
        for i in range(2):
            j.append(lda_criterion(self.dwl_scatter[i], self.dwl_class_sums[i], self.dwl_class_counts[i], k))
            state[J_MAX] = max(state[J_MAX], j[-1])
            state[J_MIN] = min(state[J_MIN], j[-1])
        state[J_NORM] = (min(j) - state[J_MIN]) / (state[J_MAX] - state[J_MIN] + _EPS)
        if state[WINDOWS] == 0:
            state[J_MIN] = state[J_MAX]  # the release resets the minimum after its first epoch
        state[WINDOWS] += 1
        state[STEPS] = 0
        self.dwl_scatter.zero_()
        self.dwl_class_sums.zero_()
        self.dwl_class_counts.zero_()

    # ------------------------------------------------------------------ training step
    def _generator_backward(
        self,
        harmonizer: Harmonizer | None,
        adv: torch.Tensor,
        dis: torch.Tensor,
        weight: float,
        trade_off: float,
        features: list[torch.Tensor],
    ) -> StepStats | None:
        r"""``.grad`` of the generator = :math:`tT w_a \nabla L_{adv} + (1-T) w_c \nabla L_{dis}`.

        Without a harmonizer (plain training): one backward of :math:`tT L_{adv} + (1-T) L_{dis}`
        (weights 1), and ``None`` is returned.
        """
        keep = 1.0 - weight
        if harmonizer is None:
            (keep * dis + (trade_off * weight) * adv).backward()
            return None
        if keep <= 0.0:  # never with the release's normalisation; kept for safety
            return harmonizer.backward(cls=dis * 0.0, align=adv, trade_off=trade_off * weight, features=features)
        stats = harmonizer.backward(cls=dis, align=adv, trade_off=trade_off * weight / keep, features=features)
        with torch.no_grad():
            for module in self.generator_modules():
                for p in module.parameters():
                    if p.grad is not None:
                        p.grad.mul_(keep)
        return stats

    def update(self, batch: Batch, context: StepContext) -> UpdateResult:
        """Phases 1-4 of the release (GH in phase 3), then the statistics of :math:`T`."""
        x_s, y_s, x_t = batch.source, batch.source_labels, batch.target
        harmonizer, trade_off, optimizers = context.harmonizer, context.trade_off, context.optimizers
        self.set_step(context.step)
        gen, clf = optimizers["generator"], optimizers["classifier"]
        aux, disc = optimizers["aux_classifiers"], optimizers["discriminator"]
        every = list(optimizers.values())
        world = context.world
        weight = self.dynamic_weight
        skipped = 0
        values: dict[str, torch.Tensor] = {}
        stats = None

        for _ in range(self.num_k1):  # 1: source classification
            zero_grads(every)
            f_s = self.features(x_s)
            logits_s = self.classifier(f_s)
            values["cls_loss"] = F.cross_entropy(logits_s, y_s)
            values["cls_loss"].backward()
            values["source_acc"] = (logits_s.argmax(dim=1) == y_s).float().mean()
            skipped += not step_if_finite([gen, clf], world=world)

        for _ in range(self.num_k2):  # 2: discriminator, then the classifiers (generator fixed)
            zero_grads(every)
            with torch.no_grad():
                f_s, f_t = self.features(x_s), self.features(x_t)
            values["domain_loss"] = self._domain_loss(f_s, f_t)
            (self.disc_weight * values["domain_loss"]).backward()
            skipped += not step_if_finite([disc], world=world)
            zero_grads(every)
            with torch.no_grad():
                f_s, f_t = self.features(x_s), self.features(x_t)
            p1 = F.softmax(self.classifier1(f_t), dim=1)
            p2 = F.softmax(self.classifier2(f_t), dim=1)
            values["discrepancy_c"] = classifier_discrepancy(p1, p2)
            (self._source_ce3(f_s, y_s) - values["discrepancy_c"]).backward()
            skipped += not step_if_finite([aux, clf], world=world)

        for _ in range(self.num_k3):  # 3: the generator, T-weighted and harmonized
            zero_grads(every)
            f_s, f_t = self.features(x_s), self.features(x_t)
            adv = -self.adv_weight * self._domain_loss(f_s, f_t)
            dis = self._discrepancies(f_t)
            stats = self._generator_backward(harmonizer, adv, dis, weight, trade_off, [f_s, f_t])
            values["adversarial"], values["discrepancy"] = adv, dis
            values["transfer_loss"] = weight * adv + (1.0 - weight) * dis
            skipped += not step_if_finite([gen], harmonizer, world)

        for _ in range(self.num_k4):  # 4: pseudo-labels weighted by the prediction certainty
            zero_grads(every)
            logits_t = self.classifier(self.features(x_t))
            pseudo = logits_t.detach().argmax(dim=1)
            log_p = F.log_softmax(logits_t.detach(), dim=1)
            h = -(log_p.exp() * log_p).mean()
            k = self.num_classes
            mu = (torch.exp(-h) - 1.0 / k) / (1.0 - 1.0 / k)
            pseudo_ce = F.cross_entropy(logits_t, pseudo)
            (self.pseudo_weight * (mu * pseudo_ce + (1.0 - mu) * h)).backward()
            values["pseudo_ce"], values["mu"] = pseudo_ce, mu
            skipped += not step_if_finite([gen, clf], world=world)
        zero_grads(every)

        self._accumulate(x_s, y_s, x_t, world)
        logs = scalars(**values)
        state = self.dwl_state.tolist()
        logs.update(dwl_T=weight, dwl_A_norm=state[A_NORM], dwl_J_norm=state[J_NORM], skipped_phases=float(skipped))
        return UpdateResult.of_phases(stats, logs, not skipped, harmonizer)
