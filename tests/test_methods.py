"""UDA methods: losses, where their gradients go, reversal sign and schedule, registry, training,
and the default ``update`` (harmonized, plain, source only, non-finite skip, autocast, the cut)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gh_reference import reference_weights
from gradharmony import Harmonizer
from gradharmony.uda.methods import (
    CDANE,
    METHODS,
    Batch,
    Losses,
    Method,
    StepContext,
    build_method,
    class_confusion_loss,
    domain_adversarial_loss,
)
from gradharmony.uda.methods.cdan import MultilinearMap, RandomizedMultilinearMap, entropy_weights
from gradharmony.uda.methods.mdd import log_one_minus_softmax
from gradharmony.uda.models import build_backbone, warm_start_coefficient

NAMES = ["source_only", "dann", "cdan", "cdan+e", "mdd", "mcc"]
ADVERSARIAL = ["dann", "cdan", "cdan+e", "mdd"]
NUM_CLASSES, MAX_STEPS, DIM = 5, 100, 16
SMALL = {"dann": {"disc_hidden": 32}, "cdan": {"disc_hidden": 32}, "cdan+e": {"disc_hidden": 32}}


def make(name: str, **hparams) -> Method:
    torch.manual_seed(0)
    backbone = build_backbone("lenet", 1, 28)
    return build_method(
        name, backbone, NUM_CLASSES, MAX_STEPS, bottleneck_dim=DIM, **{**SMALL.get(name, {}), **hparams}
    )


def batch(n_s: int = 4, n_t: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.rand(n_s, 1, 28, 28, generator=g),
        torch.randint(0, NUM_CLASSES, (n_s,), generator=g),
        torch.rand(n_t, 1, 28, 28, generator=g),
    )


def losses_at(method: Method, step: int = 50, seed: int = 2, **sizes) -> Losses:
    x_s, y_s, x_t = batch(**sizes)
    torch.manual_seed(seed)  # dropout masks
    return method.compute_losses(x_s, y_s, x_t, step)


def adversary(method: Method) -> nn.Module | None:
    return getattr(method, "discriminator", None) or getattr(method, "adv_head", None)


def grads(loss: torch.Tensor, module: nn.Module) -> list[torch.Tensor | None]:
    params = [p for p in module.parameters() if p.requires_grad]
    return list(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))


def reaches(loss: torch.Tensor, module: nn.Module) -> bool:
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads(loss, module))


def flat_grad(loss: torch.Tensor, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The gradient of ``loss`` over ``tensors`` as one float64 vector (zeros where it does not reach)."""
    if not loss.requires_grad:
        return torch.cat([torch.zeros(t.numel(), dtype=torch.float64) for t in tensors])
    gs = torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(t) if g is None else g).reshape(-1).double() for g, t in zip(gs, tensors)])


# ----------------------------------------------------------------------------- registry
def test_registry_keys_and_names():
    # The single-step methods here; mcd, gvb and dwl (multi-step) in test_methods_multistep.py, ssrt in test_ssrt.py.
    assert sorted(METHODS) == sorted([*NAMES, "mcd", "gvb", "dwl", "ssrt"])
    for key, cls in METHODS.items():
        assert cls.name == key and cls.default_lead in ("align", "cls") and cls.__doc__


def test_unknown_method_lists_the_names():
    with pytest.raises(ValueError) as info:
        build_method("dan", build_backbone("lenet", 1, 28), 10, 100)
    assert all(name in str(info.value) for name in NAMES)


def test_unknown_hparam_is_named():
    with pytest.raises(TypeError, match="grl_alhpa"):
        make("dann", grl_alhpa=3.0)
    with pytest.raises(TypeError, match="margin"):
        make("dann", margin=4.0)  # an MDD hyper-parameter


def test_name_is_case_insensitive():
    assert isinstance(build_method("CDAN+E", build_backbone("lenet", 1, 28), 10, 100), CDANE)


def test_backbone_without_out_features_is_rejected():
    with pytest.raises(TypeError, match="out_features"):
        build_method("dann", nn.Flatten(), 10, 100)


@pytest.mark.parametrize("name", NAMES)
def test_hparams_are_resolved_and_stored(name):
    method = build_method(name, build_backbone("lenet", 1, 28), 10, 100)
    assert method.hparams == type(method).hparam_defaults()
    assert method.hparams["backbone_lr_mult"] == 1.0 and method.hparams["bottleneck_dim"] == 256


def test_tllib_defaults():
    d = METHODS["dann"].hparam_defaults()
    assert (d["grl_alpha"], d["grl_low"], d["grl_high"], d["disc_hidden"]) == (10.0, 0.0, 1.0, 1024)
    c = METHODS["cdan"].hparam_defaults()
    assert (c["randomized"], c["randomized_dim"]) == (False, 1024)
    m = METHODS["mdd"].hparam_defaults()
    assert (m["margin"], m["grl_high"], m["grl_max_steps"]) == (4.0, 0.1, 1000)
    assert METHODS["mcc"].hparam_defaults()["temperature"] == 2.5


# ----------------------------------------------------------------------------- losses
@pytest.mark.parametrize("name", NAMES)
def test_losses_are_finite_scalars_and_features_in_graph(name):
    method = make(name)
    losses = losses_at(method, n_s=4, n_t=3)
    assert losses.cls.dim() == 0 and losses.align.dim() == 0
    assert math.isfinite(losses.cls.item()) and math.isfinite(losses.align.item())
    assert losses.features.shape == (7, DIM) and losses.features.requires_grad
    assert torch.autograd.grad(losses.cls, losses.features, retain_graph=True)[0].abs().sum() > 0
    if name != "source_only":
        assert torch.autograd.grad(losses.align, losses.features, retain_graph=True)[0].abs().sum() > 0
    assert all(isinstance(v, float) and math.isfinite(v) for v in losses.logs.values())
    assert {"cls_loss", "transfer_loss", "source_acc"} <= set(losses.logs)
    assert losses.logs["cls_loss"] == losses.cls.item() and losses.logs["transfer_loss"] == losses.align.item()
    # cls by hand: the source rows' cross-entropy of the classifier on the shared features
    x_s, y_s, x_t = batch(n_s=4, n_t=3)
    torch.manual_seed(2)  # the same dropout masks, drawn in the same order
    logits = method.classifier(method.bottleneck(method.backbone(torch.cat((x_s, x_t)))))
    assert losses.cls.item() == pytest.approx(F.cross_entropy(logits[:4], y_s).item(), rel=1e-6)
    assert losses.logs["source_acc"] == (logits[:4].argmax(dim=1) == y_s).float().mean().item()


def test_source_only_align_is_a_constant_zero():
    losses = losses_at(make("source_only"))
    assert losses.align.item() == 0.0 and not losses.align.requires_grad


def test_source_only_without_the_target_forward_normalises_by_the_source_alone():
    """``forward_target=False`` (TLlib's erm.py): batch norm's statistics come from the source batch only."""
    x_s, y_s, x_t = batch(n_s=6, n_t=5)
    for forward_target, rows in ((True, 11), (False, 6)):
        method = make("source_only", forward_target=forward_target)
        seen: list[torch.Tensor] = []
        method.bottleneck[1].register_forward_hook(lambda module, args, out, seen=seen: seen.append(args[0]))
        losses = method.compute_losses(x_s, y_s, x_t, step=0)
        assert seen[0].shape[0] == rows and losses.features.shape[0] == rows
        momentum = method.bottleneck[1].momentum
        expected = momentum * seen[0].detach().mean(0)  # running mean starts at 0
        assert torch.allclose(method.bottleneck[1].running_mean, expected, atol=1e-6)
    x_t_changed = torch.rand_like(x_t)
    strict, strict_again = make("source_only", forward_target=False), make("source_only", forward_target=False)
    torch.manual_seed(3)
    a = strict.compute_losses(x_s, y_s, x_t, step=0).cls
    torch.manual_seed(3)
    b = strict_again.compute_losses(x_s, y_s, x_t_changed, step=0).cls
    assert torch.equal(a, b)  # the target batch has no influence at all


def test_source_only_without_a_bottleneck_is_tllibs_erm_classifier():
    method = make("source_only", forward_target=False, use_bottleneck=False)
    assert isinstance(method.bottleneck, nn.Identity)
    head = [m for m in method.classifier.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in head] == [(800, NUM_CLASSES)]
    x_s, y_s, x_t = batch()
    torch.manual_seed(3)
    losses = method.compute_losses(x_s, y_s, x_t, step=0)
    method.eval()
    logits = method.classifier(method.backbone(x_s))
    torch.testing.assert_close(method(x_s), logits)
    assert losses.features.shape == (4, 800) and not any(isinstance(m, nn.BatchNorm1d) for m in method.modules())


ALIGN_REACHES = {  # module -> does align reach it
    "dann": {"backbone": True, "bottleneck": True, "classifier": False, "adversary": True},
    "cdan": {"backbone": True, "bottleneck": True, "classifier": False, "adversary": True},
    "cdan+e": {"backbone": True, "bottleneck": True, "classifier": True, "adversary": True},
    "mdd": {"backbone": True, "bottleneck": True, "classifier": False, "adversary": True},
    "mcc": {"backbone": True, "bottleneck": True, "classifier": True},
}


@pytest.mark.parametrize("name", list(ALIGN_REACHES))
def test_align_gradient_reaches_exactly_the_expected_modules(name):
    method = make(name)
    losses = losses_at(method)
    for part, expected in ALIGN_REACHES[name].items():
        module = adversary(method) if part == "adversary" else getattr(method, part)
        assert reaches(losses.align, module) == expected, part


@pytest.mark.parametrize(
    "name, hparams, classifier",
    [
        ("cdan", {"detach_predictions": False}, True),
        ("cdan+e", {"entropy_grad": False}, False),
        ("cdan", {"randomized": True, "randomized_dim": 64}, False),
    ],
)
def test_cdan_detach_options(name, hparams, classifier):
    method = make(name, **hparams)
    losses = losses_at(method)
    assert reaches(losses.align, method.classifier) == classifier
    assert reaches(losses.align, method.bottleneck) and reaches(losses.align, method.discriminator)


@pytest.mark.parametrize("name", NAMES)
def test_cls_gradient_reaches_backbone_and_classifier_but_no_adversary(name):
    method = make(name)
    losses = losses_at(method)
    for part in (method.backbone, method.bottleneck, method.classifier):
        assert reaches(losses.cls, part)
    if adversary(method) is not None:
        assert all(g is None for g in grads(losses.cls, adversary(method)))


@pytest.mark.parametrize("name", ["dann", "cdan", "cdan+e", "mdd"])
def test_reversal_sign_and_scale(name):
    """Shared parameters get -lambda times the unreversed gradient; the adversary gets it plainly."""
    method = make(name)
    step = 60
    losses = losses_at(method, step=step)
    coefficient = method.grl.coefficient
    assert losses.logs["grl_coeff"] == pytest.approx(coefficient)
    reversed_shared = grads(losses.align, method.bottleneck)
    reversed_adv = grads(losses.align, adversary(method))
    method.grl.constant = -1.0  # reversal by -1: the identity, the gradient without reversal
    plain = losses_at(method, step=step)
    assert plain.align.item() == pytest.approx(losses.align.item(), rel=1e-6)
    for g_rev, g_plain in zip(reversed_shared, grads(plain.align, method.bottleneck)):
        torch.testing.assert_close(g_rev, -coefficient * g_plain, rtol=1e-4, atol=1e-7)
    for g_rev, g_plain in zip(reversed_adv, grads(plain.align, adversary(method))):
        torch.testing.assert_close(g_rev, g_plain)


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_compute_losses_sets_the_schedule_and_forward_never_moves_it(name):
    method = make(name)
    x_s, y_s, x_t = batch()
    losses = method.compute_losses(x_s, y_s, x_t, step=37)
    assert method.grl.step == 37
    method.compute_losses(x_s, y_s, x_t, step=37)
    method(x_t)
    method.eval()(x_t)
    assert method.grl.step == 37
    hp = method.hparams
    expected = warm_start_coefficient(
        37, hp["grl_max_steps"] or MAX_STEPS, hp["grl_alpha"], hp["grl_low"], hp["grl_high"]
    )
    assert losses.logs["grl_coeff"] == pytest.approx(expected)


def test_grl_step_is_saved_with_the_state_dict():
    method = make("dann")
    losses_at(method, step=42)
    clone = make("dann")
    clone.load_state_dict(method.state_dict())
    assert clone.grl.step == 42


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_a_seed(name):
    method = make(name)
    a, b = losses_at(method, seed=3), losses_at(method, seed=3)
    assert torch.equal(a.cls, b.cls) and torch.equal(a.align, b.align)
    assert torch.equal(a.features, b.features) and a.logs == b.logs


@pytest.mark.parametrize("name", NAMES)
def test_one_backbone_forward_per_step(name):
    method = make(name)
    calls = []
    method.backbone.register_forward_hook(lambda *args: calls.append(1))
    losses_at(method)
    assert len(calls) == 1


@pytest.mark.parametrize("name", NAMES)
def test_forward_gives_class_logits(name):
    method = make(name).eval()
    x = batch()[0]
    logits = method(x)
    assert logits.shape == (4, NUM_CLASSES)
    torch.testing.assert_close(logits, method.classifier(method.bottleneck(method.backbone(x))), rtol=0, atol=0)


# ----------------------------------------------------------------------------- loss maths
def test_domain_adversarial_loss_values():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0])
    loss, acc = domain_adversarial_loss(logits, n_source=2)
    bce_s = F.binary_cross_entropy_with_logits(logits[:2], torch.ones(2))
    bce_t = F.binary_cross_entropy_with_logits(logits[2:], torch.zeros(3))
    assert loss.item() == pytest.approx(0.5 * (bce_s + bce_t).item())
    assert acc.item() == pytest.approx(2 / 5)  # correct: 2.0 (source), -3.0 (target)
    zero_loss, _ = domain_adversarial_loss(torch.zeros(4), 2)
    assert zero_loss.item() == pytest.approx(math.log(2))


def test_entropy_weights_have_mean_one_per_domain_and_favour_confidence():
    ent = torch.tensor([0.1, 1.0, 2.0, 0.5, 0.5])
    w = entropy_weights(ent, n_source=3)
    assert w[:3].mean().item() == pytest.approx(1.0) and w[3:].mean().item() == pytest.approx(1.0)
    assert w[0] > w[1] > w[2]
    raw = 1 + torch.exp(-ent)
    assert torch.allclose(w[:3], raw[:3] / raw[:3].sum() * 3)


def test_multilinear_maps():
    f, g = torch.randn(3, 4), torch.softmax(torch.randn(3, 5), dim=1)
    exact = MultilinearMap(4, 5)
    assert torch.allclose(exact(f, g), torch.einsum("nk,nd->nkd", g, f).reshape(3, 20))
    assert exact.out_features == 20
    rand = RandomizedMultilinearMap(4, 5, output_dim=8)
    expected = (f @ rand.random_f) * (g @ rand.random_g) / math.sqrt(8)
    assert torch.allclose(rand(f, g), expected)
    assert not list(rand.parameters()) and set(rand.state_dict()) == {"random_f", "random_g"}


def test_cdan_e_loss_is_the_per_domain_entropy_weighted_bce():
    method = make("cdan+e")
    x_s, y_s, x_t = batch(n_s=4, n_t=3)
    torch.manual_seed(2)
    losses = method.compute_losses(x_s, y_s, x_t, 50)
    torch.manual_seed(2)
    f = method.features(torch.cat((x_s, x_t)))
    logits = method.classifier(f)
    p = torch.softmax(logits, dim=1)
    d = method.discriminator(method.map(f, p))
    labels = torch.tensor([1.0] * 4 + [0.0] * 3)
    bce = F.binary_cross_entropy_with_logits(d, labels, reduction="none")
    w = 1 + torch.exp((p * p.log()).sum(1))
    expected = 0.5 * ((w[:4] * bce[:4]).sum() / w[:4].sum() + (w[4:] * bce[4:]).sum() / w[4:].sum())
    assert losses.align.item() == pytest.approx(expected.item(), rel=1e-5)


def tllib_style_mcc(logits: torch.Tensor, t: float) -> torch.Tensor:
    n, k = logits.shape
    p = torch.softmax(logits / t, dim=1)
    h = -(p * torch.log(p + 1e-12)).sum(1)
    w = 1 + torch.exp(-h)
    w = (n * w / w.sum()).unsqueeze(1)
    c = (p * w).t() @ p
    c = c / c.sum(dim=1)  # column-wise broadcast: equal to row-wise because c is symmetric
    return (c.sum() - c.trace()) / k


def test_class_confusion_loss_values():
    logits = torch.randn(6, 4)
    assert class_confusion_loss(logits, 2.5).item() == pytest.approx(tllib_style_mcc(logits, 2.5).item(), rel=1e-5)
    assert class_confusion_loss(torch.zeros(5, 4)).item() == pytest.approx(3 / 4)  # uniform: all confused
    confident = 100.0 * torch.eye(4)
    assert class_confusion_loss(confident).item() < 1e-6


def test_log_one_minus_softmax_is_exact_and_stable():
    z = torch.randn(5, 4, dtype=torch.float64)
    k = torch.tensor([0, 1, 2, 3, 0])
    direct = torch.log(1 - torch.softmax(z, 1)[torch.arange(5), k])
    torch.testing.assert_close(log_one_minus_softmax(z, k), direct)
    peaked = torch.tensor([[60.0, 0.0, 0.0]], requires_grad=True)
    value = log_one_minus_softmax(peaked, torch.tensor([0]))
    value.backward()
    assert value.item() == pytest.approx(math.log(2) - 60.0, rel=1e-6)  # log(1 - p) underflows directly
    # d/dz [logsumexp(z_1, z_2) - logsumexp(z)] = (-p_0, e^z_j / (e^z_1 + e^z_2) - p_j): (-1, 1/2, 1/2) here
    torch.testing.assert_close(peaked.grad, torch.tensor([[-1.0, 0.5, 0.5]]))


def test_mdd_transfer_loss_formula():
    method = make("mdd", head_dropout=0.0, bottleneck_dropout=0.0, margin=3.0)
    x_s, y_s, x_t = batch(n_s=4, n_t=3)
    torch.manual_seed(2)
    losses = method.compute_losses(x_s, y_s, x_t, 50)
    torch.manual_seed(2)
    f = method.features(torch.cat((x_s, x_t)))
    pred = method.classifier(f).argmax(1)
    adv = method.adv_head(f)
    source = F.cross_entropy(adv[:4], pred[:4])
    target = -torch.log(1 - torch.softmax(adv[4:], 1)[torch.arange(3), pred[4:]]).mean()
    assert losses.align.item() == pytest.approx((3.0 * source + target).item(), rel=1e-5)
    assert losses.logs["mdd"] == pytest.approx(-losses.align.item(), rel=1e-5)


# ----------------------------------------------------------------------------- optimisation
@pytest.mark.parametrize("name", NAMES)
def test_parameter_groups_partition_the_parameters(name):
    method = make(name, backbone_lr_mult=0.1)
    groups = method.parameter_groups(lr=0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in method.parameters() if p.requires_grad}
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == pytest.approx(0.001) and by_name["heads"]["lr"] == 0.01
    assert ("adversary" in by_name) == (adversary(method) is not None)
    torch.optim.SGD(groups, lr=0.01, momentum=0.9)


def test_scope_is_backbone_bottleneck_classifier():
    method = make("cdan")
    assert method.scope_modules() == [method.backbone, method.bottleneck, method.classifier]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["gh", "gh++"])
def test_three_harmonized_sgd_steps(name, mode):
    method = make(name).train()
    harmonizer = Harmonizer(mode=mode, scope=method.scope_modules(), strategy="recombine", lead=method.default_lead)
    optimizer = torch.optim.SGD(method.parameter_groups(lr=0.05), lr=0.05, momentum=0.9)
    before = {k: p.detach().clone() for k, p in method.named_parameters()}
    scope = [p for m in method.scope_modules() for p in m.parameters() if p.requires_grad]
    for step in range(50, 53):
        optimizer.zero_grad()
        losses = losses_at(method, step=step, seed=step)
        expected = reference_weights(
            flat_grad(losses.align, scope), flat_grad(losses.cls, scope), mode, lead=method.default_lead
        )
        stats = harmonizer.backward(cls=losses.cls, align=losses.align, trade_off=1.0)
        assert stats.step == step - 50 and (stats.w_align, stats.w_cls) == pytest.approx(expected, rel=1e-4)
        optimizer.step()
    after = dict(method.named_parameters())
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    for prefix in ("backbone.", "bottleneck.", "classifier."):
        assert any(k.startswith(prefix) for k in changed), prefix
    if adversary(method) is not None:
        adv_prefix = "discriminator." if hasattr(method, "discriminator") else "adv_head."
        assert any(k.startswith(adv_prefix) for k in changed)
    assert all(torch.isfinite(v).all() for v in method.state_dict().values() if isinstance(v, torch.Tensor))
    assert harmonizer.summary()["steps"] == 3


def test_features_strategy_runs_on_the_method_features():
    """GH weights from the two gradients at the features; every ``.grad`` is that of the weighted loss."""
    method = make("dann")
    reference = copy.deepcopy(method)
    trade_off = 0.7
    losses, ref = losses_at(method, seed=4), losses_at(reference, seed=4)  # the same dropout masks
    assert torch.equal(losses.cls, ref.cls) and torch.equal(losses.align, ref.align)
    g_align, g_cls = (flat_grad(loss, [ref.features]) for loss in (ref.align, ref.cls))
    w_align, w_cls = reference_weights(g_align, g_cls, "gh")
    assert w_align != 1.0 and w_cls != 1.0  # a conflict at the features: the weights matter here
    harmonizer = Harmonizer(mode="gh", strategy="features")
    stats = harmonizer.backward(cls=losses.cls, align=losses.align, trade_off=trade_off, features=losses.features)
    assert stats.conflict and (stats.w_align, stats.w_cls) == pytest.approx((w_align, w_cls), rel=1e-5)
    # by hand, on the copy: the gradient of t w_a L_align + w_c L_cls (discriminator, classifier, backbone)
    params = list(reference.parameters())
    expected = torch.autograd.grad(trade_off * w_align * ref.align + w_cls * ref.cls, params, allow_unused=True)
    assert expected[-1] is not None and bool(expected[-1].abs().sum() > 0)  # the discriminator's last layer
    for (name, p), g in zip(method.named_parameters(), expected):
        if g is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- the default update
def sgd(method: Method, lr: float = 0.05) -> dict[str, torch.optim.Optimizer]:
    return {name: torch.optim.SGD(groups, lr=lr, momentum=0.9) for name, groups in method.optimizer_groups(lr).items()}


def same_parameters(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name", NAMES)
def test_losses_expose_the_backbone_output_as_the_cut(name):
    method = make(name)
    outputs = []
    method.backbone.register_forward_hook(lambda module, args, out: outputs.append(out))
    losses = losses_at(method, n_s=4, n_t=3)
    assert len(outputs) == 1 and losses.cut is outputs[0]
    assert losses.cut.shape == (7, method.backbone.out_features)
    assert torch.autograd.grad(losses.cls, losses.cut, retain_graph=True)[0].abs().sum() > 0  # in the graph


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("harmonized", [True, False])
def test_default_update_is_the_harmonized_or_plain_backward_then_a_step(name, harmonized):
    method = make(name).train()
    reference = copy.deepcopy(method)
    x_s, y_s, x_t = batch()
    harmonizer = Harmonizer(mode="gh++", scope=method.scope_modules(), lead=method.default_lead)
    ref_harmonizer = Harmonizer(mode="gh++", scope=reference.scope_modules(), lead=reference.default_lead)
    optimizers, ref_optimizers = sgd(method), sgd(reference)
    for step in (40, 41):
        torch.manual_seed(step)
        result = method.update(
            Batch(x_s, y_s, x_t), StepContext(step, optimizers, harmonizer if harmonized else None, 0.6)
        )
        torch.manual_seed(step)
        losses = reference.compute_losses(x_s, y_s, x_t, step)
        ref_optimizers["all"].zero_grad()
        if name == "source_only":  # nothing to harmonize, whatever the context
            losses.cls.backward()
            assert result.stats is None and result.guards == ("no_align",)
        elif harmonized:
            stats = ref_harmonizer.backward(cls=losses.cls, align=losses.align, trade_off=0.6, features=losses.features)
            assert (result.stats.w_align, result.stats.w_cls) == (stats.w_align, stats.w_cls)
        else:
            (losses.cls + 0.6 * losses.align).backward()
            assert result.stats is None and result.guards == ("plain",)
        ref_optimizers["all"].step()
        assert result.finite and result.loss_cls == losses.logs["cls_loss"]
        assert result.logs == losses.logs
    assert same_parameters(method, reference)
    assert harmonizer.calls == (2 if harmonized and name != "source_only" else 0)


def test_non_finite_gradients_skip_the_step_and_report_nan():
    method = make("dann")
    optimizers = sgd(method)
    with torch.no_grad():
        method.classifier[0].weight[0, 0] = float("inf")
    before = {k: p.detach().clone() for k, p in method.named_parameters()}
    for harmonizer in (None, Harmonizer(mode="gh", scope=method.scope_modules())):
        result = method.update(Batch(*batch()), StepContext(50, optimizers, harmonizer))
        assert not result.finite and math.isnan(result.loss_cls) and math.isnan(result.loss_align)
        assert all(p.grad is None for p in method.parameters())  # cleared: nothing stepped
        after = dict(method.named_parameters())
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_update_runs_the_forward_under_the_contexts_autocast():
    method = make("dann")
    seen = []
    original = method.compute_losses

    def spy(*args):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return original(*args)

    method.compute_losses = spy
    result = method.update(Batch(*batch()), StepContext(50, sgd(method), None, autocast_dtype=torch.bfloat16))
    method.update(Batch(*batch()), StepContext(51, sgd(method), None))
    assert seen == [torch.bfloat16, False] and result.finite


@pytest.mark.parametrize("harmonized", [True, False])
def test_a_grad_scaler_scales_the_backward_and_steps_every_optimizer(harmonized):
    """The fp16 path (on CPU here): scaled losses, steps through the scaler, the same update."""
    method = make("cdan").train()
    reference = copy.deepcopy(method)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    updates = []
    for model, scaler_or_none in ((method, scaler), (reference, None)):
        harmonizer = Harmonizer(mode="gh", scope=model.scope_modules()) if harmonized else None
        torch.manual_seed(0)
        updates.append(model.update(Batch(*batch()), StepContext(50, sgd(model), harmonizer, scaler=scaler_or_none)))
    assert updates[0].finite and scaler.get_scale() == 2.0**10  # no overflow: the scale stays
    for p, q in zip(method.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_cut", [True, False])
def test_use_cut_passes_the_backbone_output_to_the_harmonizer(use_cut):
    method = make("cdan")
    harmonizer = Harmonizer(mode="gh", scope=[method.bottleneck])
    calls, outputs = [], {}
    backward = harmonizer.backward
    harmonizer.backward = lambda **kwargs: calls.append(kwargs["features"]) or backward(**kwargs)
    method.backbone.register_forward_hook(lambda module, args, out: outputs.setdefault("cut", out))
    method.bottleneck.register_forward_hook(lambda module, args, out: outputs.setdefault("features", out))
    method.update(Batch(*batch()), StepContext(50, sgd(method), harmonizer, use_cut=use_cut))
    width = method.backbone.out_features if use_cut else DIM
    assert len(calls) == 1 and calls[0].shape == (8, width)
    assert calls[0] is outputs["cut" if use_cut else "features"]  # the very tensor of the step's forward


def test_step_context_checks_its_distributed_mode():
    context = StepContext(0, {})
    assert context.world is None and context.harmonizer is None and context.trade_off == 1.0
    with pytest.raises(ValueError, match="distributed"):
        StepContext(0, {}, distributed="ring")
