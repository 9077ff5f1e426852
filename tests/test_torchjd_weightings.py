"""GH and GH++ as torchjd weightings: the same update as the Harmonizer, and GH == PCGrad for two losses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

torchjd = pytest.importorskip("torchjd")
from torchjd.aggregation import PCGradWeighting  # noqa: E402
from torchjd.autogram import Engine  # noqa: E402
from torchjd.autojac import backward as jac_backward  # noqa: E402
from torchjd.autojac import jac_to_grad  # noqa: E402

from gradharmony import Harmonizer  # noqa: E402
from gradharmony.integrations.torchjd import GH, GHPlusPlus, GHPlusPlusWeighting, GHWeighting  # noqa: E402


def gramian_of(g0: torch.Tensor, g1: torch.Tensor) -> torch.Tensor:
    rows = torch.stack([g0, g1]).double()
    return rows @ rows.T


@pytest.mark.parametrize("seed", range(20))
def test_gh_weighting_equals_pcgrad_for_two_losses(seed):
    g = torch.Generator().manual_seed(seed)
    g0 = torch.randn(7, generator=g)
    g1 = -0.8 * g0 + 0.5 * torch.randn(7, generator=g) if seed % 2 else torch.randn(7, generator=g)
    gramian = gramian_of(g0, g1)
    ours, theirs = GHWeighting()(gramian), PCGradWeighting()(gramian)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    if gramian[0, 1] < 0:  # a conflict: both weights move above 1
        assert bool((ours > 1).all())
    else:
        assert ours.tolist() == [1.0, 1.0]


def _model_and_losses(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))

    def losses():
        out = model(x)
        cls = nn.functional.cross_entropy(out, y)
        align = -nn.functional.cross_entropy(out, (y + 1) % 3)  # conflicts with cls by construction
        return align, cls

    return model, losses


def _harmonizer_grads(mode: str, lead: str, k: float) -> list[torch.Tensor]:
    model, losses = _model_and_losses()
    align, cls = losses()
    stats = Harmonizer(mode=mode, scope=model, lead=lead, k=k).backward(cls=cls, align=align)
    assert stats.conflict
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "weighting, mode, lead",
    [
        (GHWeighting(), "gh", "align"),
        (GHPlusPlusWeighting(k=0.3, lead=0), "gh++", "align"),
        (GHPlusPlusWeighting(k=0.3, lead=1), "gh++", "cls"),
        (GHPlusPlusWeighting(k=0.3, lead=1, exact=True), "gh++exact", "cls"),
    ],
)
def test_the_autogram_update_equals_the_harmonizers(weighting, mode, lead):
    expected = _harmonizer_grads(mode, lead, k=0.3)
    model, losses = _model_and_losses()
    engine = Engine(model, batch_dim=None)
    stacked = torch.stack(losses())
    weights = weighting(engine.compute_gramian(stacked))
    stacked.backward(weights)
    for ours, theirs in zip(expected, (p.grad for p in model.parameters())):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("aggregator, mode, lead", [(GH(), "gh", "align"), (GHPlusPlus(k=0.3, lead=1), "gh++", "cls")])
def test_the_autojac_aggregator_gives_the_same_update(aggregator, mode, lead):
    expected = _harmonizer_grads(mode, lead, k=0.3)
    model, losses = _model_and_losses()
    jac_backward(list(losses()))
    jac_to_grad(list(model.parameters()), aggregator)
    for ours, theirs in zip(expected, (p.grad for p in model.parameters())):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7)


def test_the_lead_matters_for_gh_plus_plus_and_not_for_gh():
    gramian = torch.tensor([[1.0, -0.3], [-0.3, 4.0]], dtype=torch.float64)
    first, second = GHPlusPlusWeighting(lead=0)(gramian), GHPlusPlusWeighting(lead=1)(gramian)
    assert torch.allclose(first, second.flip(0)) and not torch.allclose(first, second)
    swapped = gramian.flip(0).flip(1)
    assert torch.allclose(GHWeighting()(gramian), GHWeighting()(swapped).flip(0))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="expected a 2x2 Gramian"):
        GHWeighting()(torch.eye(3))
    with pytest.raises(ValueError, match="lead must be 0 or 1"):
        GHPlusPlusWeighting(lead=2)
    with pytest.raises(ValueError, match="k"):
        GHPlusPlusWeighting(k=1.5)
