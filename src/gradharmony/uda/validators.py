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
``mixval_rank``  MixVal's two probes ranked over the pool, ranks averaged        a pool, mixval computed
                (Hu et al. 2023, the paper's combination)
``ensv``        agreement with the pool's averaged predictions               a pool of candidates
                (Hu et al. 2024)
``oracle``      target *test* accuracy: uses the labels, a reference only    target test labels
==============  ===========================================================  ======================

The per-model validators (all but ``mixval_rank``, ``ensv`` and ``oracle``) are listed in
:data:`VALIDATORS`; ``mixval_rank`` and ``ensv`` score a whole pool at once
(:func:`mixval_rank_scores`, :func:`ensv_scores`), and the oracle is the accuracy the engine already
measures on the target test split, always labelled as such.

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
#: The validators that score a pool of candidates at once, from what each evaluation stored.
POOL_VALIDATORS = ("mixval_rank", "ensv")
#: Target test accuracy: selection on the target labels, reported as the oracle, never as a validator.
ORACLE = "oracle"
#: Every name a selection can be made by.
SELECTABLE = (*VALIDATORS, *POOL_VALIDATORS, ORACLE)

#: SND's temperature (Saito et al. 2021, and their code): similarities are divided by it.
SND_TEMPERATURE = 0.05
#: MixVal's mixing ratio (Hu et al. 2023, their code's default): the first sample dominates.
MIXVAL_LAMBDA = 0.55
#: DEV's domain classifier: the L2 weights it chooses among (the strongest first) ...
DEV_DECAYS = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)
#: ... and the folds of its cross-fitting (each source weight from a classifier that did not see it).
DEV_FOLDS = 5


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

    Faithful to its use as a validator (Morerio et al. 2018; the ``entropy`` of Musgrave et al.
    2022), it rewards confidence alone: predictions collapsed onto one class (one-hot, the same
    class everywhere) reach its best score, 0, however wrong they are.  :func:`im_score` adds the
    diversity term that scores them 0 instead.

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

    As in the paper, SND rewards collapsed predictions: when every sample is predicted as the same
    class (identical rows), each sample's neighbours are all equally similar, :math:`s_i` is uniform
    over the :math:`N - 1` others, and the score reaches its maximum, :math:`\log(N - 1)`, above
    any model that tells classes apart.  Pair it with a check of the predicted classes' spread (or
    use ``im``, ``bnm``, ``mixval``) when a model may have collapsed.

    Example:
        >>> clustered = torch.tensor([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5)     # two dense clusters
        >>> angles = torch.linspace(0, math.pi / 2, 10)
        >>> scattered = torch.stack([angles.cos(), angles.sin()], dim=1)  # spread evenly between them
        >>> round(snd_score(clustered), 4) == round(math.log(4), 4), snd_score(clustered) > snd_score(scattered)
        (True, True)
        >>> collapsed = torch.tensor([[1.0, 0.0]] * 10)                           # one class everywhere
        >>> round(snd_score(collapsed), 4) == round(math.log(9), 4)                # the maximum, log(N - 1)
        True
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
    mean, which needs no pool; the paper averages the two *ranks* over the pool of candidates:
    :func:`mixval_rank_scores` (the pool validator ``mixval_rank``, from the probes every evaluation
    stores).  A probe set with no pair
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


def ascending_ranks(values: Sequence[float]) -> list[float]:
    """Each value's rank among the finite ``values``, 1 for the lowest, ties sharing their mean rank;
    NaN for a non-finite value (left out of the ranking).

    Example:
        >>> ascending_ranks([0.5, 0.9, 0.5, float("nan")])
        [1.5, 3.0, 1.5, nan]
    """
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return [
        sum(w < v for w in finite) + (sum(w == v for w in finite) + 1) / 2
        if v is not None and math.isfinite(v)
        else math.nan
        for v in values
    ]


def mixval_rank_scores(intra: Sequence[float], inter: Sequence[float]) -> list[float]:
    r"""MixVal as its paper combines the two probes: over a pool of candidates, the mean of each
    candidate's ranks in :math:`\mathrm{ICE}_{intra}` and in :math:`\mathrm{ICE}_{inter}`.

    With :math:`r(\cdot)` the ascending rank over the pool (1 for the lowest score, ties sharing
    their mean rank), candidate :math:`m` scores
    :math:`\tfrac12\,(r(\mathrm{ICE}^{(m)}_{intra}) + r(\mathrm{ICE}^{(m)}_{inter}))`, so that
    neither probe dominates through its scale (the per-model ``mixval`` averages the raw scores
    instead, which needs no pool).  Equal mean ranks are common (a candidate first on one probe and
    last on the other ties with its mirror image), so they are told apart by the raw mean
    :math:`\bar s_m = \tfrac12(\mathrm{ICE}^{(m)}_{intra} + \mathrm{ICE}^{(m)}_{inter}) \in [0, 1]`,
    added as :math:`\bar s_m / 8`: two different mean ranks differ by at least :math:`1/4`, so the
    ranks alone decide wherever they differ.  A candidate missing either probe (NaN) scores NaN
    and is left out of the ranks.  A pool of one candidate is the one picked.

    Example:
        The raw mean would pick the first candidate (0.595), strong on one probe only; the ranks
        pick the third, second best on both:

        >>> [round(s, 3) for s in mixval_rank_scores([0.99, 0.80, 0.81, 0.79], [0.20, 0.35, 0.36, 0.33])]
        [2.574, 2.572, 3.573, 1.57]

        Equal ranks: a model collapsed onto one class (no inter-cluster mixture kept) against a
        balanced one; the raw mean decides.  A candidate without probes is left out:

        >>> [round(s, 3) for s in mixval_rank_scores([1.0, 0.9, math.nan], [0.0, 0.6, 0.9])]
        [1.562, 1.594, nan]
    """
    if len(intra) != len(inter):
        raise ValueError(f"need both MixVal probes of each candidate, got {len(intra)} and {len(inter)}")
    both = [
        (a, b) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b) else (math.nan, math.nan)
        for a, b in zip(intra, inter)
    ]
    ranks_intra = ascending_ranks([a for a, _ in both])
    ranks_inter = ascending_ranks([b for _, b in both])
    return [(ra + rb) / 2 + (a + b) / 16 for ra, rb, (a, b) in zip(ranks_intra, ranks_inter, both)]


# ---------------------------------------------------------------------------------------------- DEV
def _fit_logistic(
    x: torch.Tensor, y: torch.Tensor, decay: float, steps: int = 100, start: torch.Tensor | None = None
) -> torch.Tensor:
    """An L2-regularised logistic regression ``[w; b]`` fitted by L-BFGS (deterministic), from ``start``
    (default: zeros)."""
    weights = (torch.zeros(x.shape[1] + 1, dtype=x.dtype) if start is None else start.clone()).requires_grad_(True)
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


def _domain_folds(n_source: int, n_target: int, folds: int, generator: torch.Generator | None) -> torch.Tensor:
    """The fold of each of the ``n_source + n_target`` samples (source first): each domain in a random
    order (``generator``) dealt out in turn, so that each fold holds about ``1 / folds`` of each."""
    fold = torch.empty(n_source + n_target, dtype=torch.long)
    fold[:n_source][torch.randperm(n_source, generator=generator)] = torch.arange(n_source) % folds
    fold[n_source:][torch.randperm(n_target, generator=generator)] = torch.arange(n_target) % folds
    return fold


def importance_weights(
    source_features: torch.Tensor,
    target_features: torch.Tensor,
    generator: torch.Generator | None = None,
    decays: Sequence[float] = DEV_DECAYS,
    folds: int = DEV_FOLDS,
) -> torch.Tensor:
    r"""Density ratios :math:`w(x) = \frac{p_T(x)}{p_S(x)}` of source samples, from a domain classifier (DEV).

    A logistic regression :math:`d` tells target (label 1) from source (label 0) features,
    standardised together, and gives :math:`w(x) = \frac{d(x)}{1 - d(x)} \cdot \frac{N_S}{N_T}`.

    * **Cross-fitting.** Each weight comes from a classifier that did not see its sample: the
      source and the target samples are dealt into ``folds`` folds (each domain in a random order,
      ``generator``, so that each fold holds about ``1 / folds`` of each), and a fold's samples are
      weighed by the classifier fitted on the other folds.  You et al. fit the classifier on the
      source *training* samples and weigh the validation ones; one fitted on the very samples it
      weighs is pulled towards "source" on them and shrinks their weights (identical domains, 100
      source and 1000 target samples in 256 dimensions: a mean weight of 0.6 instead of 1).
    * **Its L2 weight** is chosen among ``decays`` on held-out samples, as You et al. do, with every
      sample held out once (the same folds) rather than one 80/20 split, and by the held-out
      log-loss rather than the accuracy: the weights use the probabilities, and the accuracy ties
      whenever the domains overlap.  The first of equal losses (the strongest decay) wins; the
      chosen decay's out-of-fold predictions are the weights (``len(decays) * folds`` fits).
    * **Truncation**: :math:`w_i \leftarrow \min(w_i, \sqrt{N_S})`, truncated importance sampling
      (Ionides 2008) with the density ratio's known mean :math:`E_S[w] = 1`: no sample outweighs
      :math:`\sqrt{N_S}` average ones (a confident classifier's :math:`d \to 1` would otherwise make
      one sample the whole estimate).

    You et al. fit a small MLP per weight decay; a linear classifier keeps this cheap enough to
    run at every evaluation.

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
    if folds < 2 or not decays:
        raise ValueError(f"DEV needs at least 2 folds and one decay, got {folds} folds and decays {list(decays)}")
    x = torch.cat([s, t])
    std = x.std(dim=0)
    x = (x - x.mean(dim=0)) / torch.where(std > 1e-12, std, torch.ones_like(std))
    y = torch.cat([torch.zeros(s.shape[0]), torch.ones(t.shape[0])]).to(torch.float64)
    # each domain deals its samples in turn from fold 0: with at least 2 of each, every fold's
    # complement holds both domains (an empty fold is skipped)
    fold = _domain_folds(s.shape[0], t.shape[0], folds, generator)
    best, best_loss = None, math.inf
    previous: dict[int, torch.Tensor] = {}  # each fold's fit at the previous (stronger) decay: a warm start
    for decay in decays:
        out_of_fold = torch.zeros(x.shape[0], dtype=torch.float64)
        for k in range(folds):
            inside = fold == k
            if bool(inside.any()):
                previous[k] = _fit_logistic(x[~inside], y[~inside], decay, start=previous.get(k))
                out_of_fold[inside] = x[inside] @ previous[k][:-1] + previous[k][-1]
        loss = float(F.binary_cross_entropy_with_logits(out_of_fold, y))
        if loss < best_loss:
            best, best_loss = out_of_fold, loss
    if best is None:  # every loss NaN (non-finite features): no weights
        return torch.full((s.shape[0],), math.nan, dtype=torch.float64)
    # d / (1 - d) = exp(logit); an overflow to inf is truncated like any other large ratio
    ratio = best[: s.shape[0]].exp() * (s.shape[0] / t.shape[0])
    return ratio.clamp(max=math.sqrt(s.shape[0]))


def dev_risk(weights: torch.Tensor, losses: torch.Tensor) -> float:
    r"""The deep embedded validation risk (You et al., ICML 2019): an importance-weighted loss with a control variate.

    With weights :math:`w_i` and per-sample losses :math:`l_i` on the source validation samples,
    :math:`\eta = -\mathrm{Cov}(w l, w) / \mathrm{Var}(w)` and
    :math:`R = \overline{w l} + \eta\, \overline{w} - \eta`: an unbiased estimate of the target
    risk whose variance the control variate :math:`\overline w - 1` reduces.  With (nearly)
    constant weights, :math:`\mathrm{Var}(w) \le 10^{-12}\, \overline{w}^2` (a threshold relative
    to the weights' scale), :math:`\eta = 0`.

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
    eta = -cov / var if var > 1e-12 * float(w.mean()) ** 2 else 0.0
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
    Needs at least 2 candidates with predictions of one shape (fewer: a :class:`ValueError`).

    A candidate with a non-finite prediction (a diverged model: NaN probabilities) scores NaN and
    is left out of the average (its NaN would make every average NaN, and the arg-max of NaNs
    class 0, which it would then agree with).  With fewer than 2 finite candidates left, every
    score is NaN: there is no ensemble to agree with, and a NaN score is no pick
    (:func:`gradharmony.uda.selection.first_best` skips it), as for the other validators.

    Example:
        >>> right = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]])
        >>> wrong = torch.tensor([[0.2, 0.8], [0.8, 0.2], [0.1, 0.9]])
        >>> [round(s, 4) for s in ensv_scores([right, right, wrong]).tolist()]
        [1.0, 1.0, 0.6667]
        >>> diverged = torch.full((3, 2), math.nan)
        >>> [round(s, 4) for s in ensv_scores([right, wrong, diverged, right]).tolist()]
        [1.0, 0.6667, nan, 1.0]
        >>> ensv_scores([right, diverged]).tolist()
        [nan, nan]
    """
    if len(pool) < 2:
        raise ValueError(f"EnsV needs a pool of at least 2 candidates, got {len(pool)}")
    shapes = {tuple(p.shape) for p in pool}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(
            f"EnsV needs the candidates' [N, C] predictions on the same samples, got shapes {sorted(shapes)}"
        )
    stacked = torch.stack([p.detach().to(torch.float64) for p in pool])
    finite = torch.isfinite(stacked).flatten(1).all(dim=1)
    scores = torch.full((len(pool),), math.nan, dtype=torch.float64)
    if int(finite.sum()) < 2:
        return scores
    kept = stacked[finite]
    pseudo = kept.mean(dim=0).argmax(dim=1)
    scores[finite] = (kept.argmax(dim=2) == pseudo).double().mean(dim=1)
    return scores
