"""The Harmonizer plug-in: strategies agree, passes are counted, guards fire, AMP and resume work."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gradharmony import GradientReversal, Harmonizer, harmonize_weights
from gradharmony.harmonize import MODES, gramian


class CountBackward(torch.autograd.Function):
    """Identity that counts how often the backward pass traverses it."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        CountBackward.calls += 1
        return grad


class TinyDANN(nn.Module):
    """Backbone -> bottleneck -> classifier, and a discriminator behind a reversal layer."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU())
        self.bottleneck = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.classifier = nn.Linear(8, 3)
        self.grl = GradientReversal(max_steps=100)
        self.discriminator = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
        self.to(dtype)

    def losses(self, xs, ys, xt, count=False):
        return self.forward_all(xs, ys, xt, count)[:3]

    def forward_all(self, xs, ys, xt, count=False):
        """cls, align, bottleneck output f, backbone output h, first-layer activation h0."""
        h0 = self.backbone[0](torch.cat([xs, xt]))
        if count:  # every gradient of the first layer's weights passes through here
            h0 = CountBackward.apply(h0)
        h = self.backbone[1:](h0)
        f = self.bottleneck(h)
        cls = nn.functional.cross_entropy(self.classifier(f[: len(xs)]), ys)
        domain = torch.cat([torch.ones(len(xs)), torch.zeros(len(xt))]).to(f.dtype)
        align = nn.functional.binary_cross_entropy_with_logits(self.discriminator(self.grl(f)).squeeze(1), domain)
        return cls, align, f, h, h0

    def scope(self):
        return [self.backbone, self.bottleneck, self.classifier]


def make(dtype=torch.float32, seed=0, step=30):
    torch.manual_seed(seed)
    model = TinyDANN(dtype)
    model.grl.set_step(step)
    xs, xt = torch.randn(6, 1, 8, 8, dtype=dtype), torch.randn(6, 1, 8, 8, dtype=dtype) + 0.5
    ys = torch.randint(0, 3, (6,))
    return model, (xs, ys, xt)


def find_conflicting_seed(mode="gh", lo=0, hi=200):
    """A seed whose first step is a conflict, so harmonization really acts in the test."""
    for seed in range(lo, hi):
        model, batch = make(torch.float64, seed)
        cls, align, _ = model.losses(*batch)
        stats = Harmonizer(mode=mode, scope=model.scope()).backward(cls=cls, align=align)
        if stats.conflict:
            return seed
    raise AssertionError("no conflicting seed found")


CONFLICT_SEED = find_conflicting_seed()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def manual_update(model, batch, mode, k=0.5, lead="align", trade_off=1.0):
    """The harmonized gradient recomputed by hand on a deep copy (pytorch-adapt style)."""
    model = copy.deepcopy(model)
    cls, align, _ = model.losses(*batch)
    params = [p for _, p in model.named_parameters()]
    scope_ids = {id(p) for m in model.scope() for p in m.parameters()}
    ga = torch.autograd.grad(align, params, retain_graph=True, allow_unused=True)
    gc = torch.autograd.grad(cls, params, allow_unused=True)
    ga = [torch.zeros_like(p) if g is None else g for p, g in zip(params, ga)]
    gc = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gc)]
    flat_a = torch.cat([g.reshape(-1) for p, g in zip(params, ga) if id(p) in scope_ids])
    flat_c = torch.cat([g.reshape(-1) for p, g in zip(params, gc) if id(p) in scope_ids])
    w_a, w_c = harmonize_weights(*gramian(flat_a, flat_c), mode=mode, k=k, lead=lead)
    names = [n for n, _ in model.named_parameters()]
    return {n: trade_off * w_a * a + w_c * c for n, a, c in zip(names, ga, gc)}, (w_a, w_c)


def run(model, batch, **kwargs):
    trade_off = kwargs.pop("trade_off", 1.0)
    cls, align, f = model.losses(*batch)
    h = Harmonizer(scope=model.scope(), **kwargs)
    return h.backward(cls=cls, align=align, trade_off=trade_off, features=f)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lead", ["align", "cls"])
def test_recombine_and_reweight_give_the_same_grad_everywhere(mode, lead):
    model, batch = make(torch.float64, CONFLICT_SEED)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    sa = run(a, batch, mode=mode, lead=lead, strategy="reweight", trade_off=0.7)
    sb = run(b, batch, mode=mode, lead=lead, strategy="recombine", trade_off=0.7)
    assert sa.conflict and sb.conflict
    assert (sa.w_align, sa.w_cls) == pytest.approx((sb.w_align, sb.w_cls), rel=1e-12)
    ga, gb = grads(a), grads(b)
    assert ga.keys() == gb.keys() == {n for n, _ in model.named_parameters()}
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-6, rtol=0), name


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strategy", ["reweight", "recombine"])
def test_update_equals_the_hand_computed_harmonized_gradient(mode, strategy):
    model, batch = make(torch.float64, CONFLICT_SEED)
    expected, (w_a, w_c) = manual_update(model, batch, mode, trade_off=0.7)
    stats = run(model, batch, mode=mode, strategy=strategy, trade_off=0.7)
    assert (stats.w_align, stats.w_cls) == pytest.approx((w_a, w_c), rel=1e-12)
    if mode != "none":
        assert (w_a, w_c) != (1.0, 1.0)
    for name, g in grads(model).items():
        assert torch.allclose(g, expected[name], atol=1e-10, rtol=1e-10), name


def test_float32_strategies_agree_closely():
    model, batch = make(torch.float32, CONFLICT_SEED)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    run(a, batch, mode="gh++", strategy="reweight")
    run(b, batch, mode="gh++", strategy="recombine")
    for name, g in grads(a).items():
        assert torch.allclose(g, grads(b)[name], atol=1e-6, rtol=1e-5), name


def test_mode_none_equals_plain_backward():
    model, batch = make(torch.float64, CONFLICT_SEED)
    plain = copy.deepcopy(model)
    cls, align, _ = plain.losses(*batch)
    (0.3 * align + cls).backward()
    stats = run(model, batch, mode="none", strategy="recombine", trade_off=0.3)
    assert stats.conflict and (stats.w_align, stats.w_cls) == (1.0, 1.0)
    for name, g in grads(plain).items():
        assert torch.allclose(g, grads(model)[name], atol=1e-12), name


@pytest.mark.parametrize("strategy, refresh_every, traversals", [
    ("recombine", 1, 2), ("reweight", 1, 3), ("features", 1, 1)])
def test_backbone_traversals_are_counted(strategy, refresh_every, traversals):
    model, batch = make()
    cls, align, f = model.losses(*batch, count=True)
    CountBackward.calls = 0
    Harmonizer(mode="gh", scope=model.scope(), strategy=strategy).backward(cls=cls, align=align, features=f)
    assert CountBackward.calls == traversals


def test_refresh_every_reuses_weights_with_a_single_pass():
    model, batch = make(torch.float64, CONFLICT_SEED)
    h = Harmonizer(mode="gh", scope=model.scope(), strategy="recombine", refresh_every=3)
    seen = []
    for step in range(4):
        model.zero_grad()
        cls, align, _ = model.losses(*batch, count=True)
        CountBackward.calls = 0
        s = h.backward(cls=cls, align=align)
        seen.append((s.measured, CountBackward.calls, s.w_align))
    assert [m for m, _, _ in seen] == [True, False, False, True]
    assert [c for _, c, _ in seen] == [2, 1, 1, 2]
    assert seen[1][2] == seen[2][2] == seen[0][2]
    # A reused step applies exactly the cached weights.
    expected, _ = manual_update(model, batch, "gh")
    model.zero_grad()
    h2 = Harmonizer(mode="gh", scope=model.scope(), refresh_every=2)
    cls, align, _ = model.losses(*batch)
    h2.backward(cls=cls, align=align)
    model.zero_grad()
    cls, align, _ = model.losses(*batch)
    assert not h2.backward(cls=cls, align=align).measured
    for name, g in grads(model).items():
        assert torch.allclose(g, expected[name], atol=1e-10), name


def test_probes_do_not_move_the_reversal_schedule():
    model, batch = make(torch.float64, CONFLICT_SEED, step=40)
    coefficient = model.grl.coefficient
    for strategy in ("reweight", "recombine"):
        run(model, batch, mode="gh", strategy=strategy)
        assert model.grl.step == 40 and model.grl.coefficient == coefficient
    model.grl(torch.ones(2))  # forward calls do not advance it either
    assert model.grl.step == 40
    model.grl.set_step(41)
    assert model.grl.coefficient > coefficient
    # The discriminator-side gradient the backbone sees uses exactly that coefficient.
    f = torch.ones(3, requires_grad=True)
    model.grl(f).sum().backward()
    assert torch.allclose(f.grad, torch.full((3,), -model.grl.coefficient, dtype=f.dtype))


def test_reversal_step_survives_state_dict():
    model, _ = make(step=77)
    fresh = TinyDANN()
    fresh.load_state_dict(model.state_dict())
    assert fresh.grl.step == 77


def test_unreached_scope_parameters_count_as_zeros():
    # DANN's alignment loss never reaches the classifier, which is in the authors' scope.
    model, batch = make(torch.float64, CONFLICT_SEED)
    stats = run(model, batch, mode="gh", strategy="reweight")
    assert stats.unreached_align == 2 and stats.unreached_cls == 0  # classifier weight and bias
    assert "unreached" in stats.guards


@pytest.mark.parametrize("strategy", ["reweight", "recombine"])
def test_nonfinite_gradients_skip_harmonization_and_are_counted(strategy):
    model, batch = make(torch.float64, CONFLICT_SEED)
    cls, align, _ = model.losses(*batch)
    h = Harmonizer(mode="gh", scope=model.scope(), strategy=strategy)
    stats = h.backward(cls=cls * torch.tensor(math.nan, dtype=cls.dtype), align=align)
    assert stats.guards[0] == "nonfinite" and (stats.w_align, stats.w_cls) == (1.0, 1.0)
    assert h.summary()["guards"]["nonfinite"] == 1
    assert not all(torch.isfinite(p.grad).all() for p in model.backbone.parameters())  # left for the scaler to see


def test_nonfinite_can_raise():
    model, batch = make(torch.float64, CONFLICT_SEED)
    cls, align, _ = model.losses(*batch)
    h = Harmonizer(mode="gh", scope=model.scope(), on_nonfinite="raise")
    with pytest.raises(FloatingPointError, match="alignment"):
        h.backward(cls=cls, align=align * torch.tensor(math.inf, dtype=align.dtype))


def test_tiny_alignment_gradient_is_guarded():
    model, batch = make(torch.float64, CONFLICT_SEED, step=0)  # coefficient exactly 0 at step 0
    stats = run(model, batch, mode="gh", strategy="recombine")
    assert "tiny_norm" in stats.guards and (stats.w_align, stats.w_cls) == (1.0, 1.0)


@pytest.mark.parametrize("strategy", ["reweight", "recombine"])
def test_amp_grad_scaler_path(strategy):
    model, batch = make(torch.float32, CONFLICT_SEED)
    reference = copy.deepcopy(model)
    ref_stats = run(reference, batch, mode="gh++", strategy=strategy)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    cls, align, _ = model.losses(*batch)
    stats = Harmonizer(mode="gh++", scope=model.scope(), strategy=strategy).backward(cls=cls, align=align, scaler=scaler)
    # Measured on unscaled gradients: same weights and norms; .grad holds scaled gradients.
    assert (stats.w_align, stats.w_cls) == pytest.approx((ref_stats.w_align, ref_stats.w_cls), rel=1e-4)
    assert stats.norm_cls == pytest.approx(ref_stats.norm_cls, rel=1e-4)
    for name, g in grads(reference).items():
        assert torch.allclose(dict(model.named_parameters())[name].grad / 2.0 ** 12, g, atol=1e-6, rtol=1e-4), name
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(optimizer)
    scaler.update()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_amp_overflow_step_is_skipped_by_the_scaler():
    model, batch = make(torch.float32, CONFLICT_SEED)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    cls, align, _ = model.losses(*batch)
    h = Harmonizer(mode="gh", scope=model.scope())
    stats = h.backward(cls=cls * torch.tensor(math.inf), align=align, scaler=scaler)
    assert "nonfinite" in stats.guards
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert scaler.get_scale() < 2.0 ** 12


def test_features_strategy_measures_the_feature_gramian():
    model, batch = make(torch.float64, CONFLICT_SEED)
    probe = copy.deepcopy(model)
    cls, align, f = probe.losses(*batch)
    ga, gc = torch.autograd.grad(align, f, retain_graph=True), torch.autograd.grad(cls, f)
    expected = harmonize_weights(*gramian(ga[0], gc[0]), mode="gh")
    stats = run(model, batch, mode="gh", strategy="features")
    assert (stats.w_align, stats.w_cls) == pytest.approx(expected, rel=1e-12)
    cls, align, _ = model.losses(*batch)
    with pytest.raises(ValueError, match="features"):
        Harmonizer(mode="gh", strategy="features").backward(cls=cls, align=align)


def test_existing_grads_are_accumulated_like_backward():
    model, batch = make(torch.float64, CONFLICT_SEED)
    once = copy.deepcopy(model)
    run(once, batch, mode="gh", strategy="recombine")
    run(model, batch, mode="gh", strategy="recombine")
    run(model, batch, mode="gh", strategy="recombine")
    for name, g in grads(once).items():
        assert torch.allclose(grads(model)[name], 2 * g, atol=1e-12), name


def test_default_scope_is_every_reached_parameter():
    model, batch = make(torch.float64, CONFLICT_SEED)
    cls, align, _ = model.losses(*batch)
    stats = Harmonizer(mode="gh", scope=None).backward(cls=cls, align=align)
    # The classifier is reached by cls only, the discriminator by align only.
    assert stats.unreached_align == 2 and stats.unreached_cls == 4


def test_summary_and_state_dict_round_trip():
    model, batch = make(torch.float64, CONFLICT_SEED)
    h = Harmonizer(mode="gh++", scope=model.scope(), refresh_every=2)
    for _ in range(3):
        cls, align, _ = model.losses(*batch)
        h.backward(cls=cls, align=align)
    summary = h.summary()
    assert summary["steps"] == 3 and summary["measured_steps"] == 2 and summary["conflict_rate"] == 1.0
    assert summary["mean_w_align"] > 1.0 > summary["mean_w_cls"]  # alignment leads by default
    clone = Harmonizer(mode="gh++", scope=model.scope(), refresh_every=2)
    clone.load_state_dict(h.state_dict())
    assert clone.summary() == summary and clone.calls == 3 and clone.last == h.last


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="mgda"), "mode"), (dict(strategy="fast"), "strategy"), (dict(refresh_every=0), "refresh_every"),
    (dict(on_nonfinite="ignore"), "on_nonfinite"), (dict(max_weight=0.5), "max_weight"), (dict(k=2.0), "k")])
def test_bad_configuration_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Harmonizer(scope=nn.Linear(2, 2), **kwargs)


def test_empty_scope_and_non_scalar_losses_are_rejected():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="scope"):
        Harmonizer(scope=frozen)
    h = Harmonizer(scope=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="scalar"):
        h.backward(cls=torch.ones(3, requires_grad=True), align=torch.ones((), requires_grad=True))


@pytest.mark.parametrize("mode", MODES)
def test_recombine_cut_below_a_small_scope_is_exact_and_traverses_the_backbone_once(mode):
    model, batch = make(torch.float64, CONFLICT_SEED)
    reference = copy.deepcopy(model)
    cls, align, _ = reference.losses(*batch)
    ref_stats = Harmonizer(mode=mode, scope=[reference.bottleneck], strategy="reweight").backward(cls=cls, align=align)
    cls, align, _, h, _ = model.forward_all(*batch, count=True)
    CountBackward.calls = 0
    stats = Harmonizer(mode=mode, scope=[model.bottleneck], strategy="recombine").backward(
        cls=cls, align=align, features=h)
    assert CountBackward.calls == 1
    assert (stats.w_align, stats.w_cls) == pytest.approx((ref_stats.w_align, ref_stats.w_cls), rel=1e-12)
    for name, g in grads(reference).items():
        assert torch.allclose(g, grads(model)[name], atol=1e-10), name


def test_a_parameter_bypassing_the_cut_is_not_counted_twice():
    # The alignment loss also sees the first layer's activation: a path around the cut at h.
    model, batch = make(torch.float64, CONFLICT_SEED)
    skip = nn.Linear(6, 1).double()

    def losses(m):
        cls, align, _, h, h0 = m.forward_all(*batch)
        return cls, align + skip(h0).mean(), h

    reference = copy.deepcopy(model)
    cls, align, h = losses(reference)
    Harmonizer(mode="gh", scope=[reference.bottleneck], strategy="reweight").backward(cls=cls, align=align)
    expected = grads(reference)
    skip.zero_grad()
    cls, align, h = losses(model)
    Harmonizer(mode="gh", scope=[model.bottleneck], strategy="recombine").backward(cls=cls, align=align, features=h)
    for name, g in expected.items():
        assert torch.allclose(g, grads(model)[name], atol=1e-10), name
    cls, align, h = losses(model)
    stats = Harmonizer(mode="gh", strategy="features").backward(cls=cls, align=align, features=h)
    assert "bypass" in stats.guards
