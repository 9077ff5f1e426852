"""K losses: ``Harmonizer.backward(losses=..., trade_offs=..., pairs=...)`` and ``harmonize_gramian``.

The references here are written independently of the library's weight functions: GH over K losses
is run on the flat gradient vectors themselves (the projections of the docstring, in numpy) and its
weights read off the result by least squares; a pair is checked against two separate two-loss
harmonizers (the form GVB-GD used before K losses) and against ``gh_reference``.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from gh_reference import gh_weights, ghpp_weights
from gradharmony import GradientReversal, Harmonizer, LossesStats, StepStats, harmonize, harmonize_gramian
from gradharmony.harmonize import MODES
from gradharmony.uda.methods import Batch, StepContext, build_method
from traversals import CountBackward


class FourLosses(nn.Module):
    """A shared backbone and bottleneck under four losses, like GVB-GD's: classification, a reversed
    domain loss, a bridge penalty and the target entropy."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(10, 12)
        self.backbone_rest = nn.Sequential(nn.Tanh(), nn.Linear(12, 12), nn.Tanh())
        self.bottleneck = nn.Sequential(nn.Linear(12, 8), nn.Tanh())
        self.classifier, self.bridge = nn.Linear(8, 3), nn.Linear(8, 3)
        self.grl = GradientReversal(max_steps=100)
        self.discriminator = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
        self.grl.set_step(40)
        self.double()

    def losses(self, xs, ys, xt, count=False):
        """``{cls, align, bridge, entropy}``, the backbone output ``h`` (a cut below the bottleneck)."""
        h0 = self.first(torch.cat([xs, xt]))
        if count:  # every gradient of the first layer passes here: one count per backbone traversal
            h0 = CountBackward.apply(h0)
        h = self.backbone_rest(h0)
        f = self.bottleneck(h)
        logits = self.classifier(f) - self.bridge(f)
        domain = torch.cat([torch.ones(len(xs)), torch.zeros(len(xt))]).double()
        p_t = logits[len(xs) :].softmax(dim=1)
        losses = {
            "cls": F.cross_entropy(logits[: len(xs)], ys),
            "align": F.binary_cross_entropy_with_logits(self.discriminator(self.grl(f)).squeeze(1), domain),
            "bridge": self.bridge(f).abs().mean(),
            "entropy": -(p_t * p_t.log()).sum(dim=1).mean(),
        }
        return losses, h

    def scope(self):
        return [self.first, self.backbone_rest, self.bottleneck]


def make(seed):
    torch.manual_seed(seed)
    model = FourLosses()
    g = torch.Generator().manual_seed(seed + 1000)
    xs = torch.randn(8, 10, dtype=torch.float64, generator=g)
    xt = torch.randn(8, 10, dtype=torch.float64, generator=g) + 0.5
    return model, (xs, torch.arange(8) % 3, xt)


def params_of(modules):
    return [p for m in modules for p in m.parameters()]


# ---- the reference ------------------------------------------------------------------------------
def gh_projected_by_hand(vectors: list[np.ndarray]) -> np.ndarray:
    """The documented order, on the vectors: for each i, g_i' = g_i; for each j != i in turn, if
    <g_i', g_j> < 0, g_i' -= <g_i', g_j> / |g_j|^2 g_j.  Returns sum_i g_i'."""
    total = np.zeros_like(vectors[0])
    for i, g_i in enumerate(vectors):
        projected = g_i.copy()
        for j, g_j in enumerate(vectors):
            if j != i and projected @ g_j < 0:
                projected = projected - (projected @ g_j) / (g_j @ g_j) * g_j
        total += projected
    return total


def weights_by_hand(vectors: list[np.ndarray]) -> np.ndarray:
    """The w with sum_j w_j g_j = the hand-projected update (least squares; the g_j are independent)."""
    basis = np.stack(vectors, axis=1)
    update = gh_projected_by_hand(vectors)
    w, *_ = np.linalg.lstsq(basis, update, rcond=None)
    assert np.allclose(basis @ w, update, rtol=0, atol=1e-10 * np.linalg.norm(update))
    return w


def per_loss_gradients(model, batch, names):
    """{loss: {parameter name: gradient}} for every parameter, on a copy (zeros where unreached)."""
    model = copy.deepcopy(model)
    losses, _ = model.losses(*batch)
    named = list(model.named_parameters())
    out = {}
    for loss_name in names:
        grads = torch.autograd.grad(losses[loss_name], [p for _, p in named], retain_graph=True, allow_unused=True)
        out[loss_name] = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}
    return out


def flat(grads: dict[str, torch.Tensor], names: list[str]) -> np.ndarray:
    return torch.cat([grads[n].reshape(-1) for n in names]).numpy()


def scope_names(model, modules):
    ids = {id(p) for m in modules for p in m.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def conflicting_pairs(model, batch, modules) -> set[tuple[str, str]]:
    g = per_loss_gradients(model, batch, ["cls", "align", "bridge", "entropy"])
    names = scope_names(model, modules)
    vectors = {k: flat(g[k], names) for k in g}
    return {(a, b) for a in vectors for b in vectors if a < b and vectors[a] @ vectors[b] < 0}


def find_seed():
    """A seed where (align, cls) and (bridge, entropy) conflict over the full scope, and at least
    three pairs over the bottleneck (found with the reference, not the library)."""
    for seed in range(200):
        model, batch = make(seed)
        full = conflicting_pairs(model, batch, model.scope())
        pairs_conflict = {("align", "cls"), ("bridge", "entropy")} <= full and len(full) >= 3
        if pairs_conflict and len(conflicting_pairs(model, batch, [model.bottleneck])) >= 3:
            return seed
    raise AssertionError("no seed with enough conflicts")


SEED = find_seed()
NAMES = ["cls", "align", "bridge", "entropy"]
TRADE_OFFS = {"align": 0.7, "bridge": 0.3}
# strategy, scope, whether the backbone output is passed as a cut, backbone traversals for K losses
SETUPS = {
    "recombine": ("recombine", "full", False, len(NAMES)),
    "reweight": ("reweight", "full", False, len(NAMES) + 1),
    "recombine-cut": ("recombine", "bottleneck", True, 1),
}


def expected_grads(per_loss, weights, trade_offs):
    """Every parameter: the gradient of sum_i t_i w_i L_i."""
    names = next(iter(per_loss.values())).keys()
    return {
        n: sum(trade_offs.get(k, 1.0) * w * per_loss[k][n] for k, w in zip(per_loss, weights, strict=True))
        for n in names
    }


def assert_grads(model, expected, atol=1e-12):
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], atol=atol, rtol=1e-9), name


# ---- GH over K losses ---------------------------------------------------------------------------
@pytest.mark.parametrize("setup", list(SETUPS))
def test_gh_over_k_losses_equals_the_hand_computed_projections(setup):
    strategy, scope, cut, traversals = SETUPS[setup]
    model, batch = make(SEED)
    modules = model.scope() if scope == "full" else [model.bottleneck]
    per_loss = per_loss_gradients(model, batch, NAMES)
    names = scope_names(model, modules)
    hand = weights_by_hand([flat(per_loss[k], names) for k in NAMES])
    assert not np.allclose(hand, 1.0, atol=1e-3)  # the projections really act

    losses, h = model.losses(*batch, count=True)
    CountBackward.calls = 0
    stats = Harmonizer(mode="gh", scope=modules, strategy=strategy).backward(
        losses=losses, trade_offs=TRADE_OFFS, features=h if cut else None
    )
    assert CountBackward.calls == traversals
    assert isinstance(stats, LossesStats) and stats.measured and stats.conflict and stats.pairs == ()
    assert [stats.weights[k] for k in NAMES] == pytest.approx(list(hand), rel=1e-9)
    assert stats.coefficient("align") == pytest.approx(0.7 * hand[1], rel=1e-9)
    assert_grads(model, expected_grads(per_loss, hand, TRADE_OFFS))


def test_recombine_and_reweight_give_the_same_grad_for_k_losses():
    model, batch = make(SEED)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    for m, strategy in ((a, "reweight"), (b, "recombine")):
        losses, _ = m.losses(*batch)
        Harmonizer(mode="gh", scope=m.scope(), strategy=strategy).backward(losses=losses, trade_offs=TRADE_OFFS)
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys() == {n for n, _ in model.named_parameters()}
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-12, rtol=1e-10), name


def test_the_order_of_the_losses_is_the_order_of_the_projections():
    model, batch = make(SEED)
    per_loss = per_loss_gradients(model, batch, NAMES)
    names = scope_names(model, model.scope())
    reordered = ["entropy", "bridge", "align", "cls"]
    hand = weights_by_hand([flat(per_loss[k], names) for k in reordered])
    losses, _ = model.losses(*batch)
    stats = Harmonizer(mode="gh", scope=model.scope()).backward(losses={k: losses[k] for k in reordered})
    assert [stats.weights[k] for k in reordered] == pytest.approx(list(hand), rel=1e-9)
    forward = weights_by_hand([flat(per_loss[k], names) for k in NAMES])
    assert not np.allclose([forward[NAMES.index(k)] for k in reordered], hand, rtol=1e-6)  # order matters


@pytest.mark.parametrize("mode, lead", [("none", "align"), ("gh", "align"), ("gh++", "cls"), ("gh++exact", "align")])
@pytest.mark.parametrize("strategy", ["recombine", "reweight", "features"])
def test_two_named_losses_are_the_two_loss_call_bit_for_bit(mode, lead, strategy):
    model, batch = make(SEED)
    named, keyword = copy.deepcopy(model), copy.deepcopy(model)
    harmonizers = [Harmonizer(mode=mode, scope=model.scope(), strategy=strategy, lead=lead, k=0.3) for _ in "ab"]
    losses, h = named.losses(*batch)
    stats = harmonizers[0].backward(
        losses={"cls": losses["cls"], "align": losses["align"]}, trade_offs={"align": 0.7}, features=h
    )
    losses, h = keyword.losses(*batch)
    two = harmonizers[1].backward(cls=losses["cls"], align=losses["align"], trade_off=0.7, features=h)
    assert isinstance(two, StepStats) and stats.pairs == (two,) and stats.first_pair == two
    assert (stats.weights["align"], stats.weights["cls"]) == (two.w_align, two.w_cls)
    for (name, p), q in zip(named.named_parameters(), keyword.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert harmonizers[0].summary() == harmonizers[1].summary()
    assert stats.names == ("align", "cls")  # probed and summed in the slots' order, whatever the dict's


# ---- pairs --------------------------------------------------------------------------------------
PAIRS = [("cls", "align"), ("bridge", "entropy")]


def two_harmonizers_by_hand(model, batch, mode, lead, strategy, trade_offs=TRADE_OFFS):
    """GVB-GD's form before K losses: one two-loss harmonizer per pair, their gradients added in ``.grad``."""
    losses, _ = model.losses(*batch)
    first, second = (Harmonizer(mode=mode, scope=model.scope(), strategy=strategy, lead=lead, k=0.3) for _ in "ab")
    one = first.backward(cls=losses["cls"], align=losses["align"], trade_off=trade_offs["align"], retain_graph=True)
    two = second.backward(cls=losses["entropy"], align=losses["bridge"], trade_off=trade_offs["bridge"])
    return one, two


@pytest.mark.parametrize("mode, lead", [("gh", "align"), ("gh++", "align"), ("gh++", "cls"), ("gh++exact", "cls")])
@pytest.mark.parametrize("strategy", ["recombine", "reweight"])
def test_pairs_equal_one_two_loss_harmonizer_per_pair(mode, lead, strategy):
    model, batch = make(SEED)
    reference = copy.deepcopy(model)
    one, two = two_harmonizers_by_hand(reference, batch, mode, lead, strategy)
    losses, _ = model.losses(*batch)
    stats = Harmonizer(mode=mode, scope=model.scope(), strategy=strategy, lead=lead, k=0.3).backward(
        losses=losses, trade_offs=TRADE_OFFS, pairs=PAIRS
    )
    assert stats.pairs == (one, two) and one.conflict and two.conflict
    assert [stats.weights[k] for k in ("align", "cls", "bridge", "entropy")] == [
        one.w_align,
        one.w_cls,
        two.w_align,
        two.w_cls,
    ]
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if strategy == "recombine":  # the same operations in the same order
            assert torch.equal(p.grad, q.grad), name
        else:  # one weighted backward of the four losses instead of two of two
            assert torch.allclose(p.grad, q.grad, atol=1e-14, rtol=1e-12), name


@pytest.mark.parametrize("mode", ["gh", "gh++"])
def test_a_pair_and_unpaired_losses_equal_the_hand_computed_reference(mode):
    model, batch = make(SEED)
    per_loss = per_loss_gradients(model, batch, NAMES)
    names = scope_names(model, model.scope())
    g_align, g_cls = (torch.from_numpy(flat(per_loss[k], names)) for k in ("align", "cls"))
    if mode == "gh":
        w_align, w_cls = gh_weights(g_align, g_cls)
    else:
        angle = math.degrees(math.acos(float(g_align @ g_cls) / float(g_align.norm() * g_cls.norm())))
        w_align, w_cls = ghpp_weights(angle, 0.3, "align")
    hand = [w_cls, w_align, 1.0, 1.0]  # bridge and entropy are in no pair
    losses, _ = model.losses(*batch, count=True)
    CountBackward.calls = 0
    stats = Harmonizer(mode=mode, scope=model.scope(), k=0.3).backward(
        losses=losses, trade_offs=TRADE_OFFS, pairs=[("cls", "align")]
    )
    assert CountBackward.calls == len(NAMES)  # one probe per loss
    assert [stats.weights[k] for k in NAMES] == pytest.approx(hand, rel=1e-9) and w_align != pytest.approx(1.0)
    assert stats.coefficient("bridge") == TRADE_OFFS["bridge"] and stats.coefficient("entropy") == 1.0
    assert_grads(model, expected_grads(per_loss, hand, TRADE_OFFS))


def test_in_a_pair_align_and_cls_keep_their_slots_and_lead_names_the_slot():
    model, batch = make(SEED)
    losses, _ = model.losses(*batch)
    stats = Harmonizer(mode="gh++", scope=model.scope(), lead="cls").backward(
        losses=losses, pairs=[("cls", "align"), ("entropy", "bridge")]
    )
    first, second = stats.pairs
    assert (first.w_align, first.w_cls) == (stats.weights["align"], stats.weights["cls"])
    assert (second.w_align, second.w_cls) == (stats.weights["entropy"], stats.weights["bridge"])  # first of the pair
    assert stats.names == ("align", "cls", "entropy", "bridge")
    assert first.norm_align == math.sqrt(stats.gramian[0][0]) and second.norm_cls == math.sqrt(stats.gramian[3][3])
    assert first.w_cls > 1.0 > first.w_align  # lead="cls": the loss named cls leads
    # the summary follows the first pair
    assert stats.first_pair is first


# ---- refresh, state, summary -------------------------------------------------------------------
def test_refresh_every_reuses_every_pairs_weights_and_the_state_round_trips():
    model, batch = make(SEED)
    h = Harmonizer(mode="gh", scope=model.scope(), refresh_every=2)
    calls = []
    for _ in range(3):
        losses, _ = model.losses(*batch, count=True)
        CountBackward.calls = 0
        calls.append((h.backward(losses=losses, trade_offs=TRADE_OFFS, pairs=PAIRS), CountBackward.calls))
    (first, n0), (reused, n1), (third, n2) = calls
    assert (n0, n1, n2) == (4, 1, 4)  # a reused step is one weighted backward
    assert not reused.measured and reused.guards == ("reused",) and all(s.guards == ("reused",) for s in reused.pairs)
    assert reused.weights == first.weights == third.weights  # same batch, same weights
    state = h.state_dict()
    assert set(state["cached"]) == {"align|cls", "bridge|entropy"}
    clone = Harmonizer(mode="gh", scope=model.scope(), refresh_every=2)
    clone.load_state_dict(state)
    assert clone.summary() == h.summary() and clone.calls == 3 and clone.last == h.last
    losses, _ = model.losses(*batch)
    assert clone.backward(losses=losses, trade_offs=TRADE_OFFS, pairs=PAIRS).weights == first.weights
    assert h.summary()["steps"] == 3 and h.summary()["measured_steps"] == 2  # of the first pair


def test_gh_over_all_losses_caches_and_reuses_its_weights():
    model, batch = make(SEED)
    h = Harmonizer(mode="gh", scope=model.scope(), refresh_every=2)
    losses, _ = model.losses(*batch)
    measured = h.backward(losses=losses)
    losses, _ = model.losses(*batch)
    reused = h.backward(losses=losses)
    assert not reused.measured and reused.weights == measured.weights
    clone = Harmonizer(mode="gh", scope=model.scope(), refresh_every=2)
    clone.load_state_dict(h.state_dict())
    assert set(h.state_dict()["cached"]) == {"cls|align|bridge|entropy"} and clone.calls == 2


def test_a_state_written_before_k_losses_still_loads():
    model, batch = make(SEED)
    h = Harmonizer(mode="gh++", scope=model.scope(), refresh_every=2)
    losses, _ = model.losses(*batch)
    h.backward(cls=losses["cls"], align=losses["align"])
    old = {"calls": 1, "last": h.state_dict()["cached"]["align|cls"], "running": h.state_dict()["running"]}
    clone = Harmonizer(mode="gh++", scope=model.scope(), refresh_every=2)
    clone.load_state_dict(old)
    assert clone.last == h.last and clone.summary() == h.summary()


def test_summary_of_gh_over_all_follows_the_first_two_losses():
    model, batch = make(SEED)
    h = Harmonizer(mode="gh", scope=model.scope())
    losses, _ = model.losses(*batch)
    stats = h.backward(losses=losses)
    view = stats.first_pair
    assert (view.w_align, view.w_cls) == (stats.weights["align"], stats.weights["cls"])
    assert view.angle == pytest.approx(stats.angle("align", "cls"), rel=1e-12)
    assert h.summary()["mean_w_align"] == stats.weights["align"] and h.summary()["steps"] == 1
    json.dumps(stats.as_dict())  # plain values


# ---- errors -------------------------------------------------------------------------------------
def scalar():
    return torch.ones((), requires_grad=True) * 2


@pytest.mark.parametrize(
    "call, match",
    [
        (dict(losses={}), "non-empty"),
        (dict(losses={"cls": scalar()}), "at least two"),
        (dict(losses={"cls": scalar(), "align": torch.ones(3, requires_grad=True)}), "'align' must be a scalar"),
        (dict(losses={"cls": scalar(), "align": 1.0}), "must be a tensor"),
        (dict(losses={"cls": scalar(), "align": scalar()}, trade_offs={"bridge": 1.0}), r"unknown losses \['bridge'\]"),
        (dict(losses={"cls": scalar(), "align": scalar()}, pairs=[("cls", "alig")]), r"unknown losses \['alig'\]"),
        (dict(losses={"a": scalar(), "b": scalar(), "c": scalar()}, pairs=[("a", "b"), ("b", "c")]), "one pair only"),
        (dict(losses={"a": scalar(), "b": scalar()}, pairs=[("a", "a")]), "two different"),
        (dict(losses={"a": scalar(), "b": scalar()}, pairs=[]), "pairs is empty"),
        (dict(losses={"a": scalar(), "b": scalar()}, cls=scalar()), "not both"),
        (dict(cls=scalar(), align=scalar(), pairs=[("cls", "align")]), "go with losses"),
        (dict(cls=scalar()), "needs cls= and align="),
    ],
)
def test_bad_losses_are_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Harmonizer(mode="gh").backward(**call)


@pytest.mark.parametrize("mode", ["gh++", "gh++exact"])
def test_ghpp_over_more_than_two_losses_needs_pairs(mode):
    losses = {"a": scalar(), "b": scalar(), "c": scalar()}
    with pytest.raises(ValueError, match=r"defined for two losses.*pairs="):
        Harmonizer(mode=mode).backward(losses=losses)
    with pytest.raises(ValueError, match="pairs="):
        harmonize_gramian(np.eye(3).tolist(), mode=mode)


# ---- the pure maths -----------------------------------------------------------------------------
finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)
vector_sets = st.tuples(st.integers(2, 5), st.integers(3, 7)).flatmap(
    lambda kn: st.lists(st.lists(finite, min_size=kn[1], max_size=kn[1]), min_size=kn[0], max_size=kn[0])
)


@settings(max_examples=300, deadline=None)
@given(vector_sets)
def test_harmonize_gramian_is_the_projections_by_hand(rows):
    vectors = [np.array(r, dtype=np.float64) for r in rows]
    norms = [np.linalg.norm(v) for v in vectors]
    assume(min(norms) > 1e-3 and max(norms) / min(norms) < 1e4)
    result = harmonize_gramian([[float(a @ b) for b in vectors] for a in vectors], mode="gh")
    update = sum(w * v for w, v in zip(result.weights, vectors))
    scale = sum(norms)
    assert np.allclose(update, gh_projected_by_hand(vectors), rtol=0, atol=1e-9 * scale)
    no_conflict = all(a @ b >= 0 for i, a in enumerate(vectors) for b in vectors[i + 1 :])
    assert result.conflict != no_conflict
    if no_conflict:
        assert result.weights == (1.0,) * len(vectors)


@settings(max_examples=500, deadline=None)
@given(
    st.floats(min_value=-40, max_value=10),
    st.floats(min_value=-40, max_value=10),
    st.floats(min_value=-1.0, max_value=1.0),
    st.sampled_from([None, 2.0, 50.0]),
)
def test_two_losses_reduce_to_gh_bit_for_bit(log_aa, log_cc, cos, max_weight):
    aa, cc = 10.0**log_aa, 10.0**log_cc
    d = cos * math.sqrt(aa * cc)
    two = harmonize(aa, cc, d, mode="gh", max_weight=max_weight)
    k = harmonize_gramian([[aa, d], [d, cc]], mode="gh", max_weight=max_weight)
    assert k.weights == (two.w_align, two.w_cls) and k.conflict == two.conflict
    assert k.guards == tuple(g for g in two.guards if g != "cos_clamped")


def test_guards_of_the_k_rule():
    nan = harmonize_gramian([[1.0, math.nan, 0.0], [math.nan, 1.0, 0.0], [0.0, 0.0, 1.0]], mode="gh")
    assert nan.weights == (1.0, 1.0, 1.0) and nan.guards == ("nonfinite",) and not nan.conflict
    tiny = harmonize_gramian([[1.0, -0.5, -1e-20], [-0.5, 1.0, 0.0], [-1e-20, 0.0, 1e-36]], mode="gh")
    assert tiny.guards == ("tiny_norm",) and tiny.weights == (1.5, 1.5, 1.0)  # the tiny loss is left out
    capped = harmonize_gramian([[1.0, -0.99, 0.0], [-0.99, 1.0, 0.0], [0.0, 0.0, 1.0]], mode="gh", max_weight=1.5)
    assert capped.guards == ("clipped",) and capped.weights == (1.5, 1.5, 1.0)
    for mode in ("none", "gh"):  # no conflict: weights 1 (a tensor Gramian works too)
        assert harmonize_gramian(torch.eye(3, dtype=torch.float64), mode=mode).weights == (1.0, 1.0, 1.0)
    for mode in MODES:
        assert harmonize_gramian([[1.0, 0.5], [0.5, 1.0]], mode=mode).weights == (1.0, 1.0)


# ---- GVB-GD: both pairs in one call, as the two harmonizers did ---------------------------------
class Tiny(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(12, 16), nn.ReLU())
        self.out_features = 16


def gvb_and_batch():
    torch.manual_seed(0)
    method = build_method("gvb", Tiny(), 3, 100, bottleneck_dim=8, disc_hidden=8, disc_dropout=0.0, gvbd_weight=0.8)
    g = torch.Generator().manual_seed(0)  # both pairs conflict on this batch
    x_s, x_t = torch.randn(6, 12, generator=g), torch.randn(6, 12, generator=g) + 0.5
    return method, Batch(x_s, torch.arange(6) % 3, x_t)


def gvb_with_two_harmonizers(method, batch, step, harmonizer, trade_off, optimizer):
    """GVB-GD's update as written before K losses: pair 1 through the engine's harmonizer, pair 2
    (``bridge_g`` in the align slot, ``mu * bridge_d`` in the cls slot) through a second one."""
    optimizer.zero_grad(set_to_none=True)
    t = method._terms(batch.source, batch.source_labels, batch.target, step)
    second = Harmonizer(mode=harmonizer.mode, scope=harmonizer.scope, k=harmonizer.k, lead=harmonizer.lead)
    one = harmonizer.backward(cls=t.cls, align=t.align, trade_off=trade_off, features=t.features, retain_graph=True)
    two = second.backward(
        cls=method.gvbd_weight * t.extra["bridge_d"],
        align=t.extra["bridge_g"],
        trade_off=method.gvbg_weight,
        features=t.features,
    )
    optimizer.step()
    return one, two


@pytest.mark.parametrize("mode, lead", [("gh", "align"), ("gh++", "align"), ("gh++", "cls")])
def test_gvb_update_is_the_two_harmonizer_update_bit_for_bit(mode, lead):
    method, batch = gvb_and_batch()
    reference = copy.deepcopy(method)
    harmonizer = Harmonizer(mode=mode, scope=method.scope_modules(), lead=lead, k=0.3)
    optimizers = {"all": torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)}
    torch.manual_seed(7)  # any dropout draws the same masks in both
    result = method.update(batch, StepContext(3000, optimizers, harmonizer, 0.7))
    torch.manual_seed(7)
    one, two = gvb_with_two_harmonizers(
        reference,
        batch,
        3000,
        Harmonizer(mode=mode, scope=reference.scope_modules(), lead=lead, k=0.3),
        0.7,
        torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9),
    )
    assert one.conflict and two.conflict  # both pairs really harmonized
    assert result.stats == one and harmonizer.calls == 1
    bridge = (result.logs["bridge_w_align"], result.logs["bridge_w_cls"], result.logs["bridge_angle"])
    assert bridge == (two.w_align, two.w_cls, two.angle)
    for (name, p), q in zip(method.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


def test_gh_over_k_losses_is_torchjds_pcgrad_in_the_fixed_order():
    """torchjd's PCGrad (its own code) with its random permutations replaced by the identity."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    g = torch.Generator().manual_seed(0)
    acted = 0
    with mock.patch.object(torch, "randperm", lambda n, **_: torch.arange(n)):
        for k in (3, 4, 5) * 40:
            vectors = torch.randn(k, 6, generator=g, dtype=torch.float64) * torch.rand(
                k, 1, generator=g, dtype=torch.float64
            )
            gram = vectors @ vectors.T
            theirs = aggregation.PCGradWeighting()(gram).tolist()
            ours = harmonize_gramian(gram, mode="gh").weights
            assert ours == pytest.approx(theirs, rel=1e-10, abs=1e-12)
            acted += ours != (1.0,) * k
    assert acted > 100


def test_the_readme_example_runs(capsys):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    match = re.search(r"<!-- more than two losses example, tested -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its marked example for more than two losses"
    exec(compile(match.group(1), "README.md", "exec"), {})
    first, second = capsys.readouterr().out.splitlines()
    assert first.endswith("True") and second.startswith("[(135, ")


def test_gvb_resumes_exactly_from_the_harmonizers_state():
    """Both pairs' cached weights (refresh_every=2) travel in the harmonizer's state, not the model's."""

    def train(method, harmonizer, optimizer, steps):
        for step in steps:
            g = torch.Generator().manual_seed(step)
            batch = Batch(torch.randn(6, 12, generator=g), torch.arange(6) % 3, torch.randn(6, 12, generator=g))
            result = method.update(batch, StepContext(3000 + step, {"all": optimizer}, harmonizer, 0.7))
            assert result.stats.measured == (step % 2 == 0) and "bridge_w_align" in result.logs

    def fresh():
        method, _ = gvb_and_batch()
        harmonizer = Harmonizer(mode="gh++", scope=method.scope_modules(), refresh_every=2)
        return method, harmonizer, torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)

    straight = fresh()
    train(*straight, range(3))
    first = fresh()
    train(*first, range(1))
    resumed = fresh()
    for part, saved in zip(resumed, first):
        part.load_state_dict(copy.deepcopy(saved.state_dict()))
    train(*resumed, range(1, 3))
    for (name, p), q in zip(resumed[0].named_parameters(), straight[0].parameters()):
        assert torch.equal(p, q), name
