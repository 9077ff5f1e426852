"""Multi-step methods (MCD, GVB-GD, DWL): update order, where gradients go, GH placement, maths,
and plain training (no harmonizer in the step's context)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gh_reference import gh_weights_of
from gradharmony import Harmonizer
from gradharmony.uda.methods import METHODS, Batch, Losses, Method, StepContext, UpdateResult, build_method
from gradharmony.uda.methods.dwl import (
    A_MAX,
    A_MIN,
    A_NORM,
    DWL,
    J_MAX,
    J_MIN,
    J_NORM,
    WINDOWS,
    dynamic_weight,
    lda_criterion,
)
from gradharmony.uda.methods.mcd import classifier_discrepancy, mean_prediction_entropy

NUM_CLASSES, DIM, IN = 3, 8, 12
MULTI = ["mcd", "gvb", "dwl"]
SMALL = {
    "mcd": {"num_k": 2, "head_hidden": 8},
    "gvb": {"disc_hidden": 8},
    "dwl": {"num_k1": 1, "num_k3": 2, "disc_hidden": 8, "stats_window": 2},
}


class Tiny(nn.Sequential):
    """``Linear - ReLU``: a backbone with ``out_features``, cheap enough for many steps."""

    def __init__(self, in_features: int = IN, out_features: int = 16):
        super().__init__(nn.Linear(in_features, out_features), nn.ReLU())
        self.out_features = out_features


def make(name: str, **hparams) -> Method:
    torch.manual_seed(0)
    return build_method(name, Tiny(), NUM_CLASSES, 100, bottleneck_dim=DIM, **{**SMALL[name], **hparams})


def batch(n_s: int = 6, n_t: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_s) % NUM_CLASSES  # every class present
    return torch.randn(n_s, IN, generator=g), y, torch.randn(n_t, IN, generator=g) + 0.5


def sgd(method: Method, lr: float = 0.1, momentum: float = 0.0) -> dict[str, torch.optim.Optimizer]:
    return {
        name: torch.optim.SGD(groups, lr=lr, momentum=momentum) for name, groups in method.optimizer_groups(lr).items()
    }


def harmonizer_for(method: Method, mode: str = "gh", **kwargs) -> Harmonizer:
    return Harmonizer(mode=mode, scope=method.scope_modules(), lead=method.default_lead, **kwargs)


def snapshot(method: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in method.named_parameters()}


def moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """Top-level modules with a changed parameter (``classifier.fc`` -> ``classifier``)."""
    return {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}


class Recorder:
    """Records every optimizer step (with the modules it moved) and every harmonizer call."""

    def __init__(self, method: Method, optimizers: dict, harmonizer: Harmonizer):
        self.events: list[tuple] = []
        self.calls: list[dict] = []
        for name, opt in optimizers.items():
            original = opt.step

            def step(*args, _name=name, _original=original, **kwargs):
                before = snapshot(method)
                out = _original(*args, **kwargs)
                self.events.append((_name, moved(before, snapshot(method))))
                return out

            opt.step = step
        backward = harmonizer.backward

        def harmonized(**kwargs):
            stats = backward(**kwargs)
            self.events.append(("gh", set()))
            self.calls.append({**kwargs, "stats": stats, "params": snapshot(method)})
            return stats

        harmonizer.backward = harmonized

    def names(self) -> list[str]:
        return [name for name, _ in self.events]


def params_of(*modules: nn.Module) -> list[torch.Tensor]:
    return [p for m in modules for p in m.parameters()]


# Harmonizer calls per training step: MCD (step B), GVB-GD (both pairs in one call), DWL (phase 3 x num_k3).
CALLS_PER_STEP = {"mcd": 1, "gvb": 1, "dwl": SMALL["dwl"]["num_k3"]}


def probing(harmonizer: Harmonizer, scope: list[torch.Tensor]) -> list[tuple[float, float]]:
    """Before every ``harmonizer.backward`` call: the reference GH ``(w_align, w_cls)`` from the
    ``align`` and ``cls`` losses it is given (by keyword or in ``losses``), probed over ``scope`` here
    (appended to the returned list)."""
    expected: list[tuple[float, float]] = []
    backward = harmonizer.backward

    def probed(**kwargs):
        losses = kwargs.get("losses") or kwargs
        expected.append(gh_weights_of(losses["align"], losses["cls"], scope))
        return backward(**kwargs)

    harmonizer.backward = probed
    return expected


def cls_by_hand(method: Method, x_s: torch.Tensor, y_s: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
    """``compute_losses``' ``cls``, written from each method's docstring."""
    n = x_s.shape[0]
    if method.name == "dwl":  # source CE of C, C1, C2 (source and target go through G separately)
        f_s = method.features(x_s)
        return sum(F.cross_entropy(c(f_s), y_s) for c in (method.classifier, method.classifier1, method.classifier2))
    f = method.features(torch.cat((x_s, x_t)))
    if method.name == "gvb":  # CE of the bridged logits + lambda * mean |bridge|
        bridged = method.classifier.fc(f) - method.classifier.bridge(f)
        return F.cross_entropy(bridged[:n], y_s) + method.gvbg_weight * method.classifier.bridge(f).abs().mean()
    y1, y2 = method.classifier(f), method.classifier2(f)  # MCD's L_A
    p1, p2 = F.softmax(y1[n:], dim=1), F.softmax(y2[n:], dim=1)
    entropy = mean_prediction_entropy(p1) + mean_prediction_entropy(p2)
    return F.cross_entropy(y1[:n], y_s) + F.cross_entropy(y2[:n], y_s) + method.entropy_weight * entropy


def reaches(loss: torch.Tensor, module: nn.Module) -> bool:
    grads = torch.autograd.grad(loss, list(module.parameters()), retain_graph=True, allow_unused=True)
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- registry, shared API
def test_registry_and_flags():
    assert {"mcd", "gvb", "dwl"} <= set(METHODS)
    expected_lead = {"mcd": "cls", "gvb": "align", "dwl": "align"}
    for name in MULTI:
        cls = METHODS[name]
        assert cls.name == name and cls.multi_step and cls.default_lead == expected_lead[name]
        assert cls.__doc__ and "Example" in cls.__doc__
    assert not METHODS["dann"].multi_step


def test_defaults_of_the_papers_and_releases():
    m = METHODS["mcd"].hparam_defaults()
    assert (m["num_k"], m["entropy_weight"], m["bottleneck_dim"], m["head_dropout"], m["generator_momentum"]) == (
        4,
        0.01,
        1024,
        0.5,
        0.0,
    )
    g = METHODS["gvb"].hparam_defaults()
    assert (g["gvbg_weight"], g["gvbd_weight"], g["grl_max_steps"], g["disc_batch_norm"], g["disc_dropout"]) == (
        1.0,
        1.0,
        10000,
        False,
        0.5,
    )
    d = METHODS["dwl"].hparam_defaults()
    assert (
        d["num_k1"],
        d["num_k2"],
        d["num_k3"],
        d["num_k4"],
        d["disc_weight"],
        d["adv_weight"],
        d["stats_window"],
        d["domain_loss"],
    ) == (8, 1, 8, 1, 0.1, 0.2, 100, "authors")


@pytest.mark.parametrize("name", MULTI)
def test_hparams_stored_and_optimizers_partition_the_parameters(name):
    method = make(name, backbone_lr_mult=0.1)
    assert set(method.hparams) == set(type(method).hparam_defaults())
    groups = method.optimizer_groups(0.01)
    ids = [id(p) for gs in groups.values() for g in gs for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(method.parameters()))
    for gs in groups.values():
        for g in gs:
            assert {"lr", "lr_mult", "name"} <= set(g) and g["lr"] == pytest.approx(0.01 * g["lr_mult"])
    assert {id(p) for g in method.parameter_groups(0.01) for p in g["params"]} == set(ids)
    # the engine's optimizers: SGD with nesterov momentum must accept the groups
    for gs in groups.values():
        torch.optim.SGD(gs, lr=0.01, momentum=0.9, nesterov=True)


@pytest.mark.parametrize("name", MULTI)
def test_compute_losses_diagnostic_and_forward(name):
    method = make(name)
    x_s, y_s, x_t = batch()
    torch.manual_seed(3)  # MCD's head dropout: the same masks, in the same order, as by hand below
    losses = method.compute_losses(x_s, y_s, x_t, step=3)
    assert losses.cls.dim() == 0 and losses.align.dim() == 0
    assert math.isfinite(losses.cls.item()) and math.isfinite(losses.align.item())
    assert losses.align.requires_grad and losses.features.shape == (12, DIM)
    assert {"cls_loss", "transfer_loss", "source_acc"} <= set(losses.logs)
    # the logged losses are the pair's (GVB-GD logs them without the bridge penalties it adds to the pair)
    bg, bd = (
        (method.gvbg_weight * losses.logs["gvbg"], method.gvbd_weight * losses.logs["gvbd"])
        if name == "gvb"
        else (0, 0)
    )
    assert losses.cls.item() == pytest.approx(losses.logs["cls_loss"] + bg, rel=1e-6)
    assert losses.align.item() == pytest.approx(losses.logs["transfer_loss"] + bd, rel=1e-6)
    torch.manual_seed(3)
    assert losses.cls.item() == pytest.approx(cls_by_hand(method, x_s, y_s, x_t).item(), rel=1e-6)
    method.eval()
    f = method.features(x_t)
    heads = [method.classifier, method.classifier2] if name == "mcd" else [method.classifier]  # MCD: F1 + F2
    torch.testing.assert_close(method(x_t), sum(head(f) for head in heads), rtol=0, atol=0)


@pytest.mark.parametrize("name", MULTI)
def test_few_gh_updates_change_parameters_and_stay_finite(name):
    method = make(name).train()
    optimizers, harmonizer = sgd(method, lr=0.05, momentum=0.9), harmonizer_for(method, "gh")
    expected = probing(harmonizer, params_of(*method.scope_modules()))
    before = snapshot(method)
    per_step = CALLS_PER_STEP[name]
    for step in range(3):
        x_s, y_s, x_t = batch(seed=step)
        result = method.update(Batch(x_s, y_s, x_t), StepContext(step, optimizers, harmonizer, 1.0))
        assert isinstance(result, UpdateResult) and harmonizer.calls == len(expected) == per_step * (step + 1)
        # the step's statistics are those of its last harmonized call, with the weights of its probes
        assert result.stats.step == per_step * (step + 1) - 1 and result.stats.mode == "gh"
        assert (result.stats.w_align, result.stats.w_cls) == pytest.approx(expected[-1], rel=1e-4)
        assert math.isfinite(result.loss_cls) and math.isfinite(result.loss_align)
        # angles are NaN when a probe is zero (GVB's discriminator bridge at reversal coefficient 0)
        assert all(math.isfinite(v) for k, v in result.logs.items() if not k.endswith("angle"))
    assert moved(before, snapshot(method)) == {k.split(".")[0] for k in before}
    assert all(torch.isfinite(v).all() for v in method.state_dict().values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("name", MULTI)
def test_plain_training_equals_the_weights_one_harmonizer_and_calls_none(name):
    """No harmonizer in the context: the harmonized phases become the plain backward of the same sum."""
    plain, measured = make(name).train(), make(name).train()
    plain_opt, measured_opt = sgd(plain, lr=0.05, momentum=0.9), sgd(measured, lr=0.05, momentum=0.9)
    none = harmonizer_for(measured, "none")
    for step in range(2):
        torch.manual_seed(step)
        result = plain.update(Batch(*batch(seed=step)), StepContext(step, plain_opt, None, 0.8))
        torch.manual_seed(step)
        reference = measured.update(Batch(*batch(seed=step)), StepContext(step, measured_opt, none, 0.8))
        assert result.stats is None and result.guards == ("plain",)
        last_call = CALLS_PER_STEP[name] * (step + 1) - 1
        assert (reference.stats.step, reference.stats.w_align, reference.stats.w_cls) == (last_call, 1.0, 1.0)
        assert result.loss_cls == pytest.approx(reference.loss_cls, rel=1e-5)
        assert not any(k.startswith("bridge_") for k in result.logs)
    assert none.calls == 2 * CALLS_PER_STEP[name]  # every harmonized phase of both steps, no other
    if name == "gvb":  # pair 2 went through the same call as pair 1
        assert {"bridge_w_align", "bridge_w_cls"} <= set(reference.logs)
    assert_same_parameters(plain, measured)


def test_default_update_of_a_single_step_method():
    torch.manual_seed(0)
    method = build_method("dann", Tiny(), NUM_CLASSES, 100, bottleneck_dim=DIM, disc_hidden=8)
    reference = copy.deepcopy(method)
    lr, trade_off = 0.1, 0.6
    optimizers = sgd(method, lr)
    assert list(optimizers) == ["all"]
    before = snapshot(method)
    x_s, y_s, x_t = batch()
    result = method.update(Batch(x_s, y_s, x_t), StepContext(50, optimizers, harmonizer_for(method), trade_off))
    assert math.isfinite(result.loss_cls)
    assert {"backbone", "bottleneck", "classifier", "discriminator"} == moved(before, snapshot(method))
    # by hand on the copy: GH over backbone + bottleneck + classifier, then one SGD step on the weighted loss
    losses = reference.compute_losses(x_s, y_s, x_t, 50)
    w_align, w_cls = gh_weights_of(losses.align, losses.cls, params_of(*reference.scope_modules()))
    assert (result.stats.step, result.stats.trade_off) == (0, trade_off)
    assert (result.stats.w_align, result.stats.w_cls) == pytest.approx((w_align, w_cls), rel=1e-4)
    params = list(reference.parameters())
    grads = torch.autograd.grad(trade_off * w_align * losses.align + w_cls * losses.cls, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p -= lr * g
    assert_same_parameters(method, reference)


# ----------------------------------------------------------------------------- MCD
def test_mcd_update_order_and_what_moves():
    method = make("mcd", num_k=3)
    optimizers, harmonizer = sgd(method), harmonizer_for(method)
    rec = Recorder(method, optimizers, harmonizer)
    x_s, y_s, x_t = batch()
    method.update(Batch(x_s, y_s, x_t), StepContext(0, optimizers, harmonizer, 1.0))
    assert rec.names() == [
        "generator",
        "classifiers",  # A
        "gh",
        "classifiers",  # B
        "generator",
        "generator",
        "generator",
    ]  # C x num_k
    generator, classifiers = {"backbone", "bottleneck"}, {"classifier", "classifier2"}
    for name, changed in rec.events:
        if name == "generator":
            assert changed == generator
        elif name == "classifiers":
            assert changed == classifiers


def test_mcd_step_b_fixes_the_generator_and_step_c_fixes_the_classifiers():
    method = make("mcd", num_k=2)
    optimizers, harmonizer = sgd(method), harmonizer_for(method)
    rec = Recorder(method, optimizers, harmonizer)
    x_s, y_s, x_t = batch()
    before = snapshot(method)
    method.update(Batch(x_s, y_s, x_t), StepContext(0, optimizers, harmonizer, 1.0))
    after = snapshot(method)
    at_gh = rec.calls[0]["params"]  # after step A, before B's step
    # B: from the GH call to the end, the classifiers move only in B; the generator only in C
    b_and_c = moved(at_gh, after)
    assert b_and_c == {"backbone", "bottleneck", "classifier", "classifier2"}
    names = rec.names()
    c_moves = set().union(*(m for n, m in rec.events[names.index("gh") + 2 :]))
    assert c_moves == {"backbone", "bottleneck"}
    b_moves = rec.events[names.index("gh") + 1][1]
    assert b_moves == {"classifier", "classifier2"}
    assert moved(before, after) == b_and_c


def test_mcd_gh_is_step_b_measured_on_the_generator():
    method = make("mcd")
    optimizers, harmonizer = sgd(method), harmonizer_for(method)
    assert [id(p) for p in harmonizer.scope] == [id(p) for p in params_of(method.backbone, method.bottleneck)]
    rec = Recorder(method, optimizers, harmonizer)
    x_s, y_s, x_t = batch()
    result = method.update(Batch(x_s, y_s, x_t), StepContext(0, optimizers, harmonizer, 0.7))
    assert len(rec.calls) == 1 and harmonizer.calls == 1
    call = rec.calls[0]
    assert result.stats is call["stats"] and call["trade_off"] == 0.7
    assert call["align"].item() < 0  # -discrepancy: the classifiers maximise it
    assert result.logs["discrepancy_b"] == pytest.approx(-call["align"].item())
    assert result.logs["cls_loss_b"] == pytest.approx(call["cls"].item())


@pytest.mark.parametrize("num_k", [1, 4])
def test_mcd_num_k_is_the_number_of_generator_updates(num_k):
    method = make("mcd", num_k=num_k)
    optimizers, harmonizer = sgd(method), harmonizer_for(method)
    rec = Recorder(method, optimizers, harmonizer)
    forwards = []
    method.backbone.register_forward_hook(lambda *args: forwards.append(1))
    x_s, y_s, x_t = batch()
    result = method.update(Batch(x_s, y_s, x_t), StepContext(0, optimizers, harmonizer, 1.0))
    assert rec.names().count("generator") == 1 + num_k  # step A + step C
    assert rec.names().count("classifiers") == 2 and len(forwards) == 2 + num_k
    assert result.logs["generator_updates"] == num_k


@pytest.mark.parametrize("strategy", ["reweight", "recombine"])
def test_mcd_update_equals_the_authors_step_by_hand(strategy):
    method = make("mcd", num_k=2, head_dropout=0.0, generator_momentum=None)
    ref = copy.deepcopy(method)
    lr, x_s, y_s, x_t = 0.1, *batch()
    harmonizer = harmonizer_for(method, strategy=strategy)
    result = method.update(Batch(x_s, y_s, x_t), StepContext(0, sgd(method, lr), harmonizer, 1.0))

    generator = params_of(ref.backbone, ref.bottleneck)
    heads = params_of(ref.classifier, ref.classifier2)
    n, x = x_s.shape[0], torch.cat((x_s, x_t))

    def losses():
        f = ref.features(x)
        y1, y2 = ref.classifier(f), ref.classifier2(f)
        p1, p2 = F.softmax(y1[n:], 1), F.softmax(y2[n:], 1)
        loss = (
            F.cross_entropy(y1[:n], y_s)
            + F.cross_entropy(y2[:n], y_s)
            + 0.01 * (mean_prediction_entropy(p1) + mean_prediction_entropy(p2))
        )
        return loss, classifier_discrepancy(p1, p2)

    def step(params, loss):
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p -= lr * g

    loss_a, _ = losses()
    step(generator + heads, loss_a)
    loss_c, disc = losses()
    gh1, gh2 = gh_weights_of(loss_c, -disc, generator)  # measured on G, gh1 on loss_c
    step(heads, gh1 * loss_c + gh2 * -disc)
    for _ in range(2):
        step(generator, losses()[1])
    assert result.stats.conflict and gh1 != 1.0  # the weights matter in this batch
    assert result.stats.w_cls == pytest.approx(gh1, rel=1e-4)
    assert result.stats.w_align == pytest.approx(gh2, rel=1e-4)
    assert_same_parameters(method, ref)


def test_plain_mcd_computes_only_the_gradients_each_phase_steps():
    """Without a harmonizer, step B back-propagates into the classifiers alone and step C into the
    generator alone: the gradients each phase would discard are never computed."""
    method = make("mcd", num_k=2)
    generator, heads = params_of(method.backbone, method.bottleneck), params_of(method.classifier, method.classifier2)
    computed: list[str] = []
    for name, params in (("generator", generator), ("classifiers", heads)):
        params[0].register_hook(lambda grad, _name=name: computed.append(_name))
    x_s, y_s, x_t = batch()
    method.update(Batch(x_s, y_s, x_t), StepContext(0, sgd(method), None, 1.0))
    # A: both (in backward order: the classifiers first); B: the classifiers; C x 2: the generator
    assert computed == ["classifiers", "generator", "classifiers", "generator", "generator"]


@pytest.mark.parametrize("harmonized", [False, True])
def test_mcd_step_b_and_c_gradients_match_a_full_backward(harmonized, monkeypatch):
    """The pruned backward passes give the update of full ones, bit for bit (plain and with GH)."""
    method = make("mcd", num_k=2)
    reference = copy.deepcopy(method)
    x_s, y_s, x_t = batch()

    def train(m: Method) -> None:
        optimizers, harmonizer = sgd(m, momentum=0.9), harmonizer_for(m) if harmonized else None
        for step in range(3):
            torch.manual_seed(step)
            m.update(Batch(x_s, y_s, x_t), StepContext(step, optimizers, harmonizer, 0.5))

    train(method)
    original = torch.Tensor.backward

    def full_backward(self, *args, inputs=None, **kwargs):  # every gradient, the unused ones discarded
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", full_backward)
    train(reference)
    for (name, p), q in zip(method.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name


def test_mcd_eval_heads_and_generator_momentum_groups():
    method = make("mcd").eval()
    x = batch()[0]
    f = method.features(x)
    torch.testing.assert_close(method(x), method.classifier(f) + method.classifier2(f))
    method.eval_head = "f2"
    torch.testing.assert_close(method(x), method.classifier2(f))
    groups = method.optimizer_groups(0.01)["generator"]
    assert all(g["momentum"] == 0.0 and g["nesterov"] is False for g in groups)
    assert "momentum" not in make("mcd", generator_momentum=None).optimizer_groups(0.01)["generator"][0]
    assert "momentum" not in method.optimizer_groups(0.01)["classifiers"][0]


def test_mcd_tllib_heads_own_their_first_layer():
    """``shared_bottleneck=False``: no bottleneck, G is the backbone, each head is TLlib's
    Dropout-Linear(in, bottleneck)-BN-ReLU-Dropout-Linear(bottleneck, hidden)-BN-ReLU-Linear."""
    method = make("mcd", shared_bottleneck=False, head_hidden=5)
    assert isinstance(method.bottleneck, nn.Identity)
    for head in (method.classifier, method.classifier2):
        kinds = [type(m) for m in head]
        assert kinds == [nn.Dropout, nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
        assert [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)] == [
            (16, DIM),
            (DIM, 5),
            (5, NUM_CLASSES),
        ]
    assert method.classifier[1].weight.data_ptr() != method.classifier2[1].weight.data_ptr()
    generator = method.optimizer_groups(0.1)["generator"]
    assert [g["name"] for g in generator] == ["backbone"]  # the empty bottleneck group is left out
    harmonizer = harmonizer_for(method)
    assert [id(p) for p in harmonizer.scope] == [id(p) for p in method.backbone.parameters()]
    optimizers = sgd(method)
    rec = Recorder(method, optimizers, harmonizer)
    x_s, y_s, x_t = batch()
    result = method.update(Batch(x_s, y_s, x_t), StepContext(0, optimizers, harmonizer, 1.0))
    assert result.finite and rec.names() == ["generator", "classifiers", "gh", "classifiers", "generator", "generator"]
    c_moves = set().union(*(m for n, m in rec.events[rec.names().index("gh") + 2 :]))
    assert c_moves == {"backbone"}


def test_mcd_skips_a_phase_with_non_finite_gradients():
    method = make("mcd", num_k=1)
    optimizers = sgd(method)
    with torch.no_grad():
        method.classifier[-1].weight[0, 0] = float("inf")
    before = snapshot(method)
    x_s, y_s, x_t = batch()
    result = method.update(Batch(x_s, y_s, x_t), StepContext(0, optimizers, harmonizer_for(method), 1.0))
    assert math.isnan(result.loss_cls) and result.logs["skipped_phases"] == 3.0  # A, B and C (num_k = 1)
    assert moved(before, snapshot(method)) == set()  # every phase was skipped: nothing moved
    assert "nonfinite" in result.stats.guards and (result.stats.w_align, result.stats.w_cls) == (1.0, 1.0)


# ----------------------------------------------------------------------------- GVB-GD
def test_gvb_gradients_reach_the_right_modules():
    method = make("gvb", disc_dropout=0.0)
    x_s, y_s, x_t = batch()
    t = method._terms(x_s, y_s, x_t, step=5000)  # reversal coefficient ~1
    assert isinstance(t, Losses)
    terms = {"align": t.align, "cls": t.cls, **t.extra}
    fc, bridge, disc = method.classifier.fc, method.classifier.bridge, method.discriminator
    expected = {  # loss -> (backbone, bottleneck, fc, bridge, disc hidden, disc head, disc bridge)
        "align": (True, True, True, True, True, True, True),
        "cls": (True, True, True, True, False, False, False),
        "bridge_g": (True, True, False, True, False, False, False),
        "bridge_d": (True, True, True, True, True, False, True),
    }
    modules = (method.backbone, method.bottleneck, fc, bridge, disc.hidden, disc.head, disc.bridge)
    for loss, flags in expected.items():
        assert tuple(reaches(terms[loss], m) for m in modules) == flags, loss
    # the discriminator bridge reaches the classifier reversed, the discriminator plainly
    coefficient = method.grl.coefficient
    g_rev = torch.autograd.grad(t.extra["bridge_d"], fc.weight, retain_graph=True)[0]
    g_disc = torch.autograd.grad(t.extra["bridge_d"], disc.bridge.weight, retain_graph=True)[0]
    method.grl.constant = -1.0  # the identity
    plain = method._terms(x_s, y_s, x_t, step=5000)
    g_fc, g_bridge = torch.autograd.grad(plain.extra["bridge_d"], [fc.weight, disc.bridge.weight])
    torch.testing.assert_close(g_rev, -coefficient * g_fc)
    torch.testing.assert_close(g_disc, g_bridge)


def test_gvb_logits_are_bridged_and_the_weights_switch_bridges_off():
    method = make("gvb")
    f = torch.randn(4, DIM)
    c = method.classifier
    torch.testing.assert_close(c(f), c.fc(f) - c.bridge(f))
    off = make("gvb", gvbg_weight=0.0, gvbd_weight=0.0)
    torch.testing.assert_close(off.classifier(f), off.classifier.fc(f))
    assert not off.discriminator.use_bridge
    with pytest.raises(ValueError):
        make("gvb", gvbd_weight=-1.0)


def test_gvb_compute_losses_is_the_single_pair_form():
    method = make("gvb", gvbg_weight=0.5, gvbd_weight=2.0, disc_dropout=0.0)
    x_s, y_s, x_t = batch()
    losses = method.compute_losses(x_s, y_s, x_t, 100)
    t = method._terms(x_s, y_s, x_t, 100)
    assert losses.cls.item() == pytest.approx((t.cls + 0.5 * t.extra["bridge_g"]).item(), rel=1e-6)
    assert losses.align.item() == pytest.approx((t.align + 2.0 * t.extra["bridge_d"]).item(), rel=1e-6)


def _gvb_by_hand(ref, x_s, y_s, x_t, step, lr, gh: bool, trade_off: float = 1.0):
    t = ref._terms(x_s, y_s, x_t, step)
    scope = params_of(ref.backbone, ref.bottleneck, ref.classifier)
    bridge_g, bridge_d = t.extra["bridge_g"], t.extra["bridge_d"]
    w1, w2 = gh_weights_of(t.align, t.cls, scope) if gh else (1.0, 1.0)
    w3, w4 = gh_weights_of(bridge_g, bridge_d, scope) if gh else (1.0, 1.0)
    total = trade_off * w1 * t.align + w2 * t.cls + w3 * bridge_g + w4 * bridge_d
    params = list(ref.parameters())
    grads = torch.autograd.grad(total, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is not None:
                p -= lr * g
    return w1, w2, w3, w4


@pytest.mark.parametrize("mode", ["none", "gh", "plain"])
def test_gvb_update_equals_the_authors_total_loss_with_gh_on_both_pairs(mode):
    method = make("gvb", disc_dropout=0.0)
    ref = copy.deepcopy(method)
    lr, step, x_s, y_s, x_t = 0.1, 3000, *batch()
    harmonizer = None if mode == "plain" else harmonizer_for(method, mode, strategy="reweight")
    result = method.update(Batch(x_s, y_s, x_t), StepContext(step, sgd(method, lr), harmonizer, 0.8))
    w = _gvb_by_hand(ref, x_s, y_s, x_t, step, lr, gh=mode == "gh", trade_off=0.8)
    assert_same_parameters(method, ref)
    if mode == "plain":  # one backward of the total loss, no harmonizer anywhere
        assert result.stats is None and "bridge_w_align" not in result.logs
        return
    assert mode == "none" or (result.stats.conflict and result.logs["bridge_conflict"] == 1.0)
    got = (result.stats.w_align, result.stats.w_cls, result.logs["bridge_w_align"], result.logs["bridge_w_cls"])
    assert got == pytest.approx(w, rel=1e-4)


def test_gvb_harmonizes_both_pairs_in_one_call_whose_cache_is_the_harmonizers():
    method = make("gvb")
    optimizers, harmonizer = sgd(method), harmonizer_for(method, "gh++", strategy="reweight", k=0.3, refresh_every=2)
    for step in range(2):
        method.update(Batch(*batch(seed=step)), StepContext(step, optimizers, harmonizer, 1.0))
    assert harmonizer.calls == 2 and set(harmonizer.state_dict()["cached"]) == {"align|cls", "bridge_g|bridge_d"}
    # the model keeps no harmonizer state, and still loads checkpoints that held the second harmonizer's
    assert method.state_dict()["_extra_state"] == {}
    clone = make("gvb")
    clone.load_state_dict({**method.state_dict(), "_extra_state": {"bridge_harmonizer": harmonizer.state_dict()}})


def test_gvb_without_bridges_needs_one_harmonizer_call():
    method = make("gvb", gvbg_weight=0.0, gvbd_weight=0.0)
    harmonizer = harmonizer_for(method)
    result = method.update(Batch(*batch()), StepContext(0, sgd(method), harmonizer, 1.0))
    assert harmonizer.calls == 1 and "bridge_angle" not in result.logs


# ----------------------------------------------------------------------------- DWL
def test_dwl_update_order_and_what_moves():
    method = make("dwl", num_k1=2, num_k2=1, num_k3=2, num_k4=1)
    optimizers, harmonizer = sgd(method), harmonizer_for(method)
    rec = Recorder(method, optimizers, harmonizer)
    result = method.update(Batch(*batch()), StepContext(0, optimizers, harmonizer, 1.0))
    assert rec.names() == ["generator", "classifier"] * 2 + ["discriminator", "aux_classifiers", "classifier"] + [
        "gh",
        "generator",
    ] * 2 + ["generator", "classifier"]
    owners = {
        "generator": {"backbone", "bottleneck"},
        "classifier": {"classifier"},
        "aux_classifiers": {"classifier1", "classifier2"},
        "discriminator": {"discriminator"},
    }
    for name, changed in rec.events:
        if name != "gh":
            assert changed == owners[name], name
    assert len(rec.calls) == 2 and result.stats is rec.calls[-1]["stats"]
    assert [id(p) for p in harmonizer.scope] == [id(p) for p in params_of(method.backbone, method.bottleneck)]


def dwl_phase_three_losses():
    """A DWL (no dropout) on one batch: ``(method, f_s, f_t, adv, dis)``, its features and the
    phase-three losses of the generator (the reversed domain loss and the discrepancies)."""
    method = make("dwl", disc_dropout=0.0)
    x_s, _, x_t = batch()
    f_s, f_t = method.features(x_s), method.features(x_t)
    adv = -method.adv_weight * method._domain_loss(f_s, f_t)
    dis = method._discrepancies(f_t)
    return method, f_s, f_t, adv, dis


def test_dwl_phase_three_gradient_is_the_weighted_harmonized_pair():
    method, f_s, f_t, adv, dis = dwl_phase_three_losses()
    weight, trade_off = 0.3, 0.9
    generator = params_of(method.backbone, method.bottleneck)
    w_a, w_c = gh_weights_of(adv, dis, generator)  # probes before T and 1 - T
    assert w_a != 1.0  # a conflict in this batch
    g_adv = torch.autograd.grad(adv, generator, retain_graph=True)
    g_dis = torch.autograd.grad(dis, generator, retain_graph=True)
    stats = method._generator_backward(harmonizer_for(method, "gh"), adv, dis, weight, trade_off, [f_s, f_t])
    assert (stats.w_align, stats.w_cls) == pytest.approx((w_a, w_c), rel=1e-4)
    for p, ga, gd in zip(generator, g_adv, g_dis):
        expected = trade_off * weight * w_a * ga + (1 - weight) * w_c * gd
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-7)


def test_dwl_phase_three_without_a_harmonizer_is_the_plain_weighted_sum():
    method, f_s, f_t, adv, dis = dwl_phase_three_losses()
    weight, trade_off = 0.3, 0.9
    generator = params_of(method.backbone, method.bottleneck)
    g_adv = torch.autograd.grad(adv, generator, retain_graph=True)
    g_dis = torch.autograd.grad(dis, generator, retain_graph=True)
    assert method._generator_backward(None, adv, dis, weight, trade_off, [f_s, f_t]) is None
    for p, ga, gd in zip(generator, g_adv, g_dis):
        torch.testing.assert_close(p.grad, trade_off * weight * ga + (1 - weight) * gd, rtol=1e-5, atol=1e-7)


def test_dwl_phase_three_losses_reach_the_right_modules():
    method, _, _, adv, dis = dwl_phase_three_losses()
    for module in (method.backbone, method.bottleneck, method.discriminator):
        assert reaches(adv, module)
    for module in (method.classifier, method.classifier1, method.classifier2):
        assert not reaches(adv, module)
    for module in (method.backbone, method.bottleneck, method.classifier, method.classifier1, method.classifier2):
        assert reaches(dis, module)
    assert not reaches(dis, method.discriminator)


def test_dwl_domain_losses():
    method = make("dwl")
    d_s, d_t = torch.randn(4), torch.randn(4)
    q = torch.sigmoid(d_t)
    expected = -(q * torch.log(torch.sigmoid(d_s)) + (1 - q) * torch.log(1 - torch.sigmoid(d_s))).mean()
    from gradharmony.uda.methods.dwl import authors_domain_loss

    assert authors_domain_loss(d_s, d_t).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="batch sizes"):
        method.compute_losses(*batch(n_s=6, n_t=3), step=0)
    standard = make("dwl", domain_loss="standard", disc_dropout=0.0)
    x_s, y_s, x_t = batch(n_s=6, n_t=3)
    losses = standard.compute_losses(x_s, y_s, x_t, step=0)
    d_s = standard.discriminator(standard.features(x_s)).squeeze(-1)
    d_t = standard.discriminator(standard.features(x_t)).squeeze(-1)
    bce = 0.5 * (-torch.log(torch.sigmoid(d_s)).mean() - torch.log(1 - torch.sigmoid(d_t)).mean())  # source 1, target 0
    assert losses.logs["adversarial"] == pytest.approx(-standard.adv_weight * bce.item(), rel=1e-5)


def release_lda(features: np.ndarray, labels: np.ndarray, k: int) -> float:
    """The release's J: sum of the top K-1 eigenvalues of inv(Sw + 1e-6 I) Sb, over K."""
    d = features.shape[1]
    sw, sb, u = np.zeros((d, d)), np.zeros((d, d)), features.mean(0)
    for c in np.unique(labels):
        x = features[labels == c]
        xc = x - x.mean(0)
        sw += xc.T @ xc
        sb += len(x) * np.outer(x.mean(0) - u, x.mean(0) - u)
    eig = np.linalg.eigvals(np.linalg.inv(sw + 1e-6 * np.eye(d)) @ sb)
    return float(np.sort(eig.real)[::-1][: k - 1].sum()) / k


def test_lda_criterion_matches_the_release_eigenvalue_sum():
    rng = np.random.default_rng(0)
    k, d = 3, 5
    labels = np.arange(40) % k
    features = rng.normal(size=(40, d)) + labels[:, None] * 0.7
    f = torch.tensor(features)
    sums = torch.zeros(k, d, dtype=torch.float64).index_add_(0, torch.tensor(labels), f)
    counts = torch.bincount(torch.tensor(labels), minlength=k).double()
    value = lda_criterion(f.T @ f, sums, counts, k)
    assert value == pytest.approx(release_lda(features, labels, k), rel=1e-6)
    assert lda_criterion(f.T @ f, sums, torch.tensor([40.0, 0.0, 0.0], dtype=torch.float64), k) == 0.0


def test_dwl_window_statistics_follow_the_release():
    method = make("dwl", stats_window=2)
    assert method.dynamic_weight == 0.5 and dynamic_weight(0.5, 0.5) == 0.5
    rng = np.random.default_rng(1)
    k = NUM_CLASSES
    feats, labs = [rng.normal(size=(30, DIM)) + 0.3 * i for i in range(2)], [np.arange(30) % k] * 2
    for i in range(2):
        f = torch.tensor(feats[i])
        method.dwl_scatter[i] = f.T @ f
        method.dwl_class_sums[i] = torch.zeros(k, DIM, dtype=torch.float64).index_add_(0, torch.tensor(labs[i]), f)
        method.dwl_class_counts[i] = torch.bincount(torch.tensor(labs[i]), minlength=k).double()
    state = method.dwl_state.tolist()
    method._close_window(state)
    delta = feats[0] - feats[1]
    a = float(np.mean(delta @ delta.T))  # the release's linear MMD of paired features
    j_s, j_t = release_lda(feats[0], labs[0], k), release_lda(feats[1], labs[1], k)
    a_max, j_max, j_min = a, max(1.0, j_s, j_t), min(1.0, j_s, j_t)
    assert state[A_MIN] == 0.0 and state[A_MAX] == pytest.approx(a_max)
    assert state[A_NORM] == pytest.approx(a / (a_max + 1e-6))
    assert state[J_NORM] == pytest.approx((min(j_s, j_t) - j_min) / (j_max - j_min + 1e-6), rel=1e-6)
    assert state[J_MIN] == state[J_MAX] == pytest.approx(j_max)  # reset after the first window
    assert state[WINDOWS] == 1.0 and method.dwl_class_counts.sum() == 0


def dwl_weight_by_hand(windows: list[list[tuple]], num_classes: int) -> list[float]:
    """T after each window, from DWL's docstring: (f_s, y_s, f_t, pseudo-labels) per step of a window."""
    a_min, a_max, j_min, j_max = 0.0, 0.0, 1.0, 1.0  # the release's start values
    weights = []
    for i, window in enumerate(windows):
        f_s, y_s, f_t, y_t = (np.concatenate([step[k] for step in window]) for k in range(4))
        a = float(np.sum((f_s.mean(0) - f_t.mean(0)) ** 2))
        a_max, a_min = max(a_max, a), min(a_min, a)
        a_hat = abs(a - a_min) / (a_max - a_min + 1e-6)
        j_s, j_t = release_lda(f_s, y_s, num_classes), release_lda(f_t, y_t, num_classes)
        j_max, j_min = max(j_max, j_s, j_t), min(j_min, j_s, j_t)
        j_hat = (min(j_s, j_t) - j_min) / (j_max - j_min + 1e-6)
        if i == 0:
            j_min = j_max  # the release resets the minimum after its first epoch
        weights.append(a_hat / (a_hat + 1 - j_hat))
    return weights


def test_dwl_updates_close_windows_and_the_state_is_saved():
    method = make("dwl", stats_window=2)
    optimizers, harmonizer = sgd(method), harmonizer_for(method, "gh")
    weights, recorded = [], []
    for step in range(6):
        x_s, y_s, x_t = batch(12, 12, seed=step)
        offset = 2.0 * F.one_hot(y_s, IN).float()  # class structure in both domains: the LDA terms move T
        x_s, x_t = x_s + offset, x_t + offset
        result = method.update(Batch(x_s, y_s, x_t), StepContext(step, optimizers, harmonizer, 1.0))
        weights.append(result.logs["dwl_T"])
        after = copy.deepcopy(method)  # the generator after the step (a copy: its batch norm statistics move)
        with torch.no_grad():
            f_s, f_t = after.features(x_s), after.features(x_t)
            pseudo = after.classifier(f_t).argmax(dim=1)
        recorded.append((f_s.double().numpy(), y_s.numpy(), f_t.double().numpy(), pseudo.numpy()))
    assert weights[:2] == [0.5, 0.5] and int(method.dwl_state[WINDOWS]) == 3
    expected = dwl_weight_by_hand([recorded[0:2], recorded[2:4], recorded[4:6]], NUM_CLASSES)
    # the T of each window drives the next one's two steps
    assert weights[2:] == pytest.approx([expected[0]] * 2 + [expected[1]] * 2, rel=1e-6)
    assert method.dynamic_weight == pytest.approx(expected[2], rel=1e-6)
    assert abs(expected[1] - 0.5) > 0.1 and abs(expected[2] - expected[1]) > 0.1  # far from the start value
    clone = make("dwl", stats_window=2)
    clone.load_state_dict(method.state_dict())
    assert clone.dynamic_weight == method.dynamic_weight
    assert torch.equal(clone.dwl_state, method.dwl_state)


def test_dwl_per_step_mmd_updates_the_alignment_term_every_step():
    method = make("dwl", stats_window=50, mmd_per_step=True)
    x_s, y_s, x_t = batch()
    method.update(Batch(x_s, y_s, x_t), StepContext(0, sgd(method), harmonizer_for(method), 1.0))
    with torch.no_grad():  # the step's batch after the step: A = |mean f_s - mean f_t|^2
        f_s, f_t = copy.deepcopy(method).features(x_s).double(), copy.deepcopy(method).features(x_t).double()
    a = float((f_s.mean(0) - f_t.mean(0)).pow(2).sum())
    state = method.dwl_state.tolist()
    assert a > 0 and state[A_MAX] == pytest.approx(a, rel=1e-6) and state[A_MIN] == 0.0
    assert state[A_NORM] == pytest.approx(a / (a + 1e-6), rel=1e-9)
    assert state[WINDOWS] == 0


def test_dwl_is_a_method_subclass_with_generator_scope():
    method = make("dwl")
    assert isinstance(method, DWL) and method.scope_modules() == [method.backbone, method.bottleneck]
    mcd = make("mcd")
    assert mcd.scope_modules() == [mcd.backbone, mcd.bottleneck]
    gvb = make("gvb")
    assert gvb.scope_modules() == [gvb.backbone, gvb.bottleneck, gvb.classifier]
