r"""Label-free validators: scores that rank trained models on a target domain without its labels.

In unsupervised domain adaptation the target labels do not exist at training time, so a checkpoint
(or a hyper-parameter, or GH on or off) has to be chosen by a score computed without them.  Each
function here is one published validator; every one returns a **score where higher is better**
(losses and entropies are negated), is finite on degenerate predictions (one class everywhere,
uniform predictions), and needs only torch.  They know nothing of GH or of the training engine,
which calls them at each evaluation (:mod:`gradharmony.uda.engine.validation`).

Notation: a model's softmax predictions on :math:`N` target samples form
:math:`P \in [0, 1]^{N \times C}` (rows :math:`p_i` sum to 1), :math:`H(p) = -\sum_k p_k \log p_k`
(natural log, :math:`0 \log 0 = 0`) and :math:`\bar p = \frac1N \sum_i p_i`.

==============  ===========================================================  ======================
name            score (higher is better)                                     needs
==============  ===========================================================  ======================
``source_val``  accuracy on held-out source samples (never trained on)       source validation split
``entropy``     :math:`-\frac1N \sum_i H(p_i)`                               target predictions
``im``          :math:`H(\bar p) - \frac1N \sum_i H(p_i)`                    target predictions
``bnm``         :math:`\lVert P \rVert_* / N`                                target predictions
``snd``         mean entropy of the soft neighbourhoods (Saito et al. 2021)  target predictions
``dev``         minus the importance-weighted source validation risk         source val + features
                (You et al. 2019)
``mixval``      accuracy on mixed target samples' pseudo-labels              the model, target inputs
                (Hu et al. 2023)
``ensv``        agreement with the pool's averaged predictions               a pool of candidates
                (Hu et al. 2024)
``oracle``      target *test* accuracy: uses the labels, a reference only    target test labels
==============  ===========================================================  ======================

The per-model validators (all but ``ensv`` and ``oracle``) are listed in :data:`VALIDATORS`;
``ensv`` scores a whole pool at once (:func:`ensv_scores`), and the oracle is the accuracy the
engine already measures on the target test split, always labelled as such.

Example (every validator on predictions with a known answer):
    >>> import math, torch
    >>> uniform = torch.full((6, 4), 0.25)
    >>> round(mean_entropy(uniform), 6) == round(math.log(4), 6)
    True
    >>> collapsed = torch.nn.functional.one_hot(torch.zeros(6, dtype=torch.long), 4).float()
    >>> im_score(collapsed), im_score(uniform) == 0.0
    (0.0, True)
    >>> round(bnm_score(torch.eye(4)), 6)     # four confident, diverse predictions: ||I||_* / 4 = 1
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

#: The validators computed for one model at each evaluation, in their canonical order.
VALIDATORS = ("source_val", "entropy", "im", "bnm", "snd", "dev", "mixval")
#: Validators that need the held-out source validation split (``source_val_fraction > 0``).
SOURCE_VALIDATORS = ("source_val", "dev")
#: The validator that scores a pool of candidates at once, from their stored predictions.
POOL_VALIDATORS = ("ensv",)
#: Target test accuracy: selection on the target labels, reported as the oracle, never as a validator.
ORACLE = "oracle"
#: Every name a selection can be made by.
SELECTABLE = (*VALIDATORS, *POOL_VALIDATORS, ORACLE)

#: SND's temperature (Saito et al. 2021, and their code): similarities are divided by it.
SND_TEMPERATURE = 0.05
#: MixVal's mixing ratio (Hu et al. 2023, their code's default): the first sample dominates.
MIXVAL_LAMBDA = 0.55


def _probabilities(probs: torch.Tensor) -> torch.Tensor:
    """``probs`` as a float64 ``[N, C]`` matrix of probabilities (checked)."""
    if probs.dim() != 2 or probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"predictions must be an [N, C] matrix with N, C >= 1, got shape {tuple(probs.shape)}")
    return probs.detach().to(torch.float64)


def entropies(probs: torch.Tensor) -> torch.Tensor:
    r"""Per-row entropy :math:`H(p_i) = -\sum_k p_{ik} \log p_{ik}` (natural log, :math:`0 \log 0 = 0`).

    Example:
        >>> entropies(torch.tensor([[1.0, 0.0], [0.5, 0.5]])).tolist() == [0.0, math.log(2)]
        True
    """
    p = _probabilities(probs)
    return -torch.special.xlogy(p, p).sum(dim=1)


def mean_entropy(probs: torch.Tensor) -> float:
    r"""Mean prediction entropy :math:`\frac1N \sum_i H(p_i)`: 0 for one-hot rows, :math:`\log C` for uniform ones.

    Example:
        >>> round(mean_entropy(torch.full((3, 10), 0.1)), 6) == round(math.log(10), 6)
        True
    """
    return float(entropies(probs).mean())


def entropy_score(probs: torch.Tensor) -> float:
    r"""The ``entropy`` validator: :math:`-\frac1N \sum_i H(p_i)` (confident predictions score higher).

    Example:
        >>> entropy_score(torch.tensor([[1.0, 0.0], [0.0, 1.0]])) > entropy_score(torch.full((2, 2), 0.5))
        True
    """
    return -mean_entropy(probs)


def im_score(probs: torch.Tensor) -> float:
    r"""Information maximization: :math:`H(\bar p) - \frac1N \sum_i H(p_i)`, in :math:`[0, \log C]`.

    High when each prediction is confident (low :math:`H(p_i)`) *and* the classes are used evenly
    (high :math:`H(\bar p)`); 0 for predictions collapsed onto one class, and 0 for uniform ones.

    Example:
        >>> round(im_score(torch.eye(3)), 6) == round(math.log(3), 6)   # confident and diverse: the maximum
        True
    """
    p = _probabilities(probs)
    mean = p.mean(dim=0, keepdim=True)
    return float(entropies(mean)[0] - entropies(p).mean()) + 0.0  # + 0.0: no negative zero


def bnm_score(probs: torch.Tensor) -> float:
    r"""Batch nuclear norm: :math:`\lVert P \rVert_* / N`, the sum of :math:`P`'s singular values over :math:`N`.

    The nuclear norm grows with both the confidence and the diversity of the predictions (Cui et
    al. 2020); BNM as a validator is its value on the target predictions.  For :math:`N \ge C` it
    is largest, :math:`\sqrt{C/N}`, for one-hot predictions that use every class equally often;
    :math:`1/\sqrt{N}` for one class everywhere; :math:`1/\sqrt{NC}` for uniform predictions.

    Example:
        >>> collapsed = torch.zeros(4, 2); collapsed[:, 0] = 1
        >>> round(bnm_score(collapsed), 6)         # one class everywhere: sqrt(4) / 4
        0.5
    """
    p = _probabilities(probs)
    if not bool(torch.isfinite(p).all()):  # a diverged model's predictions: no score
        return math.nan
    return float(torch.linalg.svdvals(p).sum() / p.shape[0])


def snd_score(x: torch.Tensor, temperature: float = SND_TEMPERATURE, chunk: int = 1024) -> float:
    r"""Soft neighbourhood density (Saito et al., ICCV 2021): the mean entropy of each sample's soft neighbours.

    With :math:`\hat x_i = x_i / \lVert x_i \rVert` (rows of the softmax predictions, as in the
    paper, or any features), the similarity to every *other* sample is turned into a distribution
    :math:`s_{ij} = \mathrm{softmax}_{j \ne i}(\hat x_i^\top \hat x_j / \tau)` with
    :math:`\tau = 0.05`, and the score is :math:`\frac1N \sum_i H(s_i)`: high when each sample has
    many close neighbours (dense, well-clustered predictions), low when they are scattered.  The
    sample itself is left out exactly (the authors' code gives it similarity :math:`-1/\tau`).
    Needs :math:`N \ge 2`; the similarities are computed ``chunk`` rows at a time.

    Example:
        >>> clustered = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5)     # two dense clusters
        >>> angles = torch.linspace(0, math.pi / 2, 10)
        >>> scattered = torch.stack([angles.cos(), angles.sin()], dim=1)  # spread evenly between them
        >>> round(snd_score(clustered), 4) == round(math.log(4), 4), snd_score(clustered) > snd_score(scattered)
        (True, True)
    """
    p = _probabilities(x)
    n = p.shape[0]
    if n < 2:
        raise ValueError(f"SND needs at least 2 samples, got {n}")
    norms = p.norm(dim=1, keepdim=True)
    unit = p / torch.where(norms > 0, norms, torch.ones_like(norms))
    total = 0.0
    for start in range(0, n, chunk):
        rows = unit[start : start + chunk]
        similarity = rows @ unit.T / temperature
        index = torch.arange(start, start + rows.shape[0])
        similarity[torch.arange(rows.shape[0]), index] = -math.inf  # not one's own neighbour
        log_s = torch.log_softmax(similarity, dim=1)
        total += float(-(log_s.exp() * torch.where(torch.isinf(log_s), 0.0, log_s)).sum())
    return total / n


def accuracy(probs_or_logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of rows whose arg-max is the label: the ``source_val`` validator on held-out source samples
    (and the oracle, on the target test split).

    Example:
        >>> accuracy(torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), torch.tensor([0, 1, 1]))
        0.6666666666666666
    """
    if probs_or_logits.shape[0] != labels.shape[0] or labels.shape[0] == 0:
        raise ValueError(f"need one label per row, got {probs_or_logits.shape[0]} rows and {labels.shape[0]} labels")
    return float((probs_or_logits.argmax(dim=1).cpu() == labels.cpu()).double().mean())


# ---------------------------------------------------------------------------------------------- MixVal
@dataclass(frozen=True)
class MixValScores:
    """MixVal's two probes and their combination (:func:`mixval_scores`)."""

    intra: float  #: accuracy on intra-cluster mixed samples (neighbourhood density)
    inter: float  #: accuracy on inter-cluster mixed samples (the decision boundary)
    intra_pairs: int
    inter_pairs: int

    @property
    def score(self) -> float:
        r"""The ``mixval`` validator: :math:`(\mathrm{ICE}_{intra} + \mathrm{ICE}_{inter}) / 2`."""
        return (self.intra + self.inter) / 2


def mixval_pairs(pseudo_labels: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """The sample pairs MixVal mixes: ``(intra_a, intra_b, inter_a, inter_b)`` index tensors.

    A fixed random order of the samples (``generator``) is paired end to end (first with last,
    second with second-to-last, ...: the authors pair each batch with its reverse); the pairs whose
    pseudo-labels differ are the inter-cluster probes.  For the intra-cluster probes the same
    order is sorted by pseudo-label (stably) and each cluster is paired end to end within itself.
    Each pair appears in both orders (``a`` is the dominant sample of its mixture); a sample is
    never mixed with itself.

    Example:
        >>> ia, ib, ea, eb = mixval_pairs(torch.tensor([0, 0, 1, 1, 1]), torch.Generator().manual_seed(0))
        >>> bool((torch.tensor([0, 0, 1, 1, 1])[ia] == torch.tensor([0, 0, 1, 1, 1])[ib]).all()), len(ia)
        (True, 4)
    """
    labels = pseudo_labels.detach().cpu().long()
    n = labels.shape[0]
    order = torch.randperm(n, generator=generator)
    partner = order.flip(0)
    inter = (labels[order] != labels[partner]).nonzero(as_tuple=True)[0]
    sorted_order = order[torch.sort(labels[order], stable=True).indices]
    intra_a, intra_b = [], []
    sorted_labels = labels[sorted_order]
    boundaries = torch.nonzero(sorted_labels[1:] != sorted_labels[:-1], as_tuple=True)[0] + 1
    starts = [0, *boundaries.tolist()]
    ends = [*boundaries.tolist(), n]
    for start, end in zip(starts, ends):
        members = sorted_order[start:end]
        mirrored = members.flip(0)
        keep = members != mirrored  # the middle of an odd cluster would be mixed with itself
        intra_a.append(members[keep])
        intra_b.append(mirrored[keep])
    empty = torch.zeros(0, dtype=torch.long)
    return (
        torch.cat(intra_a) if intra_a else empty,
        torch.cat(intra_b) if intra_b else empty,
        order[inter],
        partner[inter],
    )


@torch.no_grad()
def mixval_scores(
    predict: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor | Sequence,
    pseudo_labels: torch.Tensor,
    lam: float = MIXVAL_LAMBDA,
    generator: torch.Generator | None = None,
    batch_size: int = 500,
) -> MixValScores:
    r"""MixVal (Hu et al., NeurIPS 2023): probe a model with mixtures of target samples and their pseudo-labels.

    The pseudo-label :math:`\hat y_i` of target sample :math:`x_i` is the model's own prediction.
    A pair :math:`(a, b)` (:func:`mixval_pairs`) gives the mixed input
    :math:`\tilde x = \lambda x_a + (1 - \lambda) x_b` with :math:`\lambda = 0.55`, whose mixed
    label :math:`\lambda\, e_{\hat y_a} + (1 - \lambda)\, e_{\hat y_b}` has its arg-max at
    :math:`\hat y_a`.  The *intra-cluster* score is the share of mixtures of two samples with the
    same pseudo-label that the model still assigns to it (dense neighbourhoods score high); the
    *inter-cluster* score is the same share over pairs with different pseudo-labels (a boundary
    that passes between clusters, not through one, scores high).  The ``mixval`` score is their
    mean; the paper averages the two *ranks* over the pool of candidates, which cannot be kept per
    checkpoint during training, so the per-model mean is used here.  A probe set with no pair
    (every pseudo-label the same leaves no inter-cluster pair) scores 0: nothing was verified.

    Args:
        predict: the model, ``inputs -> logits`` (called on batches of ``batch_size`` mixtures).
        inputs: the target samples as the model takes them: a float tensor, or anything that
            has a length and returns the samples of an index tensor as one (images read lazily).
        pseudo_labels: the model's predicted class of each sample.
        lam: the weight of the dominant sample, in (0.5, 1).
        generator: the random order of the pairs (fixed, so that candidates are probed alike).

    Example:
        >>> x = torch.cat([torch.randn(20, 2, generator=torch.Generator().manual_seed(0)) * 0.1 - 3,
        ...                torch.randn(20, 2, generator=torch.Generator().manual_seed(1)) * 0.1 + 3])
        >>> def between(x):  return torch.stack([-x[:, 0], x[:, 0]], dim=1)          # the boundary x = 0
        >>> def through(x):  return torch.stack([-3 - x[:, 0], 3 + x[:, 0]], dim=1)  # x = -3: through a cluster
        >>> good = mixval_scores(between, x, between(x).argmax(1), generator=torch.Generator().manual_seed(0))
        >>> bad = mixval_scores(through, x, through(x).argmax(1), generator=torch.Generator().manual_seed(0))
        >>> good.score, good.score > bad.score
        (1.0, True)
    """
    if not 0.5 < lam < 1:
        raise ValueError(f"lam must be in (0.5, 1), got {lam}")
    labels = pseudo_labels.detach().cpu().long()
    if len(inputs) != labels.shape[0]:
        raise ValueError(f"need one pseudo-label per input, got {len(inputs)} inputs and {labels.shape[0]}")

    def take(index: torch.Tensor) -> torch.Tensor:
        return inputs[index.to(inputs.device)] if isinstance(inputs, torch.Tensor) else inputs[index]

    intra_a, intra_b, inter_a, inter_b = mixval_pairs(labels, generator)

    def probe(a: torch.Tensor, b: torch.Tensor) -> float:
        if a.numel() == 0:
            return 0.0
        correct = 0
        for start in range(0, a.numel(), batch_size):
            ia, ib = a[start : start + batch_size], b[start : start + batch_size]
            mixed = lam * take(ia) + (1 - lam) * take(ib)
            correct += int((predict(mixed).argmax(dim=1).cpu() == labels[ia]).sum())
        return correct / a.numel()

    return MixValScores(
        intra=probe(intra_a, intra_b),
        inter=probe(inter_a, inter_b),
        intra_pairs=int(intra_a.numel()),
        inter_pairs=int(inter_a.numel()),
    )


# ---------------------------------------------------------------------------------------------- DEV
def _fit_logistic(x: torch.Tensor, y: torch.Tensor, decay: float, steps: int = 100) -> torch.Tensor:
    """An L2-regularised logistic regression ``[w; b]`` fitted by L-BFGS (deterministic)."""
    weights = torch.zeros(x.shape[1] + 1, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ weights[:-1] + weights[-1]
        loss = F.binary_cross_entropy_with_logits(logits, y) + decay * weights[:-1].square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weights.detach()


def importance_weights(
    source_features: torch.Tensor,
    target_features: torch.Tensor,
    generator: torch.Generator | None = None,
    decays: Sequence[float] = (1e-1, 1e-2, 1e-3, 1e-4),
) -> torch.Tensor:
    r"""Density ratios :math:`w(x) = \frac{p_T(x)}{p_S(x)}` of source samples, from a domain classifier (DEV).

    A logistic regression tells target (label 1) from source (label 0) features, standardised
    together; it is fitted on a random 80% (``generator``) with each of ``decays`` as its L2
    weight, and the one most accurate on the other 20% gives
    :math:`w(x) = \frac{d(x)}{1 - d(x)} \cdot \frac{N_S}{N_T}`, with :math:`d(x)` clamped to
    :math:`[10^{-6}, 1 - 10^{-6}]`.  (You et al. fit a small MLP per weight decay; a linear
    classifier keeps this cheap enough to run at every evaluation.)

    Example:
        >>> source = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
        >>> w = importance_weights(source, source + 0.0, torch.Generator().manual_seed(0))
        >>> bool(((w > 0.5) & (w < 2)).all())       # same distribution: weights near 1
        True
    """
    s = source_features.detach().to(torch.float64).flatten(1)
    t = target_features.detach().to(torch.float64).flatten(1)
    if s.shape[0] < 2 or t.shape[0] < 2:
        raise ValueError(f"DEV needs at least 2 source and 2 target samples, got {s.shape[0]} and {t.shape[0]}")
    x = torch.cat([s, t])
    std = x.std(dim=0)
    x = (x - x.mean(dim=0)) / torch.where(std > 1e-12, std, torch.ones_like(std))
    y = torch.cat([torch.zeros(s.shape[0]), torch.ones(t.shape[0])]).to(torch.float64)
    order = torch.randperm(x.shape[0], generator=generator)
    cut = max(1, int(0.8 * x.shape[0]))
    fit, held = order[:cut], order[cut:] if cut < x.shape[0] else order[:cut]
    best, best_accuracy = None, -1.0
    for decay in decays:
        weights = _fit_logistic(x[fit], y[fit], decay)
        held_accuracy = float((((x[held] @ weights[:-1] + weights[-1]) > 0).double() == y[held]).double().mean())
        if held_accuracy > best_accuracy:
            best, best_accuracy = weights, held_accuracy
    d = torch.sigmoid(x[: s.shape[0]] @ best[:-1] + best[-1]).clamp(1e-6, 1 - 1e-6)
    return d / (1 - d) * (s.shape[0] / t.shape[0])


def dev_risk(weights: torch.Tensor, losses: torch.Tensor) -> float:
    r"""The deep embedded validation risk (You et al., ICML 2019): an importance-weighted loss with a control variate.

    With weights :math:`w_i` and per-sample losses :math:`l_i` on the source validation samples,
    :math:`\eta = -\mathrm{Cov}(w l, w) / \mathrm{Var}(w)` and
    :math:`R = \overline{w l} + \eta\, \overline{w} - \eta`: an unbiased estimate of the target
    risk whose variance the control variate :math:`\overline w - 1` reduces.  With constant
    weights (:math:`\mathrm{Var}(w) = 0`) :math:`\eta = 0`.

    Example:
        >>> dev_risk(torch.ones(4), torch.tensor([0.0, 1.0, 0.0, 1.0]))   # equal weights: the mean loss
        0.5
    """
    w = weights.detach().to(torch.float64).flatten()
    loss = losses.detach().to(torch.float64).flatten()
    if w.shape != loss.shape or w.numel() < 2:
        raise ValueError(f"need one weight per loss and at least 2 of each, got {w.numel()} and {loss.numel()}")
    weighted = w * loss
    var = float(w.var())
    cov = float(((weighted - weighted.mean()) * (w - w.mean())).sum() / (w.numel() - 1))
    eta = -cov / var if var > 1e-12 else 0.0
    return float(weighted.mean() + eta * w.mean() - eta)


def dev_score(
    source_features: torch.Tensor,
    source_losses: torch.Tensor,
    target_features: torch.Tensor,
    generator: torch.Generator | None = None,
) -> float:
    r"""The ``dev`` validator: :math:`-R`, minus the DEV risk (:func:`dev_risk`) of the source validation
    samples' losses (cross-entropy, as pytorch-adapt uses) weighted by :func:`importance_weights`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> feats = torch.randn(30, 4, generator=g)
        >>> good, bad = dev_score(feats, torch.full((30,), 0.1), feats), dev_score(feats, torch.full((30,), 2.0), feats)
        >>> good > bad
        True
    """
    weights = importance_weights(source_features, target_features, generator)
    return -dev_risk(weights, source_losses)


# ---------------------------------------------------------------------------------------------- EnsV
def ensv_scores(pool: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""EnsV (Hu et al., NeurIPS 2024): each candidate's agreement with the pool's averaged predictions.

    The candidates' softmax predictions on the same :math:`N` target samples are averaged,
    :math:`\bar P = \frac1M \sum_m P^{(m)}`; the ensemble's arg-max :math:`\hat y_i` serves as
    pseudo-labels, and candidate :math:`m` scores
    :math:`\frac1N \sum_i [\arg\max_k P^{(m)}_{ik} = \hat y_i]`.  The ensemble is never worse
    than the pool's worst candidate, so the pick is, with high probability, not a bad one.
    Needs at least 2 candidates with predictions of one shape.

    Example:
        >>> right = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]])
        >>> wrong = torch.tensor([[0.2, 0.8], [0.8, 0.2], [0.1, 0.9]])
        >>> [round(s, 4) for s in ensv_scores([right, right, wrong]).tolist()]
        [1.0, 1.0, 0.6667]
    """
    if len(pool) < 2:
        raise ValueError(f"EnsV needs a pool of at least 2 candidates, got {len(pool)}")
    shapes = {tuple(p.shape) for p in pool}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(
            f"EnsV needs the candidates' [N, C] predictions on the same samples, got shapes {sorted(shapes)}"
        )
    stacked = torch.stack([p.detach().to(torch.float64) for p in pool])
    pseudo = stacked.mean(dim=0).argmax(dim=1)
    return (stacked.argmax(dim=2) == pseudo).double().mean(dim=1)
