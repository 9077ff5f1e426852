"""The Harmonizer plug-in: strategies agree, passes are counted, guards fire, AMP and resume work."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gh_reference import ghpp_weights
from gradharmony import GradientReversal, Harmonizer
from gradharmony.harmonize import MODES
from traversals import CountBackward


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


def another_batch(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(6, 1, 8, 8, dtype=dtype, generator=g)
    xt = torch.randn(6, 1, 8, 8, dtype=dtype, generator=g) + 0.5
    return xs, torch.randint(0, 3, (6,), generator=g), xt


# ---- the reference: GH, GH++ and GH++exact written here from the raw per-loss gradients ------
# Nothing below calls the library's weight functions: the rules are re-derived from the geometry
# (projections, rotations in the plane of the two gradients) or, for the authors' GH++, written
# out from the published formula, and the weights are read off the harmonized vectors.


def per_loss_gradients(model, batch):
    """{name: dL_align/dp}, {name: dL_cls/dp} for every parameter, on a deep copy (zeros if unreached),
    plus the two gradients with respect to the bottleneck output f."""
    model = copy.deepcopy(model)
    cls, align, f, _, _ = model.forward_all(*batch)
    names, params = zip(*model.named_parameters())
    ga = torch.autograd.grad(align, [*params, f], retain_graph=True, allow_unused=True)
    gc = torch.autograd.grad(cls, [*params, f], allow_unused=True)
    fill = lambda g, p: torch.zeros_like(p) if g is None else g  # noqa: E731
    ga_p = {n: fill(g, p) for n, g, p in zip(names, ga, params)}
    gc_p = {n: fill(g, p) for n, g, p in zip(names, gc, params)}
    return ga_p, gc_p, (ga[-1], gc[-1])


def scope_names(model, modules):
    ids = {id(p) for m in modules for p in m.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def flat(grads, names):
    return torch.cat([grads[n].reshape(-1) for n in names])


def coefficients(update, a, c):
    """(x, y) with update = x a + y c: the harmonized update must lie in span{a, c}."""
    basis = torch.stack([a, c], dim=1)
    xy = torch.linalg.lstsq(basis, update.unsqueeze(1)).solution.squeeze(1)
    assert torch.allclose(basis @ xy, update, rtol=0, atol=1e-9 * float(update.norm()))
    return float(xy[0]), float(xy[1])


def geometric_weights(a, c, mode, k=0.5, lead="align"):
    """(w_align, w_cls) of ``mode`` for the flat gradients a (alignment) and c (classification), from
    their geometry (GH++'s released rule from ``gh_reference``)."""
    d = float(a @ c)
    if mode == "none" or d >= 0:
        return 1.0, 1.0
    if mode == "gh":  # each gradient loses its component along the other; the update is their sum
        a2 = a - (a @ c) / (c @ c) * c
        c2 = c - (c @ a) / (a @ a) * a
        assert abs(float(a2 @ c)) <= 1e-9 * float(a.norm() * c.norm())
        assert float(a2 @ c2) >= 0  # no conflict left
        return coefficients(a2 + c2, a, c)
    norm_a, norm_c = float(a.norm()), float(c.norm())
    theta = math.acos(d / (norm_a * norm_c))  # radians, obtuse
    if mode == "gh++":  # the authors' released rule, in degrees
        return ghpp_weights(math.degrees(theta), k, lead)
    assert mode == "gh++exact"
    # Orthonormal basis of the plane: e1 along the lead, e2 towards the other.
    u, v = (a, c) if lead == "align" else (c, a)
    e1 = u / u.norm()
    e2 = v - (v @ e1) * e1
    e2 = e2 / e2.norm()
    turn_lead, turn_other = k * (theta - math.pi / 2), (1 - k) * (theta - math.pi / 2)
    u2 = u.norm() * (math.cos(turn_lead) * e1 + math.sin(turn_lead) * e2)  # lead turned towards the other
    v2 = v.norm() * (math.cos(theta - turn_other) * e1 + math.sin(theta - turn_other) * e2)  # other towards lead
    assert abs(float(u2 @ v2)) <= 1e-9 * float(u.norm() * v.norm())  # exactly perpendicular
    x_lead, x_other = coefficients(u2 + v2, u, v)
    return (x_lead, x_other) if lead == "align" else (x_other, x_lead)


def expected_grads(ga, gc, weights, trade_off=1.0):
    """What every parameter receives: the gradient of trade_off * w_a * L_align + w_c * L_cls."""
    w_a, w_c = weights
    return {n: trade_off * w_a * ga[n] + w_c * gc[n] for n in ga}


def assert_grads(model, expected, atol=1e-10):
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.allclose(p.grad, expected[name], atol=atol, rtol=1e-9), name


def find_conflicting_seed(lo=0, hi=200):
    """A seed whose Gramians conflict over the full scope, the bottleneck and the features f,
    so that harmonization really acts in the tests (found with the reference, not the library)."""
    for seed in range(lo, hi):
        model, batch = make(torch.float64, seed)
        ga, gc, (fa, fc) = per_loss_gradients(model, batch)
        full, small = scope_names(model, model.scope()), scope_names(model, [model.bottleneck])
        if flat(ga, full) @ flat(gc, full) < 0 and flat(ga, small) @ flat(gc, small) < 0 and (fa * fc).sum() < 0:
            return seed
    raise AssertionError("no conflicting seed found")


CONFLICT_SEED = find_conflicting_seed()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


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


MODES_AND_LEADS = [
    ("none", "align"),
    ("gh", "align"),
    ("gh++", "align"),
    ("gh++", "cls"),
    ("gh++exact", "align"),
    ("gh++exact", "cls"),
]
# strategy, scope, whether the backbone output h is passed as a cut, backbone traversals per call
SETUPS = {
    "reweight": ("reweight", "full", False, 3),
    "recombine": ("recombine", "full", False, 2),
    "recombine-cut": ("recombine", "bottleneck", True, 1),
}


@pytest.mark.parametrize("mode, lead", MODES_AND_LEADS)
@pytest.mark.parametrize("setup", list(SETUPS))
def test_update_equals_the_hand_computed_reference(mode, lead, setup):
    strategy, scope, cut, traversals = SETUPS[setup]
    model, batch = make(torch.float64, CONFLICT_SEED)
    modules = model.scope() if scope == "full" else [model.bottleneck]
    ga, gc, _ = per_loss_gradients(model, batch)
    names = scope_names(model, modules)
    weights = geometric_weights(flat(ga, names), flat(gc, names), mode, k=0.3, lead=lead)
    if mode != "none":
        assert weights != pytest.approx((1.0, 1.0), abs=1e-3)  # harmonization really acts here

    cls, align, _, h, _ = model.forward_all(*batch, count=True)
    CountBackward.calls = 0
    stats = Harmonizer(mode=mode, scope=modules, strategy=strategy, k=0.3, lead=lead).backward(
        cls=cls, align=align, trade_off=0.7, features=h if cut else None
    )
    assert CountBackward.calls == traversals
    assert stats.conflict and stats.measured
    assert (stats.w_align, stats.w_cls) == pytest.approx(weights, rel=1e-9)
    assert_grads(model, expected_grads(ga, gc, weights, trade_off=0.7))


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


@pytest.mark.parametrize("mode", ["gh", "gh++exact"])
def test_probe_trade_off_harmonizes_the_scaled_alignment_gradient(mode):
    # probe_trade_off=True: the Gramian is that of (t g_a, g_c), so the scope's update is exactly
    # the harmonized pair of the gradients as the optimizer sees them.
    model, batch = make(torch.float64, CONFLICT_SEED)
    ga, gc, _ = per_loss_gradients(model, batch)
    names = scope_names(model, model.scope())
    weights = geometric_weights(0.7 * flat(ga, names), flat(gc, names), mode)  # of (t g_a, g_c)
    stats = run(model, batch, mode=mode, strategy="recombine", probe_trade_off=True, trade_off=0.7)
    assert (stats.w_align, stats.w_cls) == pytest.approx(weights, rel=1e-9)
    assert_grads(model, expected_grads(ga, gc, weights, trade_off=0.7))
    if mode == "gh++exact":  # the norms of both scaled gradients survive into a right angle
        update = torch.cat([p.grad.reshape(-1) for n, p in model.named_parameters() if n in names])
        assert float(update.norm()) ** 2 == pytest.approx(
            float((0.7 * flat(ga, names)).norm()) ** 2 + float(flat(gc, names).norm()) ** 2, rel=1e-9
        )


@pytest.mark.parametrize(
    "strategy, refresh_every, traversals",
    [
        ("recombine", 1, [2, 2, 2]),
        ("recombine", 2, [2, 1, 2]),
        ("reweight", 1, [3, 3, 3]),
        ("reweight", 3, [3, 1, 1]),
        ("features", 1, [1, 1, 1]),
        ("features", 2, [1, 1, 1]),
    ],
)
def test_backbone_traversals_are_counted(strategy, refresh_every, traversals):
    # A measured call costs the strategy's probes; a reused one (refresh_every > 1) one backward.
    model, batch = make()
    h = Harmonizer(mode="gh", scope=model.scope(), strategy=strategy, refresh_every=refresh_every)
    counts = []
    for _ in traversals:
        cls, align, f = model.losses(*batch, count=True)
        CountBackward.calls = 0
        h.backward(cls=cls, align=align, features=f)
        counts.append(CountBackward.calls)
    assert counts == traversals


@pytest.mark.parametrize(
    "strategy, mode, lead",
    [("recombine", "gh", "align"), ("reweight", "gh++", "cls"), ("recombine", "gh++exact", "align")],
)
def test_refresh_every_reuses_weights_between_refreshes_and_remeasures_on_refresh_steps(strategy, mode, lead):
    """A new batch and an optimizer step every call, so each batch has its own weights: reused
    steps must apply the weights measured at the last refresh (not this batch's), and refresh
    steps this batch's own."""
    model, _ = make(torch.float64, CONFLICT_SEED)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    h = Harmonizer(mode=mode, scope=model.scope(), strategy=strategy, lead=lead, refresh_every=3)
    names = scope_names(model, model.scope())
    measured_passes = 3 if strategy == "reweight" else 2
    cached = None
    for step in range(7):
        batch = another_batch(40 + step)  # seeds 40..46: every refresh batch conflicts
        ga, gc, _ = per_loss_gradients(model, batch)
        own = geometric_weights(flat(ga, names), flat(gc, names), mode, lead=lead)
        refresh = step % 3 == 0
        if refresh:
            assert own != (1.0, 1.0)
            cached = own
        else:  # this batch alone would be harmonized differently: reuse is observable
            assert own != pytest.approx(cached, rel=1e-3)
        optimizer.zero_grad()
        cls, align, _, _, _ = model.forward_all(*batch, count=True)
        CountBackward.calls = 0
        stats = h.backward(cls=cls, align=align, trade_off=0.7)
        assert stats.measured == refresh and ("reused" in stats.guards) == (not refresh)
        assert CountBackward.calls == (measured_passes if refresh else 1)
        assert (stats.w_align, stats.w_cls) == pytest.approx(cached, rel=1e-9)
        assert_grads(model, expected_grads(ga, gc, cached, trade_off=0.7))
        optimizer.step()
    assert h.summary()["measured_steps"] == 3 and h.summary()["steps"] == 7


def test_probes_do_not_move_the_reversal_schedule():
    model, batch = make(torch.float64, CONFLICT_SEED, step=40)
    coefficient = model.grl.coefficient
    for strategy in ("reweight", "recombine"):
        run(model, batch, mode="gh", strategy=strategy)
        assert model.grl.step == 40 and model.grl.coefficient == coefficient
    model.grl(torch.ones(2))  # forward calls do not advance it either
    assert model.grl.step == 40
    # The DANN ramp 2 / (1 + exp(-10 i / N)) - 1, N = max_steps = 100; only set_step moves it.
    assert coefficient == pytest.approx(2.0 / (1.0 + math.exp(-10.0 * 40 / 100)) - 1.0, rel=1e-12)
    model.grl.set_step(41)
    assert model.grl.coefficient == pytest.approx(2.0 / (1.0 + math.exp(-10.0 * 41 / 100)) - 1.0, rel=1e-12)
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
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    cls, align, _ = model.losses(*batch)
    stats = Harmonizer(mode="gh++", scope=model.scope(), strategy=strategy).backward(
        cls=cls, align=align, scaler=scaler
    )
    # Measured on unscaled gradients: same weights and norms; .grad holds scaled gradients.
    assert (stats.w_align, stats.w_cls) == pytest.approx((ref_stats.w_align, ref_stats.w_cls), rel=1e-4)
    assert stats.norm_cls == pytest.approx(ref_stats.norm_cls, rel=1e-4)
    for name, g in grads(reference).items():
        assert torch.allclose(dict(model.named_parameters())[name].grad / 2.0**12, g, atol=1e-6, rtol=1e-4), name
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler.step(optimizer)
    scaler.update()
    # The scaler unscaled the harmonized gradient and took the plain SGD step with it.
    for name, p in model.named_parameters():
        assert torch.allclose(p.detach(), before[name] - 0.1 * grads(reference)[name], atol=1e-7, rtol=1e-5), name
    assert scaler.get_scale() == 2.0**12  # no overflow: the scale is kept


def test_amp_overflow_step_is_skipped_by_the_scaler():
    model, batch = make(torch.float32, CONFLICT_SEED)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    cls, align, _ = model.losses(*batch)
    h = Harmonizer(mode="gh", scope=model.scope())
    stats = h.backward(cls=cls * torch.tensor(math.inf), align=align, scaler=scaler)
    assert "nonfinite" in stats.guards
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert scaler.get_scale() < 2.0**12


@pytest.mark.parametrize("mode", ["gh", "gh++exact"])
def test_features_strategy_measures_the_feature_gramian(mode):
    model, batch = make(torch.float64, CONFLICT_SEED)
    ga, gc, (fa, fc) = per_loss_gradients(model, batch)
    weights = geometric_weights(fa.reshape(-1), fc.reshape(-1), mode)  # the Gramian of dL/df
    assert weights != pytest.approx((1.0, 1.0), abs=1e-3)
    stats = run(model, batch, mode=mode, strategy="features")
    assert stats.conflict and (stats.w_align, stats.w_cls) == pytest.approx(weights, rel=1e-9)
    assert_grads(model, expected_grads(ga, gc, weights))  # every parameter: the weighted-loss form
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
    steps = []
    for _ in range(3):
        cls, align, _ = model.losses(*batch)
        steps.append(h.backward(cls=cls, align=align))
    summary = h.summary()
    assert summary["steps"] == 3 and summary["measured_steps"] == 2 and summary["conflict_rate"] == 1.0
    assert [s.measured for s in steps] == [True, False, True]
    # Means over all steps of the applied weights, over the measured steps of the angle.
    assert summary["mean_w_align"] == pytest.approx(sum(s.w_align for s in steps) / 3, rel=1e-12)
    assert summary["mean_w_cls"] == pytest.approx(sum(s.w_cls for s in steps) / 3, rel=1e-12)
    assert summary["mean_angle"] == pytest.approx((steps[0].angle + steps[2].angle) / 2, rel=1e-12)
    assert summary["mean_w_align"] > 1.0 > summary["mean_w_cls"]  # alignment leads by default
    assert summary["guards"] == {"unreached": 2, "reused": 1}
    clone = Harmonizer(mode="gh++", scope=model.scope(), refresh_every=2)
    clone.load_state_dict(h.state_dict())
    assert clone.summary() == summary and clone.calls == 3 and clone.last == h.last


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="mgda"), "mode"),
        (dict(strategy="fast"), "strategy"),
        (dict(refresh_every=0), "refresh_every"),
        (dict(on_nonfinite="ignore"), "on_nonfinite"),
        (dict(max_weight=0.5), "max_weight"),
        (dict(k=2.0), "k"),
    ],
)
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
