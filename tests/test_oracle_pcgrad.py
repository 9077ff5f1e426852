"""An independent oracle for GH: with two losses, GH is PCGrad (Yu et al., 2020).

PCGrad projects each conflicting gradient onto the normal plane of the other and sums the two
projections; that is GH's update ``w_a g_a + w_c g_c`` with ``w_a = 1 - d/aa``, ``w_c = 1 - d/cc``.
torchjd (a test-only dependency) implements PCGrad on its own, both as a weighting of the Gramian
(``PCGradWeighting``) and as an aggregator of the Jacobian whose rows are the gradients
(``PCGrad``), so ``harmonize_weights(..., mode="gh")`` is checked against code it shares nothing with.

Where the two legitimately differ, the domain is restricted (and the difference pinned in its own
test below):

* Our ``tiny_norm`` guard: a squared norm at or below 1e-30, or below 1e-16 times the other one
  (a norm ratio under 1e-8), gives weights (1, 1); PCGrad has no guard and returns
  ``1 - d/aa``, which can be astronomically large.  The random pairs below keep both squared
  norms above 1e-24 and the norm ratio within 1e-6 .. 1e6, strictly inside the guard.
* PCGrad's random order: for each gradient it projects onto the others in a random permutation.
  With exactly two rows there is only one "other" row, so the order is irrelevant; with three or
  more rows the result depends on the draw and GH (a two-loss rule) has no counterpart.  Only
  two-row Jacobians are compared.
* Scaling conventions: torchjd's PCGrad *sums* the projected gradients (no 1/m averaging), as the
  GH rule does.  The comparison is direct, with no rescaling; a factor would make it fail.
* Non-finite inputs: our ``nonfinite`` guard has no PCGrad counterpart; the pairs are finite.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from gradharmony import harmonize_weights
from gradharmony.harmonize import gramian

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
PCGrad = torchjd_aggregation.PCGrad
PCGradWeighting = torchjd_aggregation.PCGradWeighting

KINDS = ("random", "near_parallel", "near_antiparallel", "antiparallel", "orthogonal", "non_conflicting", "tiny")

unit = st.floats(min_value=-1.0, max_value=1.0, allow_nan=False, allow_infinity=False)


@st.composite
def gradient_pairs(draw):
    """Two float64 gradients in R^n of one of the KINDS, with norms inside the tiny-norm guard."""
    n = draw(st.integers(min_value=2, max_value=8))
    kind = draw(st.sampled_from(KINDS))
    a = torch.tensor(draw(st.lists(unit, min_size=n, max_size=n)), dtype=torch.float64)
    noise = torch.tensor(draw(st.lists(unit, min_size=n, max_size=n)), dtype=torch.float64)
    assume(a.norm() > 1e-3)
    a = a / a.norm()
    if kind == "random":
        assume(noise.norm() > 1e-3)
        c = noise / noise.norm()
    else:
        # Unit direction orthogonal to a (rejected when the noise is parallel to a).
        perp = noise - (noise @ a) * a
        assume(perp.norm() > 1e-3)
        perp = perp / perp.norm()
        eps = 10.0 ** draw(st.floats(min_value=-7.0, max_value=-1.0))
        c = {
            "near_parallel": a + eps * perp,
            "near_antiparallel": -a + eps * perp,
            "antiparallel": -a,
            "orthogonal": perp,
            "non_conflicting": a * draw(st.floats(0.01, 1.0)) + perp,
            "tiny": -a + perp,
        }.get(kind)
        c = c / c.norm()
    # Norm ratio 1e-6 .. 1e6 and overall scale: far inside the guard (squared ratio > 1e-16).
    a = a * 10.0 ** draw(st.floats(min_value=-3.0, max_value=3.0))
    c = c * 10.0 ** draw(st.floats(min_value=-3.0, max_value=3.0))
    if kind == "tiny":  # both gradients tiny (squared norms ~1e-24 .. 1e-12), as early in a DANN run
        a, c = a * 1e-9, c * 1e-9
    return kind, a, c


def pcgrad_aggregate(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """torchjd's PCGrad on the two-row Jacobian [a; c]."""
    return PCGrad()(torch.stack([a, c]))


def gh_update(a: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, tuple[float, float]]:
    w_a, w_c = harmonize_weights(*gramian(a, c), mode="gh")
    return w_a * a + w_c * c, (w_a, w_c)


@settings(max_examples=400, deadline=None)
@given(gradient_pairs())
def test_gh_update_equals_pcgrad_aggregate(pair):
    kind, a, c = pair
    event(kind)
    ours, (w_a, w_c) = gh_update(a, c)
    theirs = pcgrad_aggregate(a, c)
    # Both sum the same two terms in float64; the error is a few ulps of the terms' magnitude.
    # (Antiparallel pairs cancel to ~0, so the tolerance is absolute on that scale, not relative.)
    scale = abs(w_a) * float(a.norm()) + abs(w_c) * float(c.norm())
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-10 * scale), (kind, ours, theirs)
    if kind == "non_conflicting":
        assert (w_a, w_c) == (1.0, 1.0)
        assert torch.equal(theirs, a + c)
    if kind == "antiparallel":  # each gradient loses all of itself: nothing is left
        assert float(ours.norm()) <= 1e-10 * scale


@settings(max_examples=400, deadline=None)
@given(
    st.floats(min_value=-12.0, max_value=12.0),
    st.floats(min_value=-12.0, max_value=12.0),
    st.floats(min_value=-1.0, max_value=1.0),
)
def test_gh_weights_equal_pcgrad_weights_of_the_gramian(log_aa, log_cc, cos):
    # Any 2x2 Gramian of two non-zero gradients: aa, cc > 0 and d = cos * sqrt(aa * cc), |cos| <= 1.
    # |log10(aa / cc)| >= 16 would cross the tiny-norm guard (a squared ratio below 1e-16): kept out.
    assume(abs(log_aa - log_cc) < 15.0)
    aa, cc = 10.0**log_aa, 10.0**log_cc
    d = cos * math.sqrt(aa * cc)
    ours = harmonize_weights(aa, cc, d, mode="gh")
    G = torch.tensor([[aa, d], [d, cc]], dtype=torch.float64)
    theirs = PCGradWeighting()(G).tolist()
    assert ours == pytest.approx(theirs, rel=1e-12, abs=0)


@pytest.mark.parametrize("ratio", [1e-9, 1e-12])
def test_below_the_tiny_norm_guard_gh_leaves_the_sum_where_pcgrad_explodes(ratio):
    """The one documented difference: a negligible gradient (a reversal coefficient near 0).

    PCGrad divides by its squared norm and returns a weight ~1/ratio for it; our guard keeps
    weights (1, 1), i.e. the plain sum, and says so.
    """
    a = torch.tensor([ratio, 0.0], dtype=torch.float64)  # the tiny alignment gradient
    c = torch.tensor([-math.cos(0.3), math.sin(0.3)], dtype=torch.float64)  # conflicting, unit norm
    aa, cc, d = gramian(a, c)
    assert d < 0 and aa < 1e-16 * cc
    assert harmonize_weights(aa, cc, d, mode="gh") == (1.0, 1.0)
    w_a, w_c = PCGradWeighting()(torch.tensor([[aa, d], [d, cc]], dtype=torch.float64)).tolist()
    assert w_a == pytest.approx(1.0 + math.cos(0.3) / ratio, rel=1e-12) and w_a > 1e8
    assert w_c == pytest.approx(1.0 - d / cc, rel=1e-12)
