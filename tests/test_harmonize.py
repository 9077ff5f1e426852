"""Mathematical properties of the pure GH / GH++ rules (gradharmony.harmonize)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gh_reference import ghpp_released
from gradharmony.harmonize import MODES, gramian, harmonize, harmonize_vectors, harmonize_weights

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)
vectors = st.integers(min_value=2, max_value=8).flatmap(
    lambda n: st.tuples(st.lists(finite, min_size=n, max_size=n), st.lists(finite, min_size=n, max_size=n))
)
ks = st.floats(min_value=0.0, max_value=1.0)
leads = st.sampled_from(["align", "cls"])


def _pair(v):
    a, c = (torch.tensor(x, dtype=torch.float64) for x in v)
    return a, c


def _well_posed(a: torch.Tensor, c: torch.Tensor) -> bool:
    """Both norms clearly non-zero and of comparable size (tiny-norm guards excluded)."""
    na, nc = a.norm().item(), c.norm().item()
    return na > 1e-3 and nc > 1e-3 and 1e-4 < na / nc < 1e4


@settings(max_examples=300, deadline=None)
@given(vectors)
def test_gh_update_has_non_negative_inner_product_with_both_gradients(v):
    a, c = _pair(v)
    assume(_well_posed(a, c))
    w_a, w_c = harmonize_weights(*gramian(a, c), mode="gh")
    update = w_a * a + w_c * c
    # <update, a> = |a|^2 - d^2/|c|^2 >= 0 by Cauchy-Schwarz (and symmetrically).
    tol = 1e-9 * (a.norm() + c.norm()) ** 2
    assert float(update @ a) >= -tol
    assert float(update @ c) >= -tol


@settings(max_examples=300, deadline=None)
@given(vectors)
def test_gh_projections_are_orthogonal_and_mirror_the_angle(v):
    a, c = _pair(v)
    assume(_well_posed(a, c))
    r = harmonize(*gramian(a, c), mode="gh")
    assume(r.conflict and r.cos > -1 + 1e-6)
    a2, c2 = harmonize_vectors(a, c, mode="gh")
    assert float(a2 @ c) == pytest.approx(0.0, abs=1e-9 * float(a.norm() * c.norm()))
    assert float(c2 @ a) == pytest.approx(0.0, abs=1e-9 * float(a.norm() * c.norm()))
    assert float(a2 @ c2) >= -1e-12 * float(a.norm() * c.norm())  # the harmonized pair no longer conflicts
    new_cos = float(a2 @ c2 / (a2.norm() * c2.norm()))
    assert new_cos == pytest.approx(-r.cos, abs=1e-6)  # the angle becomes 180 - angle
    new_angle = math.degrees(math.acos(max(-1.0, min(1.0, new_cos))))
    assert new_angle == pytest.approx(180.0 - r.angle, abs=1e-3)


@settings(max_examples=300, deadline=None)
@given(vectors, st.sampled_from(MODES), ks, leads)
def test_non_conflicting_pairs_are_unchanged(v, mode, k, lead):
    a, c = _pair(v)
    aa, cc, d = gramian(a, c)
    assume(d >= 0)
    assert harmonize_weights(aa, cc, d, mode=mode, k=k, lead=lead) == (1.0, 1.0)


@settings(max_examples=300, deadline=None)
@given(vectors, ks, leads)
def test_ghpp_exact_yields_a_right_angle_and_keeps_norms(v, k, lead):
    a, c = _pair(v)
    assume(_well_posed(a, c))
    r = harmonize(*gramian(a, c), mode="gh++exact", k=k, lead=lead)
    assume(r.conflict and math.sin(math.acos(r.cos)) > 1e-3)
    a2, c2 = harmonize_vectors(a, c, mode="gh++exact", k=k, lead=lead)
    scale = float(a.norm() * c.norm())
    assert float(a2 @ c2) == pytest.approx(0.0, abs=1e-7 * scale)
    assert float(a2.norm()) == pytest.approx(float(a.norm()), rel=1e-7)
    assert float(c2.norm()) == pytest.approx(float(c.norm()), rel=1e-7)
    # The split by k: the lead turns by k * (angle - 90) degrees.
    lead_old, lead_new = (a, a2) if lead == "align" else (c, c2)
    turned = math.degrees(
        math.acos(max(-1.0, min(1.0, float(lead_old @ lead_new / (lead_old.norm() * lead_new.norm())))))
    )
    assert turned == pytest.approx(k * (r.angle - 90.0), abs=1e-4)


@settings(max_examples=300, deadline=None)
@given(vectors, st.sampled_from(MODES), ks, leads)
def test_vector_helpers_sum_to_the_weighted_form(v, mode, k, lead):
    a, c = _pair(v)
    assume(_well_posed(a, c))
    w_a, w_c = harmonize_weights(*gramian(a, c), mode=mode, k=k, lead=lead)
    a2, c2 = harmonize_vectors(a, c, mode=mode, k=k, lead=lead)
    expected = w_a * a + w_c * c
    assert torch.allclose(a2 + c2, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max() + 1))


@settings(max_examples=300, deadline=None)
@given(vectors, ks)
def test_ghpp_matches_the_authors_formula_for_both_leads(v, k):
    a, c = _pair(v)
    assume(_well_posed(a, c))
    aa, cc, d = gramian(a, c)
    assume(d < 0)
    angle = math.degrees(math.acos(max(-1.0, min(1.0, d / math.sqrt(aa * cc)))))
    w_lead, w_other = ghpp_released(angle, k)
    # acos is ill-conditioned near 180 degrees: two roundings of cos may differ in the 8th digit there.
    assert harmonize_weights(aa, cc, d, mode="gh++", k=k, lead="align") == pytest.approx((w_lead, w_other), abs=1e-6)
    assert harmonize_weights(aa, cc, d, mode="gh++", k=k, lead="cls") == pytest.approx((w_other, w_lead), abs=1e-6)
    # The rule is not symmetric: the lead is amplified, the other damped.
    assert w_lead >= 1.0 >= w_other


@settings(max_examples=200, deadline=None)
@given(vectors, st.sampled_from(MODES), ks, leads, st.floats(min_value=1e-6, max_value=1e6))
def test_weights_are_invariant_to_a_common_gradient_scale(v, mode, k, lead, s):
    # This is why the AMP path may measure scaled gradients: only the unscaled thresholds change.
    a, c = _pair(v)
    assume(_well_posed(a, c))
    r = harmonize(*gramian(a, c), mode=mode, k=k, lead=lead)
    assume(not r.conflict or math.sin(math.acos(r.cos)) > 1e-4)  # off gh++exact's antiparallel switch
    w = (r.w_align, r.w_cls)
    ws = harmonize_weights(*gramian(a * s, c * s), mode=mode, k=k, lead=lead)
    assert ws == pytest.approx(w, rel=1e-6)


# ---- conflicting Gramians given by their geometry: norms and an obtuse angle ------------------

log_norms = st.floats(min_value=-3.0, max_value=3.0)  # norm ratio <= 1e6: inside the tiny-norm guard
obtuse = st.floats(min_value=90.001, max_value=180.0)


def conflicting_gramian(log_a: float, log_c: float, angle: float) -> tuple[float, float, float]:
    """(aa, cc, d) of gradients with norms 10**log_a, 10**log_c and the given angle in degrees."""
    na, nc = 10.0**log_a, 10.0**log_c
    return na * na, nc * nc, na * nc * math.cos(math.radians(angle))


@settings(max_examples=200, deadline=None)
@given(log_norms, log_norms, obtuse, leads)
def test_ghpp_at_k0_keeps_the_lead_and_at_k1_keeps_the_other(log_a, log_c, angle, lead):
    aa, cc, d = conflicting_gramian(log_a, log_c, angle)
    assume(d < 0)
    half_excess = math.radians(angle - 90.0) / 2.0

    def lead_other(k):
        w_a, w_c = harmonize_weights(aa, cc, d, mode="gh++", k=k, lead=lead)
        return (w_a, w_c) if lead == "align" else (w_c, w_a)

    # k = 0: the whole correction goes to the other loss; the lead keeps weight exactly 1.
    w_lead, w_other = lead_other(0.0)
    assert w_lead == 1.0
    assert w_other == pytest.approx(1.0 - 2.0 * math.sin(half_excess), abs=1e-7)
    # k = 1: the whole correction goes to the lead; the other keeps weight 1 (up to rounding of
    # beta + 90 - angle, which is 0 in exact arithmetic).
    w_lead, w_other = lead_other(1.0)
    assert w_lead == pytest.approx(1.0 + 2.0 * math.sin(half_excess), abs=1e-7)
    assert w_other == pytest.approx(1.0, abs=1e-12)
    # The two extremes mirror each other about 1.
    assert lead_other(1.0)[0] + lead_other(0.0)[1] == pytest.approx(2.0, abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(log_norms, log_norms, obtuse, ks)
def test_ghpp_swapping_the_lead_is_k_to_one_minus_k_mirrored(log_a, log_c, angle, k):
    aa, cc, d = conflicting_gramian(log_a, log_c, angle)
    assume(d < 0)
    w_a, w_c = harmonize_weights(aa, cc, d, mode="gh++", k=k, lead="align")
    s_a, s_c = harmonize_weights(aa, cc, d, mode="gh++", k=k, lead="cls")
    assert (s_a, s_c) == (w_c, w_a)  # the lead swap only exchanges the two weights
    # w_lead(k) = 1 + 2 sin(k x / 2), w_other(k) = 1 - 2 sin((1 - k) x / 2), x = angle - 90:
    # leading at k and following at 1 - k are mirror images about 1.
    m_a, m_c = harmonize_weights(aa, cc, d, mode="gh++", k=1.0 - k, lead="cls")
    assert w_a + m_a == pytest.approx(2.0, abs=1e-12)
    assert w_c + m_c == pytest.approx(2.0, abs=1e-12)
    assert w_a >= 1.0 >= w_c  # the lead is amplified, the other damped


@settings(max_examples=200, deadline=None)
@given(vectors, st.floats(min_value=1e-3, max_value=1e3), st.floats(min_value=1e-3, max_value=1e3), ks, leads)
def test_scaling_either_gradient(v, s, t, k, lead):
    a, c = _pair(v)
    assume(_well_posed(a, c) and _well_posed(a * s, c * t))
    r = harmonize(*gramian(a, c), mode="gh")
    assume(not r.conflict or r.cos > -1 + 1e-9)
    # GH++ (the authors' rule) depends on the angle only: invariant to scaling each gradient.
    w = harmonize_weights(*gramian(a, c), mode="gh++", k=k, lead=lead)
    assert harmonize_weights(*gramian(a * s, c * t), mode="gh++", k=k, lead=lead) == pytest.approx(w, abs=1e-9)
    # GH is not, but its projections are equivariant: g_c' = g_c - (d/aa) g_a does not depend on |g_a|,
    # so the harmonized update of (s g_a, t g_c) is s g_a' + t g_c'.
    a2, c2 = harmonize_vectors(a, c, mode="gh")
    w_a, w_c = harmonize_weights(*gramian(a * s, c * t), mode="gh")
    expected = s * a2 + t * c2
    assert torch.allclose(
        w_a * s * a + w_c * t * c, expected, rtol=1e-7, atol=1e-9 * float(s * a.norm() + t * c.norm())
    )


@settings(max_examples=200, deadline=None)
@given(vectors, st.sampled_from(MODES), ks)
def test_swapping_the_two_losses_swaps_the_weights(v, mode, k):
    a, c = _pair(v)
    assume(_well_posed(a, c))
    aa, cc, d = gramian(a, c)
    # GH treats the two losses alike: swapping them swaps the weights, exactly.
    w_a, w_c = harmonize_weights(aa, cc, d, mode=mode, k=k, lead="align")
    s_lead_first = harmonize_weights(cc, aa, d, mode=mode, k=k, lead="cls")  # the lead moves with its loss
    assert s_lead_first == pytest.approx((w_c, w_a), rel=1e-12, abs=1e-12)
    if mode in ("none", "gh"):
        assert harmonize_weights(cc, aa, d, mode=mode) == (w_c, w_a)


@settings(max_examples=200, deadline=None)
@given(log_norms, log_norms, st.floats(min_value=90.001, max_value=179.9), ks, leads)
def test_ghpp_exact_weights_alone_give_a_pythagorean_update(log_a, log_c, angle, k, lead):
    # Two perpendicular vectors of norms |g_a|, |g_c|: the update w_a g_a + w_c g_c has
    # |update|^2 = aa + cc, a property of the weights alone: no vector helper involved.
    aa, cc, d = conflicting_gramian(log_a, log_c, angle)
    assume(d < 0)
    w_a, w_c = harmonize_weights(aa, cc, d, mode="gh++exact", k=k, lead=lead)
    norm2 = w_a * w_a * aa + w_c * w_c * cc + 2.0 * w_a * w_c * d
    assert norm2 == pytest.approx(aa + cc, rel=1e-6)
    # GH, by contrast, shrinks the update to |a'|^2 + |c'|^2 + 2<a', c'> with |a'| = |a| sin(angle).
    g_a, g_c = harmonize_weights(aa, cc, d, mode="gh")
    gh_norm2 = g_a * g_a * aa + g_c * g_c * cc + 2.0 * g_a * g_c * d
    sin2 = math.sin(math.radians(angle)) ** 2
    cos = math.cos(math.radians(angle))
    assert gh_norm2 == pytest.approx(sin2 * (aa + cc) - 2.0 * sin2 * cos * math.sqrt(aa * cc), rel=1e-6)


special = st.sampled_from([0.0, -0.0, 1e-300, -1e-300, 1e300, -1e300, math.nan, math.inf, -math.inf, 1.0, -1.0])


@settings(max_examples=400, deadline=None)
@given(special, special, special, st.sampled_from(MODES), ks, leads)
def test_weights_are_finite_for_degenerate_inputs(aa, cc, d, mode, k, lead):
    aa, cc = abs(aa), abs(cc)  # squared norms are never negative
    r = harmonize(aa, cc, d, mode=mode, k=k, lead=lead)
    assert math.isfinite(r.w_align) and math.isfinite(r.w_cls)
    if not all(map(math.isfinite, (aa, cc, d))):
        assert r.guards == ("nonfinite",) and (r.w_align, r.w_cls) == (1.0, 1.0) and not r.conflict
    elif min(aa, cc) <= max(1e-30, 1e-16 * max(aa, cc)):
        assert r.guards == ("tiny_norm",) and (r.w_align, r.w_cls) == (1.0, 1.0) and not r.conflict
    elif d >= 0 or mode == "none":
        assert (r.w_align, r.w_cls) == (1.0, 1.0)
    elif mode == "gh":  # well-posed and in conflict: the formula, even when |cos| was clamped
        assert (r.w_align, r.w_cls) == (1.0 - d / aa, 1.0 - d / cc)
    elif mode == "gh++":  # angle-only weights: 1 +- 2 sin(x / 2) with x <= 90 degrees
        assert 1.0 - math.sqrt(2.0) - 1e-12 <= min(r.w_align, r.w_cls)
        assert max(r.w_align, r.w_cls) <= 1.0 + math.sqrt(2.0) + 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_guards_are_reported(mode):
    assert harmonize(math.nan, 1.0, -0.5, mode=mode).guards == ("nonfinite",)
    assert harmonize(0.0, 1.0, 0.0, mode=mode).guards == ("tiny_norm",)
    assert harmonize(1e-20, 1.0, -1e-10, mode=mode).guards == ("tiny_norm",)
    # Rounding pushed |cos| above 1: clamped, and said so.
    assert "cos_clamped" in harmonize(1.0, 1.0, -1.0000001, mode=mode).guards


def test_exact_antiparallel_falls_back_to_gh_and_says_so():
    r = harmonize(1.0, 4.0, -2.0, mode="gh++exact")
    assert "antiparallel" in r.guards
    assert (r.w_align, r.w_cls) == harmonize_weights(1.0, 4.0, -2.0, mode="gh")


def test_max_weight_clips_and_reports():
    # |g_a| << |g_c| (a reversal coefficient near 0): GH's w_align is huge.
    r = harmonize(1e-6, 1.0, -5e-4, mode="gh", max_weight=10.0)
    assert r.w_align == 10.0 and "clipped" in r.guards
    assert harmonize(1e-6, 1.0, -5e-4, mode="gh").w_align == pytest.approx(501.0)


def test_tensor_inputs_give_floats():
    w = harmonize_weights(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(-0.5), mode="gh")
    assert w == (1.5, 1.5) and all(type(x) is float for x in w)


@pytest.mark.parametrize("bad", [dict(mode="pcgrad"), dict(k=1.5), dict(lead="discriminator")])
def test_bad_arguments_raise_clear_errors(bad):
    kwargs = dict(mode="gh++", k=0.5, lead="align") | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        harmonize_weights(1.0, 1.0, -0.5, **kwargs)


def test_mode_aliases():
    assert harmonize_weights(1.0, 1.0, -0.5, mode="ghpp") == harmonize_weights(1.0, 1.0, -0.5, mode="gh++")
