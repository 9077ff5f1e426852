"""The label-free validators on synthetic predictions with known answers, and on degenerate ones.

Every validator is a score where higher is better; on predictions collapsed onto one class, or
uniform, each must still be a finite number (a model that collapsed is scored, not crashed on).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from gradharmony.uda import validators as V
from gradharmony.uda.config import ConfigError
from gradharmony.uda.engine.validation import stratified_hold_out


def two_clusters(n: int = 40, spread: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points around (-3, 0) (class 0) and ``n`` around (+3, 0) (class 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(n, 2, generator=g) * spread - torch.tensor([3.0, 0.0]),
                   torch.randn(n, 2, generator=g) * spread + torch.tensor([3.0, 0.0])])  # fmt: skip
    return x, torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])


def threshold_model(at: float, sharpness: float = 4.0):
    """A 2-class model that says class 1 where the first coordinate exceeds ``at``."""

    def predict(x: torch.Tensor) -> torch.Tensor:
        z = sharpness * (x[:, 0] - at)
        return torch.stack([-z, z], dim=1)

    return predict


# ----------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("classes", [2, 10, 345])
def test_the_entropy_of_uniform_predictions_is_log_c(classes):
    uniform = torch.full((7, classes), 1.0 / classes)
    assert V.mean_entropy(uniform) == pytest.approx(math.log(classes), rel=1e-6)  # float32 1/C
    assert V.entropy_score(uniform) == pytest.approx(-math.log(classes), rel=1e-6)
    one_hot = F.one_hot(torch.arange(7) % classes, classes).float()
    assert V.mean_entropy(one_hot) == 0.0


def test_im_is_zero_for_collapsed_predictions_and_log_c_for_confident_diverse_ones():
    for k in range(3):
        collapsed = F.one_hot(torch.full((12,), k), 3).float()
        assert V.im_score(collapsed) == 0.0
    assert V.im_score(torch.full((12, 3), 1 / 3)) == pytest.approx(0.0, abs=1e-12)
    assert V.im_score(F.one_hot(torch.arange(12) % 3, 3).float()) == pytest.approx(math.log(3))
    soft = F.softmax(torch.randn(12, 3, generator=torch.Generator().manual_seed(0)), dim=1)
    assert 0.0 <= V.im_score(soft) <= math.log(3)


def test_bnm_is_the_nuclear_norm_over_n():
    assert V.bnm_score(F.one_hot(torch.arange(8) % 4, 4).float()) == pytest.approx(math.sqrt(2) * 4 / 8)
    assert V.bnm_score(F.one_hot(torch.zeros(9, dtype=torch.long), 4).float()) == pytest.approx(3 / 9)
    assert V.bnm_score(torch.full((9, 4), 0.25)) == pytest.approx(1 / 6)  # 1 / sqrt(N C)


def test_snd_is_higher_on_clustered_than_on_scattered_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 5
    clustered = centres.repeat_interleave(25, dim=0) + 0.05 * torch.randn(100, 16, generator=g)
    scattered = torch.randn(100, 16, generator=g)
    assert V.snd_score(clustered) > V.snd_score(scattered) + 1.0
    # 4 exact clusters of 25: each sample's 24 cluster mates share its neighbourhood evenly
    assert V.snd_score(centres.repeat_interleave(25, dim=0)) == pytest.approx(math.log(24), rel=1e-4)


def test_snd_leaves_each_sample_out_of_its_own_neighbourhood_and_works_in_chunks():
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
    assert V.snd_score(x, chunk=7) == pytest.approx(V.snd_score(x, chunk=1024), rel=1e-12)
    assert V.snd_score(torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == 0.0  # one neighbour each: no uncertainty
    with pytest.raises(ValueError, match="at least 2"):
        V.snd_score(torch.ones(1, 3))


def test_ensv_ranks_the_candidate_that_cuts_through_a_cluster_last():
    x, _ = two_clusters()
    pool = [F.softmax(threshold_model(at)(x), dim=1) for at in (0.0, -0.5, 0.7, 1.2, 0.3)]
    pool.append(F.softmax(threshold_model(-3.0)(x), dim=1))  # through the middle of cluster 0
    scores = V.ensv_scores(pool)
    assert int(scores.argmin()) == len(pool) - 1
    assert scores[:-1].min() > scores[-1]
    assert torch.equal(scores[:-1], torch.ones(5, dtype=torch.float64))  # they all agree with the ensemble


def test_ensv_scores_a_diverged_candidate_nan_and_leaves_it_out_of_the_ensemble():
    good = F.softmax(torch.randn(100, 5, generator=torch.Generator().manual_seed(0)) * 5, dim=1)
    for bad in (math.nan, math.inf):
        diverged = torch.full((100, 5), bad)
        scores = V.ensv_scores([good, good.clone(), diverged])  # it scored 1.0: NaN averages arg-max to class 0
        assert scores[:2].tolist() == [1.0, 1.0] and math.isnan(scores[2])
    sharp, wrong = F.one_hot(good.argmax(dim=1), 5).float(), F.one_hot((good.argmax(dim=1) + 1) % 5, 5).float()
    one_nan = sharp.clone()
    one_nan[3, 1] = math.nan  # one non-finite prediction is enough
    scores = V.ensv_scores([sharp, one_nan, wrong, sharp])
    assert math.isnan(scores[1]) and scores[[0, 3]].tolist() == [1.0, 1.0] and scores[2] == 0.0
    # fewer than 2 finite candidates: no ensemble, every score NaN (no pick)
    assert V.ensv_scores([good, torch.full((100, 5), math.nan)]).isnan().all()
    assert V.ensv_scores([torch.full((100, 5), math.nan)] * 3).isnan().all()


def test_ensv_needs_a_pool_of_two_with_predictions_of_one_shape():
    with pytest.raises(ValueError, match="at least 2 candidates, got 1"):
        V.ensv_scores([torch.full((4, 2), 0.5)])
    with pytest.raises(ValueError, match="same samples"):
        V.ensv_scores([torch.full((4, 2), 0.5), torch.full((5, 2), 0.5)])


def test_mixval_scores_a_correct_separator_above_one_that_cuts_through_a_cluster():
    x, _ = two_clusters(spread=0.1)  # well separated: every mixture of the two lies on its dominant side

    def scores(at: float) -> V.MixValScores:
        model = threshold_model(at)
        return V.mixval_scores(model, x, model(x).argmax(dim=1), generator=torch.Generator().manual_seed(0))

    good, bad = scores(0.0), scores(-3.0)
    assert good.intra == 1.0 and good.inter == 1.0 and good.score == 1.0
    assert bad.inter < good.inter and bad.score < good.score
    assert good.intra_pairs > 0 and good.inter_pairs > 0


def test_mixval_pairs_intra_within_a_pseudo_label_and_inter_across_them():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 1])
    intra_a, intra_b, inter_a, inter_b = V.mixval_pairs(labels, torch.Generator().manual_seed(3))
    assert torch.equal(labels[intra_a], labels[intra_b]) and bool((intra_a != intra_b).all())
    assert bool((labels[inter_a] != labels[inter_b]).all())
    assert sorted(zip(intra_a.tolist(), intra_b.tolist())) == sorted(zip(intra_b.tolist(), intra_a.tolist()))


def test_dev_weights_the_source_samples_that_look_like_the_target():
    g = torch.Generator().manual_seed(0)
    source = torch.randn(200, 2, generator=g)
    target = torch.randn(200, 2, generator=g) + torch.tensor([1.5, 0.0])
    weights = V.importance_weights(source, target, torch.Generator().manual_seed(0))
    near = source[:, 0] > 1.0
    assert weights[near].mean() > 2 * weights[~near].mean()
    # a model that fails only where the target lies has a higher risk than one that fails elsewhere
    fails_near, fails_far = near.double(), (~near).double()
    risk_near, risk_far = V.dev_risk(weights, fails_near), V.dev_risk(weights, fails_far)
    assert risk_near > fails_near.mean() and risk_far < fails_far.mean()
    assert V.dev_score(source, fails_near, target, torch.Generator().manual_seed(0)) == pytest.approx(
        -risk_near, rel=1e-9
    )


def _reference_dev_risk(weights: torch.Tensor, losses: torch.Tensor) -> float:
    """The DEV risk as the authors' code computes it (thuml/Deep-Embedded-Validation, ``get_dev_risk``)."""
    w, loss = weights.double().numpy()[:, None], losses.double().numpy()[:, None]
    weighted = w * loss
    cov = np.cov(np.concatenate((weighted, w), axis=1), rowvar=False)[0][1]
    eta = -cov / np.var(w, ddof=1)
    return float(np.mean(weighted) + eta * np.mean(w) - eta)


def test_dev_risk_is_the_authors_formula_whatever_the_weights_scale():
    g = torch.Generator().manual_seed(0)
    weights, losses = torch.rand(50, generator=g, dtype=torch.float64) * 3, torch.rand(50, generator=g).double()
    assert V.dev_risk(weights, losses) == pytest.approx(_reference_dev_risk(weights, losses), rel=1e-12)
    # small weights (Var(w) ~ 1e-14): the control variate is kept (it was dropped below an absolute 1e-12)
    small = weights * 1e-7
    assert V.dev_risk(small, losses) == pytest.approx(_reference_dev_risk(small, losses), rel=1e-9)
    # weights constant up to float noise at a large scale: no control variate fitted to the noise
    flat = 1e4 + 1e-5 * (torch.arange(50) % 2).double()
    assert V.dev_risk(flat, losses) == pytest.approx(float((flat * losses).mean()), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_dev_weights_average_one_when_source_and_target_are_alike(seed):
    # each weight comes from a domain classifier that did not see its sample: fitted on the source
    # samples it weighs, it shrank them (mean 0.6 here: 30 samples in 64 dimensions)
    g = torch.Generator().manual_seed(seed)
    source, target = torch.randn(30, 64, generator=g), torch.randn(300, 64, generator=g)
    weights = V.importance_weights(source, target, torch.Generator().manual_seed(0))
    assert float(weights.mean()) == pytest.approx(1.0, abs=0.15)
    losses = (torch.rand(30, generator=g) < 0.3).double()
    # the same weights again (deterministic given the generator), in the authors' DEV risk
    assert V.dev_score(source, losses, target, torch.Generator().manual_seed(0)) == pytest.approx(
        -_reference_dev_risk(weights, losses), rel=1e-9
    )


def test_dev_weights_are_truncated_at_the_square_root_of_the_source_size():
    # 1-d Gaussians 3 apart: the true ratio exp(3x - 4.5) reaches ~300 on the source's right tail,
    # and one weight was most of the estimate (91.6 of a total of 122)
    g = torch.Generator().manual_seed(0)
    source, target = torch.randn(100, 1, generator=g), torch.randn(100, 1, generator=g) + 3
    weights = V.importance_weights(source, target, torch.Generator().manual_seed(0))
    assert float(weights.max()) == 10.0  # sqrt(100)
    assert int(weights.argmax()) == int(source[:, 0].argmax())  # the most target-like sample
    assert bool((weights >= 0).all())


def test_source_accuracy_counts_the_arg_max():
    assert V.accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]]), torch.tensor([0, 1, 1])) == 2 / 3


# ----------------------------------------------------------------------------- degenerate predictions
@pytest.mark.parametrize("kind", ["one class", "uniform"])
def test_every_validator_is_finite_on_degenerate_predictions(kind):
    n, c = 30, 5
    probs = F.one_hot(torch.zeros(n, dtype=torch.long), c).float() if kind == "one class" else torch.full((n, c), 1 / c)
    logits = torch.log(probs.clamp_min(1e-12))
    inputs = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))

    def constant(x: torch.Tensor) -> torch.Tensor:
        return logits[:1].expand(x.shape[0], c)

    scores = {
        "entropy": V.entropy_score(probs),
        "im": V.im_score(probs),
        "bnm": V.bnm_score(probs),
        "snd": V.snd_score(probs),
        "mixval": V.mixval_scores(constant, inputs, probs.argmax(dim=1)).score,
        "dev": V.dev_score(
            torch.ones(n, 4),
            F.cross_entropy(logits, torch.zeros(n, dtype=torch.long), reduction="none"),
            torch.ones(n, 4),
        ),
        "source_val": V.accuracy(probs, torch.zeros(n, dtype=torch.long)),
    }
    scores |= {f"ensv{i}": float(s) for i, s in enumerate(V.ensv_scores([probs, probs, probs]))}
    assert set(V.VALIDATORS) <= set(scores)
    for name, value in scores.items():
        assert math.isfinite(value), (kind, name, value)
    if kind == "one class":
        assert scores["im"] == 0.0 and scores["entropy"] == 0.0
        assert scores["mixval"] == 0.5  # intra-cluster mixtures verified, no inter-cluster pair to verify


def test_snd_and_entropy_reward_predictions_collapsed_onto_one_class_as_in_their_papers():
    # one class everywhere is wrong on every other class, yet SND reaches its maximum, log(N - 1)
    # (each sample's N - 1 neighbours are all equally close), and entropy its best, 0
    n, c = 40, 4
    collapsed = F.one_hot(torch.zeros(n, dtype=torch.long), c).float()
    separated = F.one_hot(torch.arange(n) % c, c).float()  # confident and diverse
    softer = F.softmax(4 * torch.randn(n, c, generator=torch.Generator().manual_seed(0)), dim=1)
    assert V.snd_score(collapsed) == pytest.approx(math.log(n - 1))
    assert V.snd_score(collapsed) > V.snd_score(separated) and V.snd_score(collapsed) > V.snd_score(softer)
    assert V.entropy_score(collapsed) == 0.0 == V.entropy_score(separated) > V.entropy_score(softer)
    assert V.im_score(collapsed) == 0.0 < V.im_score(separated)  # IM's diversity term does not


def test_non_finite_predictions_give_no_score_rather_than_an_error():
    nan = torch.full((4, 3), math.nan)
    assert math.isnan(V.bnm_score(nan)) and math.isnan(V.entropy_score(nan)) and math.isnan(V.snd_score(nan))


# ----------------------------------------------------------------------------- the source validation split
def test_the_source_validation_split_is_stratified_disjoint_and_fixed():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 3 + [3] * 2)
    train, val = stratified_hold_out(labels, 0.1, "s")
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    assert torch.bincount(labels[val], minlength=4).tolist() == [5, 3, 1, 1]  # at least one of each class
    assert torch.bincount(labels[train], minlength=4).tolist() == [45, 27, 2, 1]  # and one left to train on
    again_train, again_val = stratified_hold_out(labels, 0.1, "s")
    assert torch.equal(train, again_train) and torch.equal(val, again_val)


def test_a_source_split_too_small_to_hold_out_from_is_refused():
    with pytest.raises(ConfigError, match=r"too small to hold out.*class 1: 1.*at least 2"):
        stratified_hold_out(torch.tensor([0, 0, 0, 1]), 0.1, "'usps'")
