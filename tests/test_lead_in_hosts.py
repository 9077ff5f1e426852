"""GH++'s lead inside the hosts (MCD, SSRT, CDAN), checked by hand against the probed gradients.

GH++ (the authors' released rule) is not symmetric: with the angle :math:`\\theta > 90` between the
two gradients over the scope and :math:`\\beta = k(\\theta - 90)`, the *lead* loss is weighted
:math:`1 + 2\\sin(\\beta/2)` and the other :math:`1 + 2\\sin((\\beta + 90 - \\theta)/2)`.  Each test
wraps the harmonizer's backward: it probes both losses over the scope itself, computes the angle and
the weights with the rule written out in ``gh_reference``, then reads the gradient the scope actually
received and solves for the two weights that produced it (``grad = t w_a g_a + w_c g_c``).  So it
checks the weights the host *applied*, not the harmonizer's report of them, for ``lead="cls"`` and
``lead="align"``, and that the engine's ``lead: default`` is the host's own lead (MCD: ``cls``,
SSRT: ``cls``, CDAN: ``align``).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gh_reference import flat, flat_grad, ghpp_weights
from gradharmony import Harmonizer
from gradharmony.uda.engine import Trainer
from gradharmony.uda.methods import Batch, Method, StepContext, build_method
from test_engine import config, tiny_domains

K = 0.5
NUM_CLASSES, IN = 3, 12
DEFAULT_LEAD = {"mcd": "cls", "ssrt": "cls", "cdan": "align"}
# Tiny hosts; the step puts each reversal layer (CDAN, SSRT) well above zero.
HOSTS = {
    "mcd": ({"num_k": 1, "head_hidden": 8}, 0),
    "ssrt": ({"sr_layers": (-1,), "sr_epsilon": 0.0, "safe_period": 50, "grl_max_steps": 10}, 30),
    "cdan": ({"disc_hidden": 16}, 80),
}


class Probe:
    """Wraps ``harmonizer.backward``: the probes before it, the scope's new gradient after it."""

    def __init__(self, harmonizer: Harmonizer):
        self.calls: list[dict] = []
        params, original = harmonizer.scope, harmonizer.backward

        def backward(**kwargs):
            g_align = flat_grad(kwargs["align"], params).double()
            g_cls = flat_grad(kwargs["cls"], params).double()
            held = [None if p.grad is None else p.grad.clone() for p in params]
            stats = original(**kwargs)
            new = [p.grad if h is None else p.grad - h for p, h in zip(params, held)]
            self.calls.append(
                {
                    "g_align": g_align,
                    "g_cls": g_cls,
                    "grad": flat(new, params).double(),
                    "trade_off": kwargs.get("trade_off", 1.0),
                    "stats": stats,
                }
            )
            return stats

        harmonizer.backward = backward

    def check(self, lead: str) -> int:
        """Every call's applied weights against the hand computation; returns the number of conflicts."""
        conflicts = 0
        for call in self.calls:
            g_a, g_c, t = call["g_align"], call["g_cls"], call["trade_off"]
            if g_a.norm() == 0 or g_c.norm() == 0:  # e.g. the reversal coefficient is 0 at step 0: weights 1
                assert "tiny_norm" in call["stats"].guards
                torch.testing.assert_close(call["grad"], t * g_a + g_c, rtol=1e-5, atol=1e-9)
                continue
            angle = math.degrees(math.acos(float(g_a @ g_c / (g_a.norm() * g_c.norm()))))
            w_align, w_cls = ghpp_weights(angle, K, lead)
            # the weights the scope's gradient was actually built with: grad = t w_a g_a + w_c g_c
            basis = torch.stack((t * g_a, g_c), dim=1)
            applied = torch.linalg.lstsq(basis, call["grad"].unsqueeze(1)).solution.squeeze(1).tolist()
            residual = (basis @ torch.tensor(applied, dtype=basis.dtype) - call["grad"]).norm() / call["grad"].norm()
            assert float(residual) < 1e-5
            assert applied == pytest.approx([w_align, w_cls], rel=1e-4)
            assert call["stats"].angle == pytest.approx(angle, abs=1e-3)
            if angle > 90.0:
                conflicts += 1
                weights = {"align": applied[0], "cls": applied[1]}
                other = "cls" if lead == "align" else "align"
                beta = K * (angle - 90.0)
                assert weights[lead] == pytest.approx(1 + 2 * math.sin(math.radians(beta / 2)), rel=1e-4)
                assert weights[other] == pytest.approx(
                    1 + 2 * math.sin(math.radians((beta + 90 - angle) / 2)), rel=1e-4
                )
                assert weights[lead] > 1.0 > weights[other]
        return conflicts


class Tiny(nn.Sequential):
    """``Linear - ReLU``: a backbone with ``out_features`` (SSRT perturbs its input)."""

    def __init__(self):
        super().__init__(nn.Linear(IN, 16), nn.ReLU())
        self.out_features = 16


def host(name: str) -> Method:
    torch.manual_seed(0)
    return build_method(name, Tiny(), NUM_CLASSES, 100, bottleneck_dim=8, **HOSTS[name][0]).train()


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(6, IN, generator=g), torch.arange(6) % NUM_CLASSES, torch.randn(6, IN, generator=g) + 1.0)


@pytest.mark.parametrize("lead", ["cls", "align"])
@pytest.mark.parametrize("name", sorted(HOSTS))
def test_the_lead_loss_gets_the_lead_weight_in_the_host(name, lead):
    method = host(name)
    optimizers = {n: torch.optim.SGD(g, lr=0.05, momentum=0.9) for n, g in method.optimizer_groups(0.05).items()}
    harmonizer = Harmonizer(mode="gh++", k=K, lead=lead, scope=method.scope_modules())
    probe = Probe(harmonizer)
    step = HOSTS[name][1]
    conflicts = 0
    for seed in range(3):
        torch.manual_seed(seed)
        result = method.update(batch(seed), StepContext(step + seed, optimizers, harmonizer, 0.7))
        assert result.finite and result.stats is probe.calls[-1]["stats"]
    conflicts = probe.check(lead)
    assert len(probe.calls) == 3 and conflicts >= 1  # the weights were exercised


@pytest.mark.parametrize("name", sorted(HOSTS))
def test_the_engine_uses_the_hosts_own_lead_by_default(tmp_path, name):
    params = {
        "mcd": {"num_k": 1, "head_hidden": 8},
        "cdan": {"disc_hidden": 16, "grl_max_steps": 4},
        "ssrt": {"sr_epsilon": 0.0, "safe_period": 50, "grl_max_steps": 2},
    }[name]
    cfg = config(
        tmp_path, method=name, harmonizer="gh++", k=K, lead="default", steps=4, eval_every=4, method_params=params
    )
    trainer = Trainer(cfg, tiny_domains())
    assert trainer.harmonizer.lead == DEFAULT_LEAD[name] == type(trainer.model).default_lead
    probe = Probe(trainer.harmonizer)
    trainer.run()
    assert len(probe.calls) == 4 and probe.check(DEFAULT_LEAD[name]) >= 1
