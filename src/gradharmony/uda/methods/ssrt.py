r"""SSRT: Safe Self-Refinement for Transformer-based domain adaptation (Sun et al., CVPR 2022), with GH.

A ViT backbone (ViT-B/16 in the paper), a bottleneck :math:`B`, a classifier :math:`C` and a domain
discriminator :math:`D` behind a gradient-reversal layer :math:`R_\lambda`; :math:`f = B(\mathrm{ViT}(x))`.
One training step runs **one** forward of ``cat(x_s, x_t)`` in which the target rows are duplicated
and perturbed inside the transformer:

**Perturbation (self-refinement input).**  A layer :math:`l` is drawn uniformly from ``sr_layers``
(the authors' ``[0, 4, 8]``; ``-1`` = the raw input image).  At the input of transformer block
:math:`l` the tokens :math:`h` of the :math:`n_t` target rows are copied and moved towards another
target sample of the batch (the batch order reversed, :math:`\pi(j) = n_t - 1 - j`):

.. math::
    \tilde h_j = h_j + \alpha\, r\, \mathrm{sg}\big(h_{\pi(j)} - h_j\big),

with :math:`\mathrm{sg}` the stop-gradient, :math:`\alpha` = ``sr_alpha`` and :math:`r` the safe-training
ramp below.  The copies go on through the remaining blocks with the clean batch (rows: source,
target, perturbed target); source rows are never perturbed.  This is the authors' ``VT.forward_features``
(the paper's "random offset towards another target sample" in token space), not additive noise.

**Losses** (:math:`p = \mathrm{softmax}(C(f))` of the clean target, :math:`\tilde p` of its perturbed copy):

.. math::
    L_{cls} &= \mathrm{CE}(C(f^s), y^s), \\
    L_{dom} &= \frac{2}{n_s + n_t}\sum_{i \in s \cup t} \mathrm{BCE}\big(D(R_\lambda(f_i)), d_i\big)
        \quad (d = 1 \text{ source}, 0 \text{ target}), \\
    L_{sr} &= \frac{\sum_j m_j\, \mathrm{KL}(p_j \,\|\, \tilde p_j)}{\sum_j m_j + 10^{-6}},
        \qquad m_j = [\max_k p_{jk} > \epsilon],

where, with probability :math:`1 - ` ``sr_loss_p``, the roles of :math:`p` and :math:`\tilde p` swap
(mask on :math:`\tilde p`); no side is detached (as in the authors' ``get_sr_loss``).  :math:`L_{dom}`
is the authors' ``BCELoss(sigmoid(.)) * 2`` over both domains (= the sum of the two domain means for
equal batch sizes), computed stably from logits.  The step minimises

.. math:: L_{cls} + t\,(w_d L_{dom} + r\, w_{sr} L_{sr}),

:math:`t` the engine's ``trade_off`` (1), :math:`w_d` = ``domain_loss_weight``, :math:`w_{sr}` =
``sr_loss_weight``.

**Roles and GH placement (the GH authors' ``ssrt/model/SSRT.py``, ``get_loss``).**  They set
``loss1 = classification_loss`` and ``loss2 = domain_loss_weight * domain_loss + sr_loss_weight_adap *
sr_loss``, probe both with ``getgrad(base_network)`` (the ViT), and back-propagate
``gh1 * loss1 + gh2 * loss2``.  Here: ``cls`` = :math:`L_{cls}`, ``align`` = :math:`w_d L_{dom} + r\,
w_{sr} L_{sr}`; GH++ lead: ``cls`` (their ``gh1`` = :math:`1 + 2\sin(\beta/2)` goes to ``loss1``);
scope: the ViT backbone (:meth:`SSRT.scope_modules`).  The weighted form also rescales the
bottleneck, classifier and discriminator gradients, as theirs does.

**Safe training** (the authors' ``use_safe_training``; :math:`T` = ``safe_period`` (their
``adap_adjust_T``, 1000), :math:`L` = ``safe_levels`` (``adap_adjust_L``, 4)).

* *Ramp*: :math:`r(i) = \sin\big(\tfrac{\pi}{2}\,(i - \phi)/P\big)` for :math:`i < \phi + P`, else 1;
  initially :math:`\phi = 0, P = T`.  Both the refinement weight :math:`r\,w_{sr}` and the
  perturbation strength :math:`r\,\alpha` follow it.
* *Snapshot*: at every step :math:`i \equiv 0 \pmod T` the model's parameters and buffers are copied
  (and the diversity record is cleared).
* *Monitor*: every step records the target diversity :math:`d_i` = the number of distinct classes
  predicted (argmax) on the clean target batch.  At the end of each period
  (:math:`(i+1) \equiv 0 \pmod T`, :math:`i > 0`), for every level :math:`l = 0..L` the period's
  record is cut into :math:`2^l` consecutive parts (``numpy.array_split``) and averaged; with
  ``safe_append_last`` the last part of the previous healthy period is put in front.  A **collapse**
  is any part whose mean is more than ``safe_drop`` (1.0 class) below the part before it; it is
  ignored while :math:`r \le` ``safe_min_r`` (0.1).
* *Restart*: on a collapse, :math:`\phi \leftarrow i` (so :math:`r` restarts from 0: the refinement
  weight and strength drop, then ramp up again), :math:`P \leftarrow 2P` if the previous restart was
  at most :math:`P` steps before, and at the start of the next step the snapshot is restored (then
  immediately saved again, as that step is a period start).  Healthy periods become the "previous
  period" of the next check.  The step counter, the learning-rate schedule and (by default) the
  optimizer state go on; ``safe_restore_optimizer=True`` also restores the optimizers' state (the
  authors' ``adap_adjust_restore_optimizor``, off by default).

Two deliberate differences from the released code, both documented here:

1. The release keeps ``net.state_dict()`` as its snapshot; those tensors share storage with the live
   parameters, which the optimizer updates in place, so its "restore" reloads the current weights
   and only the ramp restarts.  We restore a real copy, as the paper describes
   (``safe_restore_weights=False`` reproduces the release: no copy, ramp restart only).
2. The release's perturbation strength lags the ramp by one step (it sets ``sr_alpha_adap`` after the
   forward that uses it; at step 0 it perturbs at full strength while the weight is 0).  Here one
   :math:`r` per step drives both.

Also: :math:`R_\lambda` follows the authors' ramp :math:`\lambda = 2(h-l)/(1 + e^{-\alpha i/N}) - (h-l) + l`
with :math:`\alpha = 1, l = 0, h = 0.1, N = 1000` (their ``WarmStartGradientReverseLayer``), driven by
the training step (theirs also advances on evaluation forwards); perturbation and the refinement
loss are skipped when ``sr_loss_weight`` is 0 (the release still perturbs, which only changes the
bottleneck's batch statistics); backbones without transformer ``blocks`` (CNNs) are perturbed at
their input whatever layer is drawn (logged as ``sr_layer`` = -1); gradient checkpointing inside
the ViT is not supported (the perturbation is a forward pre-hook on the drawn block).

Everything needed for an exact resume (ramp phase and period, pending restart, diversity records,
the snapshot, restart count) is saved with the model's ``state_dict`` (``get_extra_state``), so
checkpoints hold the model twice.  Random draws (layer, KL direction) use torch's global generator,
which the engine checkpoints.

Defaults follow the release (``trainer/argument_parser.py``, ``model/SSRT.py``): ``bottleneck_dim``
1024 (2048 for Office-Home), bottleneck ``Linear-BN-ReLU-Dropout(0.5)`` initialised
:math:`\mathcal N(0, 0.005)` with bias 0.1; classifier and discriminator ``Linear(width)-ReLU-
Dropout(0.5)-Linear``, width = ``bottleneck_dim``, :math:`\mathcal N(0, 0.01)`, bias 0; ViT at 0.1x
the learning rate; ``sr_alpha=0.3`` (0.2 in their Office-31 script), ``sr_loss_weight=0.2``,
``sr_epsilon=0.4``, ``sr_loss_p=0.5``.  Their optimiser: SGD, nesterov momentum 0.9, weight decay
5e-4, ``lr (1 + 0.001 i)^-0.75``, batch 32 (``configs/*/ssrt.yaml``).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from gradharmony.distributed import gather_rows
from gradharmony.reversal import GradientReversal
from gradharmony.uda.methods.base import Batch, Losses, Method, StepContext, UpdateResult, scalars
from gradharmony.uda.methods.steps import pair_backward, step_if_finite, zero_grads
from gradharmony.uda.models.heads import ClassifierHead

#: ``sr_layers`` entry meaning "perturb the raw input".
INPUT_LAYER = -1


# ----------------------------------------------------------------------------- maths
def perturb_target(h: torch.Tensor, n_source: int, strength: float) -> torch.Tensor:
    r"""The perturbed copies of rows ``n_source:`` of ``h``: :math:`h_j + s\,\mathrm{sg}(h_{\pi(j)} - h_j)`.

    :math:`\pi` reverses the order of the target rows (the authors' ``torch.flip``); the offset is
    detached, so the copy's gradient flows to :math:`h_j` with coefficient 1.
    """
    target = h[n_source:]
    return target + strength * (target.flip(0) - target).detach()


def self_refinement_loss(
    clean_logits: torch.Tensor, perturbed_logits: torch.Tensor, epsilon: float = 0.4, clean_first: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(loss, mask fraction)``: the confidence-masked KL between clean and perturbed predictions.

    ``clean_first``: :math:`\mathrm{KL}(p \| \tilde p)` masked by :math:`\max p > \epsilon`;
    otherwise :math:`\mathrm{KL}(\tilde p \| p)` masked by :math:`\max \tilde p > \epsilon`.  The masked
    mean is :math:`\sum m\,\mathrm{KL} / (\sum m + 10^{-6})`; nothing is detached.
    """
    first, second = (clean_logits, perturbed_logits) if clean_first else (perturbed_logits, clean_logits)
    log_p, log_q = F.log_softmax(first, dim=1), F.log_softmax(second, dim=1)
    p = log_p.exp()
    mask = (p.detach().max(dim=1).values > epsilon).to(p.dtype)
    kl = (p * (log_p - log_q)).sum(dim=1)
    return (kl * mask).sum() / (mask.sum() + 1e-6), mask.mean()


def refinement_ramp(step: int, phase: int, period: int, magnitude: float = 1.0) -> float:
    r""":math:`r = m \sin(\frac{\pi}{2}(i - \phi)/P)` before :math:`\phi + P`, then :math:`m` (the authors' ``get_adjust``)."""
    if step >= period + phase:
        return float(magnitude)
    return math.sin((step - phase) / period * math.pi / 2) * magnitude


def chunk_means(values: Sequence[float], chunks: int) -> list[float]:
    """Means of ``numpy.array_split(values, chunks)`` (the first ``len % chunks`` parts one longer); NaN if empty."""
    size, extra = divmod(len(values), chunks)
    means, start = [], 0
    for i in range(chunks):
        stop = start + size + (1 if i < extra else 0)
        part = values[start:stop]
        means.append(sum(part) / len(part) if len(part) else math.nan)
        start = stop
    return means


def diversity_dropped(
    divs: Sequence[float], previous: Sequence[float] | None, levels: int, threshold: float = 1.0
) -> bool:
    r"""The authors' ``check_div_drop`` test (without its :math:`r` gate).

    For :math:`l = 0..` ``levels``: the means of ``divs`` cut into :math:`2^l` parts, preceded by
    the mean of the last of :math:`2^l` parts of ``previous`` (when given); True if some mean is more
    than ``threshold`` below the one before it.  NaN means (empty parts) never compare true.
    """
    for level in range(levels + 1):
        chunks = 2**level
        means = chunk_means(divs, chunks)
        if previous is not None:
            means.insert(0, chunk_means(previous, chunks)[-1])
        if any(later < earlier - threshold for earlier, later in itertools.pairwise(means)):
            return True
    return False


@dataclass
class SafeTrainingState:
    """Safe training's whole state (saved with the model's ``state_dict``).

    ``phase``, ``period``: the ramp's :math:`\\phi, P`; ``r``: the ramp value of the latest step;
    ``restore_pending``: a collapse was detected, restore at the next step; ``last_restore_step``;
    ``divs``: the diversities of the current period; ``divs_last_period``: those of the previous
    healthy one; ``snapshot``: parameter/buffer copies (``None`` before the first or with
    ``safe_restore_weights=False``); ``optimizer_snapshot``: per optimizer name, its ``state``;
    ``restores``, ``collapses``: counters.
    """

    phase: int = 0
    period: int = 1000
    r: float = 0.0
    restore_pending: bool = False
    last_restore_step: int = 0
    divs: list[int] = field(default_factory=list)
    divs_last_period: list[int] | None = None
    snapshot: dict[str, torch.Tensor] | None = None
    optimizer_snapshot: dict[str, Any] | None = None
    restores: int = 0
    collapses: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "period": self.period,
            "r": self.r,
            "restore_pending": self.restore_pending,
            "last_restore_step": self.last_restore_step,
            "divs": list(self.divs),
            "divs_last_period": None if self.divs_last_period is None else list(self.divs_last_period),
            "snapshot": None if self.snapshot is None else dict(self.snapshot),
            "optimizer_snapshot": self.optimizer_snapshot,
            "restores": self.restores,
            "collapses": self.collapses,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> SafeTrainingState:
        s = cls(
            **{
                k: state[k]
                for k in ("phase", "period", "r", "restore_pending", "last_restore_step", "restores", "collapses")
            }
        )
        s.divs = list(state["divs"])
        s.divs_last_period = None if state["divs_last_period"] is None else list(state["divs_last_period"])
        s.snapshot = None if state["snapshot"] is None else dict(state["snapshot"])
        s.optimizer_snapshot = state["optimizer_snapshot"]
        return s


# ----------------------------------------------------------------------------- the method
class SSRT(Method):
    r"""SSRT: adversarial alignment + safe self-refinement on perturbed target tokens; GH over the ViT.

    Roles: ``cls`` = source cross-entropy; ``align`` = :math:`w_d L_{dom} + r\,w_{sr} L_{sr}` (domain
    adversarial loss through :math:`R_\lambda` plus the ramped self-refinement KL).  GH++ lead:
    ``cls`` (the authors' ``loss1``).  Default scope: the ViT backbone (their ``getgrad(base_network)``).
    One optimizer, ``all`` (groups ``backbone`` at ``backbone_lr_mult`` = 0.1, ``heads``,
    ``adversary``).  Multi-step because of the safe-training restarts: :meth:`update` restores or
    snapshots at period boundaries, runs the single forward, the harmonized backward and the
    optimizer step, then records the target diversity and checks for a collapse.

    :meth:`compute_losses` is a single-forward diagnostic (nothing steps, the safe-training state is
    not touched; the current ramp value is used).

    Hyper-parameters (the authors' names in brackets): ``sr_loss_weight=0.2``, ``sr_alpha=0.3``,
    ``sr_layers=(0, 4, 8)``, ``sr_epsilon=0.4``, ``sr_loss_p=0.5``, ``domain_loss_weight=1.0``;
    ``safe_training=True`` [use_safe_training], ``safe_period=1000`` [adap_adjust_T],
    ``safe_levels=4`` [adap_adjust_L], ``safe_append_last=True``
    [adap_adjust_append_last_subintervals], ``safe_drop=1.0`` and ``safe_min_r=0.1`` (constants
    there), ``safe_restore_weights=True`` (see the module notes), ``safe_restore_optimizer=False``
    [adap_adjust_restore_optimizor]; heads ``head_hidden=None`` (= ``bottleneck_dim``),
    ``head_dropout=0.5``; reversal ``grl_alpha=1.0, grl_low=0.0, grl_high=0.1, grl_max_steps=1000``;
    ``bottleneck_dim=1024, backbone_lr_mult=0.1, bottleneck_dropout=0.5``.

    Example (a 3-block ViT-Ti at 32x32: 4 patches + the class token):
        >>> import pytest, torch
        >>> _ = pytest.importorskip("timm")          # ViT backbones need timm
        >>> from gradharmony import Harmonizer
        >>> from gradharmony.uda.models import build_image_backbone
        >>> _ = torch.manual_seed(0)
        >>> vit = build_image_backbone("vit_tiny_patch16_224", img_size=32, depth=3)
        >>> method = SSRT(vit, num_classes=5, max_steps=100, bottleneck_dim=32, sr_layers=(0, 2),
        ...               safe_period=4)
        >>> optimizers = {name: torch.optim.SGD(groups, lr=0.01, momentum=0.9)
        ...               for name, groups in method.optimizer_groups(0.01).items()}
        >>> harmonizer = Harmonizer(mode="gh++", scope=method.scope_modules(), lead=method.default_lead)
        >>> x_s, x_t, y_s = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32), torch.randint(0, 5, (4,))
        >>> for step in range(3):
        ...     context = StepContext(step=step, optimizers=optimizers, harmonizer=harmonizer, trade_off=1.0)
        ...     result = method.update(Batch(x_s, y_s, x_t), context)
        >>> method.default_lead, method.multi_step, result.stats.step
        ('cls', True, 2)
        >>> round(result.logs["sr_r"], 4)            # sin(pi/2 * 2/4): the refinement ramp
        0.7071
        >>> method.eval()(x_t).shape
        torch.Size([4, 5])
    """

    name = "ssrt"
    default_lead = "cls"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        max_steps: int,
        bottleneck_dim: int = 1024,
        *,
        sr_loss_weight: float = 0.2,
        sr_alpha: float = 0.3,
        sr_layers: Sequence[int] = (0, 4, 8),
        sr_epsilon: float = 0.4,
        sr_loss_p: float = 0.5,
        domain_loss_weight: float = 1.0,
        safe_training: bool = True,
        safe_period: int = 1000,
        safe_levels: int = 4,
        safe_append_last: bool = True,
        safe_drop: float = 1.0,
        safe_min_r: float = 0.1,
        safe_restore_weights: bool = True,
        safe_restore_optimizer: bool = False,
        head_hidden: int | None = None,
        head_dropout: float = 0.5,
        grl_alpha: float = 1.0,
        grl_low: float = 0.0,
        grl_high: float = 0.1,
        grl_max_steps: int | None = 1000,
        backbone_lr_mult: float = 0.1,
        bottleneck_dropout: float = 0.5,
    ):
        super().__init__(
            backbone,
            num_classes,
            max_steps,
            bottleneck_dim,
            backbone_lr_mult=backbone_lr_mult,
            bottleneck_dropout=bottleneck_dropout,
        )
        layers = tuple(int(layer) for layer in sr_layers)
        blocks = self._blocks()
        for layer in layers:
            if layer < INPUT_LAYER or (blocks is not None and layer >= len(blocks)):
                depth = "any" if blocks is None else len(blocks)
                raise ValueError(
                    f"sr_layers entries must be -1 (the input) or a block index below the "
                    f"backbone's depth ({depth}), got {layer}"
                )
        if sr_loss_weight < 0 or sr_alpha < 0:
            raise ValueError(f"sr_loss_weight and sr_alpha must be >= 0, got {sr_loss_weight}, {sr_alpha}")
        if not 0.0 <= sr_loss_p <= 1.0:
            raise ValueError(f"sr_loss_p must be in [0, 1], got {sr_loss_p}")
        if safe_period < 1 or safe_levels < 0:
            raise ValueError(f"safe_period must be >= 1 and safe_levels >= 0, got {safe_period}, {safe_levels}")
        if head_hidden is not None and head_hidden < 0:
            raise ValueError(f"head_hidden must be >= 0 or None, got {head_hidden}")
        self.sr_loss_weight, self.sr_alpha, self.sr_layers = sr_loss_weight, sr_alpha, layers
        self.sr_epsilon, self.sr_loss_p, self.domain_loss_weight = sr_epsilon, sr_loss_p, domain_loss_weight
        self.safe_training, self.safe_period, self.safe_levels = safe_training, safe_period, safe_levels
        self.safe_append_last, self.safe_drop, self.safe_min_r = safe_append_last, safe_drop, safe_min_r
        self.safe_restore_weights, self.safe_restore_optimizer = safe_restore_weights, safe_restore_optimizer
        self.head_hidden, self.head_dropout = head_hidden, head_dropout
        self.grl_alpha, self.grl_low, self.grl_high, self.grl_max_steps = grl_alpha, grl_low, grl_high, grl_max_steps

        hidden = bottleneck_dim if head_hidden is None else (head_hidden or None)
        self.classifier = ClassifierHead(bottleneck_dim, num_classes, hidden=hidden, dropout=head_dropout)
        self.discriminator = ClassifierHead(bottleneck_dim, 1, hidden=hidden, dropout=head_dropout)
        self.grl = GradientReversal(max_steps=grl_max_steps or max_steps, alpha=grl_alpha, low=grl_low, high=grl_high)
        nn.init.normal_(self.bottleneck[0].weight, 0.0, 0.005)
        nn.init.constant_(self.bottleneck[0].bias, 0.1)
        for head in (self.classifier, self.discriminator):
            for layer in head:
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, 0.0, 0.01)
                    nn.init.zeros_(layer.bias)
        self.safe = SafeTrainingState(period=safe_period)

    # ------------------------------------------------------------------ model
    def _blocks(self) -> nn.Module | None:
        """The backbone's transformer blocks (timm ViT ``blocks``), or None (perturb at the input)."""
        blocks = getattr(self.backbone, "blocks", None)
        if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0:
            return blocks
        return None

    def scope_modules(self) -> list[nn.Module]:
        """GH scope: the ViT backbone, as the authors' ``getgrad(base_network)``."""
        return [self.backbone]

    @property
    def safe_training_active(self) -> bool:
        """Safe training runs only with a self-refinement loss (the authors' ``sr_loss_weight > 0``)."""
        return bool(self.safe_training) and self.sr_loss_weight > 0

    @property
    def perturbs(self) -> bool:
        """Whether a training forward perturbs the target (training mode, a refinement loss, layers)."""
        return self.training and self.sr_loss_weight > 0 and len(self.sr_layers) > 0

    def ramp(self, step: int) -> float:
        """The refinement ramp :math:`r` at ``step`` under the current phase and period (1 if inactive)."""
        if not self.safe_training_active:
            return 1.0
        return refinement_ramp(step, self.safe.phase, self.safe.period)

    @contextmanager
    def _perturb_block(self, layer: int, n_source: int, strength: float) -> Iterator[None]:
        """Within the context, block ``layer`` appends perturbed copies of the target rows to its input."""

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            h = args[0]
            return (torch.cat((h, perturb_target(h, n_source, strength))), *args[1:]), kwargs

        handle = self._blocks()[layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    # ------------------------------------------------------------------ losses
    def terms(
        self, x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor, step: int, r: float | None = None
    ) -> Losses:
        r"""One forward at training step ``step`` with ramp value ``r`` (default: :meth:`ramp`).

        ``cls`` = source CE, ``align`` = :math:`w_d L_{dom} + r\,w_{sr} L_{sr}`; ``features``: the
        bottleneck output (rows: source, target, perturbed target); ``cut``: the backbone output;
        ``extra``: ``domain`` (:math:`L_{dom}`), ``sr`` (:math:`L_{sr}`) and ``target_logits`` (the
        clean target rows); ``logs``: tensors and floats, not yet fetched.
        """
        self.set_step(step)
        r = self.ramp(step) if r is None else float(r)
        n_s, n_t = x_s.shape[0], x_t.shape[0]
        if n_t < 1:
            raise ValueError("SSRT needs at least one target example per batch")
        n = n_s + n_t
        x = torch.cat((x_s, x_t))
        perturb, layer = self.perturbs, None
        strength = self.sr_alpha * r
        if perturb:
            layer = self.sr_layers[int(torch.randint(len(self.sr_layers), ()).item())]
            if layer == INPUT_LAYER or self._blocks() is None:
                layer = INPUT_LAYER
                h = self.backbone(torch.cat((x, perturb_target(x, n_s, strength))))
            else:
                with self._perturb_block(layer, n_s, strength):
                    h = self.backbone(x)
        else:
            h = self.backbone(x)
        features = self.bottleneck(h)
        logits = self.classifier(features)
        cls = F.cross_entropy(logits[:n_s], y_s)
        domain_logits = self.discriminator(self.grl(features[:n])).squeeze(-1)
        labels = torch.zeros_like(domain_logits)
        labels[:n_s] = 1.0
        domain = 2.0 * F.binary_cross_entropy_with_logits(domain_logits, labels)
        if perturb:
            clean_first = bool(torch.rand(()).item() <= self.sr_loss_p)
            sr, mask = self_refinement_loss(logits[n_s:n], logits[n:], self.sr_epsilon, clean_first)
        else:
            sr, mask = logits.new_zeros(()), logits.new_zeros(())
        sr_weight = self.sr_loss_weight * r
        align = self.domain_loss_weight * domain + sr_weight * sr
        logs = dict(
            cls_loss=cls,
            transfer_loss=align,
            domain_loss=domain,
            sr_loss=sr,
            sr_mask=mask,
            source_acc=(logits[:n_s].argmax(dim=1) == y_s).float().mean(),
            domain_acc=((domain_logits > 0).to(labels.dtype) == labels).float().mean(),
            grl_coeff=self.grl.coefficient,
            sr_r=r,
            sr_weight=sr_weight,
            sr_strength=strength,
        )
        if layer is not None:
            logs["sr_layer"] = float(layer)
        return Losses(
            cls=cls,
            align=align,
            features=features,
            cut=h,
            logs=logs,
            extra={"domain": domain, "sr": sr, "target_logits": logits[n_s:n]},
        )

    def compute_losses(self, x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor, step: int) -> Losses:
        """Diagnostic single forward: ``cls`` = source CE, ``align`` = :math:`w_d L_{dom} + r w_{sr} L_{sr}`."""
        losses = self.terms(x_s, y_s, x_t, step)
        losses.logs = scalars(**losses.logs)
        return losses

    # ------------------------------------------------------------------ safe training
    def _state_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [*self.named_parameters(), *self.named_buffers()]

    def save_snapshot(self, optimizers: dict[str, torch.optim.Optimizer] | None = None) -> None:
        """Copy the parameters and buffers (and, with ``safe_restore_optimizer``, the optimizers' state)."""
        if self.safe_restore_weights:
            self.safe.snapshot = {name: t.detach().clone() for name, t in self._state_tensors()}
        if self.safe_restore_optimizer and optimizers is not None:
            self.safe.optimizer_snapshot = {
                name: copy.deepcopy(opt.state_dict()["state"]) for name, opt in optimizers.items()
            }

    def restore_snapshot(self, optimizers: dict[str, torch.optim.Optimizer] | None = None) -> None:
        """Copy the snapshot back in place (the optimizers keep their parameter references)."""
        if self.safe.snapshot is not None:
            with torch.no_grad():
                for name, t in self._state_tensors():
                    t.copy_(self.safe.snapshot[name])
        if self.safe.optimizer_snapshot is not None and optimizers is not None:
            for name, opt in optimizers.items():
                saved = self.safe.optimizer_snapshot.get(name)
                if saved is not None:  # keep the current groups (the engine sets their lr every step)
                    opt.load_state_dict(
                        {"state": copy.deepcopy(saved), "param_groups": opt.state_dict()["param_groups"]}
                    )

    def _begin_step(self, step: int, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        """Restore if a collapse is pending; snapshot at period starts; set this step's ramp value."""
        restored = saved = 0.0
        if self.safe_training_active:
            s = self.safe
            if s.restore_pending and step > 0:
                self.restore_snapshot(optimizers)
                s.restore_pending, s.last_restore_step = False, step
                s.restores += 1
                restored = 1.0
            if step % self.safe_period == 0:
                self.save_snapshot(optimizers)
                s.divs = []
                saved = 1.0
            s.r = self.ramp(step)
        return {"safe_restored": restored, "safe_snapshot": saved}

    def _end_step(self, step: int, diversity: int) -> float:
        """Record the diversity; at a period's end, check for a collapse (1.0 if one was found)."""
        if not self.safe_training_active:
            return 0.0
        s = self.safe
        s.divs.append(int(diversity))
        if (step + 1) % self.safe_period != 0 or step == 0:
            return 0.0
        previous = s.divs_last_period if self.safe_append_last else None
        if s.r > self.safe_min_r and diversity_dropped(s.divs, previous, self.safe_levels, self.safe_drop):
            s.restore_pending, s.phase = True, step
            s.collapses += 1
            if step - s.last_restore_step <= s.period:
                s.period *= 2
            return 1.0
        s.divs_last_period = list(s.divs)
        return 0.0

    def get_extra_state(self) -> dict[str, Any]:
        return self.safe.to_dict()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.safe = SafeTrainingState.from_dict(state)

    # ------------------------------------------------------------------ training step
    def update(self, batch: Batch, context: StepContext) -> UpdateResult:
        """Safe-training bookkeeping, one forward, one backward (harmonized, or plain without a
        harmonizer), every optimizer steps."""
        x_s, y_s, x_t, step = batch.source, batch.source_labels, batch.target, context.step
        optimizers, harmonizer, world = context.optimizers, context.harmonizer, context.world
        every = list(optimizers.values())
        zero_grads(every)
        events = self._begin_step(step, optimizers)
        t = self.terms(x_s, y_s, x_t, step)
        stats = pair_backward(harmonizer, cls=t.cls, align=t.align, trade_off=context.trade_off, features=t.features)
        stepped = step_if_finite(every, harmonizer, world)
        zero_grads(every)
        predicted = t.extra["target_logits"].detach().argmax(dim=1)
        if world is not None:  # the global batch's diversity: every process decides restarts alike
            predicted = gather_rows(predicted, world)
        diversity = int(predicted.unique().numel())
        collapse = self._end_step(step, diversity)
        logs = scalars(**t.logs)
        logs.update(
            events,
            target_diversity=float(diversity),
            safe_collapse=collapse,
            safe_period=float(self.safe.period),
            safe_restores=float(self.safe.restores),
        )
        return UpdateResult.of_phases(stats, logs, stepped, harmonizer)
