"""SSRT: losses, gradient routes, target-only perturbation, safe-training restarts, GH placement, resume."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

pytest.importorskip("timm")

from gh_reference import flat_grad, gh_weights, reference_weights
from gradharmony import Harmonizer
from gradharmony.uda.methods import METHODS, Batch, Losses, StepContext, UpdateResult, build_method
from gradharmony.uda.methods.ssrt import (
    SSRT,
    chunk_means,
    diversity_dropped,
    perturb_target,
    refinement_ramp,
    self_refinement_loss,
)
from gradharmony.uda.models import build_image_backbone

NUM_CLASSES, DIM, DEPTH = 5, 16, 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is many times faster than several competing for busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vit() -> nn.Module:
    """ViT-Ti/16 with 3 blocks at 32x32 (4 patches + the class token): milliseconds per step."""
    return build_image_backbone("vit_tiny_patch16_224", img_size=32, depth=DEPTH)


def make(**hparams) -> SSRT:
    torch.manual_seed(0)
    values = dict(bottleneck_dim=DIM, sr_layers=(0, 2))
    return SSRT(vit(), NUM_CLASSES, 100, **{**values, **hparams}).train()


def confident(method: SSRT) -> SSRT:
    """A classifier far from uniform, so that the refinement loss is well above rounding in ``align``."""
    with torch.no_grad():
        for layer in (method.classifier[0], method.classifier[-1]):
            layer.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(4))
    return method


def batch(n_s: int = 4, n_t: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_s) % NUM_CLASSES
    return torch.rand(n_s, 3, 32, 32, generator=g), y, torch.rand(n_t, 3, 32, 32, generator=g) + 0.5


def sgd(method: nn.Module, lr: float = 0.05, momentum: float = 0.9) -> dict[str, torch.optim.Optimizer]:
    return {
        name: torch.optim.SGD(groups, lr=lr, momentum=momentum) for name, groups in method.optimizer_groups(lr).items()
    }


def snapshot(method: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in method.named_parameters()}


def moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}


def reaches(loss: torch.Tensor, module: nn.Module) -> bool:
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def sr_by_hand(clean: torch.Tensor, perturbed: torch.Tensor, epsilon: float, clean_first: bool) -> torch.Tensor:
    """L_sr of ssrt.py's docstring: the KL of the masked rows, over the mask's sum + 1e-6."""
    p, q = F.softmax(clean.double(), dim=1), F.softmax(perturbed.double(), dim=1)
    if not clean_first:
        p, q = q, p
    mask = (p.max(dim=1).values > epsilon).float()
    kl = (p * (p.log() - q.log())).sum(dim=1)
    return (mask * kl).sum() / (mask.sum() + 1e-6)


# ----------------------------------------------------------------------------- registry, defaults
def test_registry_lead_scope_and_defaults():
    assert METHODS["ssrt"] is SSRT and SSRT.multi_step and SSRT.default_lead == "cls"
    assert SSRT.__doc__ and "Example" in SSRT.__doc__
    d = SSRT.hparam_defaults()
    assert (d["sr_loss_weight"], d["sr_alpha"], d["sr_layers"], d["sr_epsilon"], d["sr_loss_p"]) == (
        0.2,
        0.3,
        (0, 4, 8),
        0.4,
        0.5,
    )
    assert (
        d["safe_training"],
        d["safe_period"],
        d["safe_levels"],
        d["safe_drop"],
        d["safe_min_r"],
        d["safe_restore_optimizer"],
    ) == (True, 1000, 4, 1.0, 0.1, False)
    assert (d["bottleneck_dim"], d["backbone_lr_mult"], d["bottleneck_dropout"], d["head_dropout"]) == (
        1024,
        0.1,
        0.5,
        0.5,
    )
    assert (d["grl_alpha"], d["grl_low"], d["grl_high"], d["grl_max_steps"]) == (1.0, 0.0, 0.1, 1000)

    torch.manual_seed(0)
    method = build_method("ssrt", vit(), NUM_CLASSES, 100, bottleneck_dim=DIM, sr_layers=[0, 2])
    assert set(method.hparams) == set(d) and method.hparams["sr_layers"] == (0, 2)
    assert method.scope_modules() == [method.backbone]
    harmonizer = Harmonizer(mode="gh++", scope=method.scope_modules(), lead=method.default_lead)
    assert [id(p) for p in harmonizer.scope] == [id(p) for p in method.backbone.parameters()]
    groups = method.optimizer_groups(0.01)
    assert list(groups) == ["all"]
    by_name = {g["name"]: g for g in groups["all"]}
    assert set(by_name) == {"backbone", "heads", "adversary"} and by_name["backbone"]["lr_mult"] == 0.1
    ids = [id(p) for g in groups["all"] for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(method.parameters()))
    assert {id(p) for p in by_name["adversary"]["params"]} == {id(p) for p in method.discriminator.parameters()}
    # the authors' heads: Linear(width)-ReLU-Dropout(0.5)-Linear, width = bottleneck_dim
    assert [type(m) for m in method.classifier] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert method.classifier[0].out_features == DIM and method.discriminator[-1].out_features == 1
    assert [type(m) for m in method.bottleneck] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout]
    assert torch.all(method.bottleneck[0].bias == 0.1)


def test_invalid_hyper_parameters_are_rejected():
    with pytest.raises(ValueError, match="sr_layers"):
        make(sr_layers=(0, DEPTH))
    with pytest.raises(ValueError, match="sr_layers"):
        make(sr_layers=(-2,))
    with pytest.raises(ValueError, match="sr_loss_p"):
        make(sr_loss_p=1.5)
    with pytest.raises(ValueError, match="safe_period"):
        make(safe_period=0)


# ----------------------------------------------------------------------------- losses and gradients
def test_losses_are_finite_and_the_batch_layout():
    method = confident(make())
    x_s, y_s, x_t = batch(n_s=4, n_t=3)
    outputs = []
    hook = method.backbone.register_forward_hook(lambda module, args, out: outputs.append(out))
    losses = method.compute_losses(x_s, y_s, x_t, step=500)
    hook.remove()
    assert losses.cls.dim() == 0 and losses.align.dim() == 0 and losses.align.requires_grad
    assert math.isfinite(losses.cls.item()) and math.isfinite(losses.align.item())
    assert losses.logs["cls_loss"] == losses.cls.item() and losses.logs["transfer_loss"] == losses.align.item()
    assert losses.logs["transfer_loss"] > losses.logs["domain_loss"] + 1e-3  # the refinement term counts
    assert losses.features.shape == (4 + 2 * 3, DIM)  # source, target, perturbed target
    assert len(outputs) == 1 and losses.cut is outputs[0]  # the ViT output they come from, one forward
    assert losses.cut.shape == (4 + 2 * 3, method.backbone.out_features)
    assert torch.autograd.grad(losses.cls, losses.cut, retain_graph=True)[0].abs().sum() > 0
    assert {
        "cls_loss",
        "transfer_loss",
        "domain_loss",
        "sr_loss",
        "sr_r",
        "sr_weight",
        "sr_layer",
        "domain_acc",
        "grl_coeff",
        "source_acc",
    } <= set(losses.logs)
    assert all(math.isfinite(v) for v in losses.logs.values())
    # evaluation mode: no perturbation, no refinement loss
    method.eval()
    losses = method.compute_losses(x_s, y_s, x_t, step=500)
    assert losses.features.shape == (7, DIM) and losses.logs["sr_loss"] == 0.0
    features = method.bottleneck(method.backbone(torch.cat((x_s, x_t))))
    torch.testing.assert_close(losses.features, features, rtol=0, atol=0)  # no perturbed rows
    torch.testing.assert_close(method(x_t), method.classifier(method.bottleneck(method.backbone(x_t))))


@pytest.mark.parametrize("sr_loss_p", [1.0, 0.0])  # always KL(p || p~), always KL(p~ || p)
def test_align_is_domain_plus_ramped_refinement(sr_loss_p):
    method = confident(make(sr_epsilon=0.0, domain_loss_weight=0.7, head_dropout=0.0, sr_loss_p=sr_loss_p))
    x_s, y_s, x_t = batch()
    t = method.terms(x_s, y_s, x_t, step=500, r=0.5)
    expected = 0.7 * t.extra["domain"] + 0.2 * 0.5 * t.extra["sr"]
    torch.testing.assert_close(t.align, expected)
    assert t.logs["sr_weight"] == pytest.approx(0.1) and t.logs["sr_strength"] == pytest.approx(0.15)
    # L_sr by hand from the logits of the clean target rows and of their perturbed copies (rows 8:)
    clean, perturbed = t.extra["target_logits"], method.classifier(t.features[8:])
    torch.testing.assert_close(clean, method.classifier(t.features[4:8]))
    sr = sr_by_hand(clean, perturbed, 0.0, clean_first=sr_loss_p == 1.0)
    assert t.extra["sr"].item() == pytest.approx(sr.item(), rel=1e-5) and sr.item() > 1e-6
    other = sr_by_hand(clean, perturbed, 0.0, clean_first=sr_loss_p != 1.0)
    assert abs(other.item() - sr.item()) > 1e-3 * sr.item()  # the KL direction is visible in the value
    # the authors' domain loss: BCE(sigmoid(D)) * 2 over the source + target rows
    logits = method.discriminator(t.features[:8]).squeeze(-1)
    labels = torch.cat((torch.ones(4), torch.zeros(4)))
    reference = nn.BCELoss()(torch.sigmoid(logits), labels) * 2
    torch.testing.assert_close(t.extra["domain"], reference, rtol=1e-4, atol=1e-6)
    # without an explicit r: the safe-training ramp, sin(pi/2 * 500/1000) at step 500 (T = 1000)
    t = method.terms(x_s, y_s, x_t, step=500)
    assert t.logs["sr_r"] == pytest.approx(math.sin(math.pi / 4))


def test_gradients_reach_the_right_modules():
    method = make(sr_epsilon=0.0)  # every target row confident enough: the refinement loss is active
    x_s, y_s, x_t = batch()
    t = method.terms(x_s, y_s, x_t, step=500, r=1.0)
    # the authors' warm-start ramp: 2 (h - l) / (1 + exp(-alpha i / N)) - (h - l) + l, alpha 1, l 0, h 0.1, N 1000
    assert method.grl.coefficient == pytest.approx(2 * 0.1 / (1 + math.exp(-1.0 * 500 / 1000)) - 0.1, rel=1e-12)
    assert t.logs["grl_coeff"] == method.grl.coefficient
    body = (method.backbone, method.bottleneck)
    assert isinstance(t, Losses) and set(t.extra) == {"domain", "sr", "target_logits"}
    domain, sr = t.extra["domain"], t.extra["sr"]
    assert all(reaches(t.cls, m) for m in (*body, method.classifier)) and not reaches(t.cls, method.discriminator)
    assert all(reaches(domain, m) for m in (*body, method.discriminator)) and not reaches(domain, method.classifier)
    assert all(reaches(sr, m) for m in (*body, method.classifier)) and not reaches(sr, method.discriminator)
    assert all(reaches(t.align, m) for m in (*body, method.classifier, method.discriminator))


def test_the_domain_gradient_is_reversed_and_scaled_below_the_discriminator():
    method = make()
    x_s, y_s, x_t = batch()
    params = list(method.bottleneck.parameters())

    def domain_grad(constant: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        method.grl.constant = constant
        torch.manual_seed(5)  # same layer, direction and dropout masks
        t = method.terms(x_s, y_s, x_t, step=700, r=1.0)
        return flat_grad(t.extra["domain"], params), flat_grad(
            t.extra["domain"], list(method.discriminator.parameters())
        )

    method.grl.set_step(700)
    coeff = method.grl.coefficient  # the authors' ramp to 0.1 over 1000 steps with alpha = 1
    assert coeff == pytest.approx(0.2 / (1 + math.exp(-0.7)) - 0.1)
    reversed_, disc_a = domain_grad(None)
    plain, disc_b = domain_grad(-1.0)  # constant -1: the identity in both directions
    torch.testing.assert_close(reversed_, -coeff * plain)
    torch.testing.assert_close(disc_a, disc_b)  # the discriminator is trained plainly


def test_self_refinement_loss_maths():
    g = torch.Generator().manual_seed(0)
    clean, perturbed = torch.randn(6, 4, generator=g) * 2, torch.randn(6, 4, generator=g) * 2
    for clean_first in (True, False):
        a, b = (clean, perturbed) if clean_first else (perturbed, clean)
        p, q = F.softmax(a, dim=1), F.softmax(b, dim=1)
        mask = (p.max(dim=1).values > 0.4).float()
        kl = (p * (p.log() - q.log())).sum(dim=1)
        loss, frac = self_refinement_loss(clean, perturbed, 0.4, clean_first)
        torch.testing.assert_close(loss, (kl * mask).sum() / (mask.sum() + 1e-6))
        assert frac.item() == pytest.approx(mask.mean().item())
    zero, _ = self_refinement_loss(clean, clean.clone(), 0.0)
    assert abs(zero.item()) < 1e-6
    nothing, frac = self_refinement_loss(torch.zeros(3, 4), perturbed[:3], 0.4)  # uniform: masked out
    assert nothing.item() == 0.0 and frac.item() == 0.0


# ----------------------------------------------------------------------------- the perturbation
def test_perturb_target_moves_target_rows_towards_the_reversed_batch_with_a_detached_offset():
    h = torch.randn(5, 3, 2, requires_grad=True)
    out = perturb_target(h, n_source=2, strength=0.3)
    t = h[2:]
    torch.testing.assert_close(out, t + 0.3 * (t.flip(0) - t))
    out.sum().backward()
    expected = torch.zeros_like(h)
    expected[2:] = 1.0  # the offset is detached: each copy's gradient goes to its own clean row only
    torch.testing.assert_close(h.grad, expected)


@pytest.mark.parametrize("layer", [0, 2])
def test_token_perturbation_applies_to_target_rows_only(layer):
    method = make(sr_layers=(layer,))
    x_s, y_s, x_t = batch(n_s=4, n_t=3)
    n_s, n = 4, 7
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        blk.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, (args[0].detach(), out.detach())))
        for i, blk in enumerate(method.backbone.blocks)
    ]
    clean_in: list[torch.Tensor] = []
    hooks.append(
        method.backbone.blocks[layer].register_forward_pre_hook(lambda m, args: clean_in.append(args[0].detach()))
    )  # registered before the method's own hook
    t = method.terms(x_s, y_s, x_t, step=900, r=0.5)
    for h in hooks:
        h.remove()
    assert t.logs["sr_layer"] == layer
    rows = {i: seen[i][0].shape[0] for i in seen}
    assert rows == {i: (n if i < layer else n + 3) for i in range(DEPTH)}
    h = clean_in[0]
    got = seen[layer][0]
    torch.testing.assert_close(got[:n], h)  # source and clean target rows unchanged
    target = h[n_s:]
    torch.testing.assert_close(got[n:], target + 0.3 * 0.5 * (target.flip(0) - target))
    assert not torch.equal(got[n:], target)
    # the hook is gone afterwards: an evaluation forward sees the plain batch
    method.eval()
    assert method(torch.cat((x_s, x_t))).shape == (n, NUM_CLASSES)


def test_input_perturbation_and_the_fallback_for_backbones_without_blocks():
    method = make(sr_layers=(-1,))
    x_s, y_s, x_t = batch(n_s=2, n_t=4)
    inputs: list[torch.Tensor] = []
    hook = method.backbone.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    t = method.terms(x_s, y_s, x_t, step=900, r=1.0)
    hook.remove()
    x = inputs[0]
    assert t.logs["sr_layer"] == -1 and x.shape[0] == 2 + 2 * 4
    torch.testing.assert_close(x[:6], torch.cat((x_s, x_t)))
    torch.testing.assert_close(x[6:], x_t + 0.3 * (x_t.flip(0) - x_t))

    class Tiny(nn.Sequential):  # no transformer blocks: every draw perturbs the input
        def __init__(self):
            super().__init__(nn.Flatten(), nn.Linear(12, 8), nn.ReLU())
            self.out_features = 8

    torch.manual_seed(0)
    cnn = SSRT(Tiny(), 3, 100, bottleneck_dim=8)  # the default layers (0, 4, 8) are accepted
    inputs.clear()
    hook = cnn.backbone.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    x_s, x_t = torch.randn(4, 12), torch.randn(4, 12)
    t = cnn.terms(x_s, torch.tensor([0, 1, 2, 0]), x_t, step=10, r=1.0)
    hook.remove()
    assert t.logs["sr_layer"] == -1 and t.features.shape == (12, 8)
    assert len(inputs) == 1  # one forward: source, target, and the target perturbed at the input
    torch.testing.assert_close(inputs[0], torch.cat((x_s, x_t, x_t + 0.3 * (x_t.flip(0) - x_t))))


# ----------------------------------------------------------------------------- safe training
def test_ramp_chunks_and_the_drop_test():
    assert refinement_ramp(0, 0, 1000) == 0.0
    assert refinement_ramp(500, 0, 1000) == pytest.approx(math.sin(math.pi / 4))
    assert refinement_ramp(1000, 0, 1000) == 1.0 and refinement_ramp(5000, 0, 1000) == 1.0
    assert refinement_ramp(1001, 999, 2000) == pytest.approx(math.sin(2 / 2000 * math.pi / 2))
    values = [3, 1, 4, 1, 5, 9, 2]
    for chunks in (1, 2, 3, 4, 8):
        reference = [part.mean() if len(part) else math.nan for part in np.array_split(np.array(values), chunks)]
        np.testing.assert_allclose(chunk_means(values, chunks), reference)
    assert not diversity_dropped([5, 5, 5, 5], None, levels=2)
    assert diversity_dropped([5, 5, 3, 3], None, levels=1)  # halves 5 -> 3
    assert not diversity_dropped([5, 5, 4, 4], None, levels=1)  # a drop of exactly 1 is not a collapse
    assert not diversity_dropped([5, 5, 3, 3], None, levels=0)  # one part: nothing to compare
    assert diversity_dropped([3, 3, 3, 3], [6, 6, 6, 6], levels=0)  # against the previous period


def authors_check(divs, last, levels):
    """The release's check_div_drop loop, with numpy (reference)."""
    flag = False
    for level in range(levels + 1):
        chunk = 2**level
        parts = [d.mean() if len(d) else float("nan") for d in np.array_split(np.array(divs), chunk)]
        if last is not None:
            prev = [d.mean() if len(d) else float("nan") for d in np.array_split(np.array(last), chunk)]
            parts.insert(0, prev[-1])
        for i in range(len(parts) - 1):
            if parts[i + 1] < parts[i] - 1.0:
                flag = True
    return flag


def test_the_drop_test_matches_the_release_on_random_records():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n, levels = int(rng.integers(1, 20)), int(rng.integers(0, 5))
        divs = rng.integers(1, 8, n).tolist()
        last = rng.integers(1, 8, int(rng.integers(1, 20))).tolist() if rng.random() < 0.5 else None
        assert diversity_dropped(divs, last, levels) == authors_check(divs, last, levels)


def collapse_run(restore_weights: bool = True, restore_optimizer: bool = False, lr: float = 0.0):
    """T = 4, L = 1.  Steps 0-5 healthy, steps 6-7 collapsed (classifier bias), restart at step 8."""
    method = make(
        safe_period=4,
        safe_levels=1,
        sr_layers=(2,),
        head_dropout=0.0,
        bottleneck_dropout=0.0,
        safe_restore_weights=restore_weights,
        safe_restore_optimizer=restore_optimizer,
    )
    with torch.no_grad():  # clearly different classes for different target images
        method.classifier[0].weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(4))
        last = method.classifier[-1].weight
        last.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(4))
        last.sub_(last.mean(dim=1, keepdim=True))  # no class wins on the features' common (ReLU) part
    optimizers = sgd(method, lr=lr, momentum=0.9 if lr else 0.0)
    harmonizer = Harmonizer(mode="gh++", scope=method.scope_modules(), lead="cls")
    g = torch.Generator().manual_seed(7)
    x_s, y_s, x_t = (
        torch.rand(6, 3, 32, 32, generator=g),
        torch.arange(6) % NUM_CLASSES,
        torch.rand(8, 3, 32, 32, generator=g),
    )
    logs, kept = [], {}
    for step in range(9):
        if step == 4:
            kept["params"] = snapshot(method)
        if step == 6:
            kept["bias"] = method.classifier[-1].bias.detach().clone()
            with torch.no_grad():
                method.classifier[-1].bias[0] = 1e4  # forced collapse: every target prediction is class 0
        result = method.update(Batch(x_s, y_s, x_t), StepContext(step, optimizers, harmonizer, 1.0))
        logs.append(result.logs)
        if step == 4:
            kept["snapshot"] = {k: v.clone() for k, v in method.safe.snapshot.items()} if restore_weights else None
            kept["opt"] = copy.deepcopy(method.safe.optimizer_snapshot)
        if step == 7:
            kept["pending"] = method.safe.restore_pending
    return method, optimizers, logs, kept


def test_safe_training_restarts_on_a_forced_collapse():
    method, _, logs, kept = collapse_run(lr=0.0)
    divs = [int(log["target_diversity"]) for log in logs]
    assert min(divs[:6]) >= 4 and divs[6:8] == [1, 1], divs  # healthy, then collapsed
    assert [log["safe_snapshot"] for log in logs] == [1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert [log["safe_collapse"] for log in logs] == [0] * 7 + [1, 0]
    assert kept["pending"] and [log["safe_restored"] for log in logs] == [0] * 8 + [1]
    # the refinement weight drops at the restart: r restarts from 0 at phase 7
    assert logs[7]["sr_r"] == 1.0 and logs[7]["sr_weight"] == pytest.approx(0.2)
    assert logs[8]["sr_r"] == pytest.approx(math.sin(1 / 4 * math.pi / 2))
    assert logs[8]["sr_weight"] == pytest.approx(0.2 * math.sin(math.pi / 8)) and logs[8]["sr_weight"] < 0.2
    assert method.safe.phase == 7 and method.safe.restores == 1 and method.safe.last_restore_step == 8
    assert method.safe.period == 4  # 7 - 0 > 4: the period is not doubled
    assert method.safe.divs_last_period == divs[:4] and method.safe.divs == [divs[8]]
    # the saved state is back (lr = 0: nothing else moved the parameters), and re-saved at step 8
    after = snapshot(method)
    assert all(torch.equal(after[k], kept["params"][k]) for k in after)
    assert method.classifier[-1].bias[0].item() != 1e4
    assert all(torch.equal(method.safe.snapshot[k], kept["snapshot"][k]) for k in kept["snapshot"])


def test_a_second_collapse_soon_after_doubles_the_period():
    method, optimizers, _logs, _ = collapse_run(lr=0.0)
    harmonizer = Harmonizer(mode="gh++", scope=method.scope_modules(), lead="cls")
    g = torch.Generator().manual_seed(7)
    x_s, y_s, x_t = (
        torch.rand(6, 3, 32, 32, generator=g),
        torch.arange(6) % NUM_CLASSES,
        torch.rand(8, 3, 32, 32, generator=g),
    )
    for step in range(9, 12):
        if step == 10:
            with torch.no_grad():
                method.classifier[-1].bias[0] = 1e4
        result = method.update(Batch(x_s, y_s, x_t), StepContext(step, optimizers, harmonizer, 1.0))
    assert result.logs["safe_collapse"] == 1.0
    assert method.safe.phase == 11 and method.safe.period == 8  # 11 - 8 <= 4: doubled


def test_released_behaviour_restarts_the_ramp_without_restoring_weights():
    method, _, logs, _ = collapse_run(restore_weights=False, lr=0.0)
    assert method.safe.snapshot is None and logs[8]["safe_restored"] == 1.0
    assert logs[8]["sr_r"] == pytest.approx(math.sin(math.pi / 8))
    assert method.classifier[-1].bias[0].item() == 1e4  # still collapsed


def test_restart_can_restore_the_optimizer_state_too():
    method, optimizers, logs, kept = collapse_run(restore_optimizer=True, lr=0.01)
    assert logs[8]["safe_restored"] == 1.0
    saved_at_4, saved_at_8 = kept["opt"]["all"], method.safe.optimizer_snapshot["all"]
    assert saved_at_4.keys() == saved_at_8.keys() and saved_at_4
    for index, state in saved_at_4.items():
        torch.testing.assert_close(saved_at_8[index]["momentum_buffer"], state["momentum_buffer"])
    # and the live state is no longer the snapshot's storage (a restore copies)
    live = optimizers["all"].state_dict()["state"]
    assert all(live[i]["momentum_buffer"].data_ptr() != saved_at_8[i]["momentum_buffer"].data_ptr() for i in live)


def test_compute_losses_leaves_the_safe_training_state_alone():
    method = make(safe_period=2)
    x_s, y_s, x_t = batch()
    before = method.safe.to_dict()
    method.compute_losses(x_s, y_s, x_t, step=3)
    assert method.safe.to_dict() == before


# ----------------------------------------------------------------------------- updates with GH
def test_gh_plus_plus_updates_change_parameters_and_stay_finite():
    method = make()
    optimizers = sgd(method)
    harmonizer = Harmonizer(mode="gh++", scope=method.scope_modules(), lead="cls")
    # the weights of each call, from its two losses probed over the ViT here (before the harmonizer's probes)
    expected, backward, scope = [], harmonizer.backward, list(method.backbone.parameters())

    def probed(**kw):
        g_align, g_cls = (flat_grad(kw[loss], scope).double() for loss in ("align", "cls"))
        expected.append(reference_weights(g_align, g_cls, "gh++", lead="cls"))
        return backward(**kw)

    harmonizer.backward = probed
    before = snapshot(method)
    for i, step in enumerate(range(300, 303)):
        x_s, y_s, x_t = batch(seed=i)
        result = method.update(Batch(x_s, y_s, x_t), StepContext(step, optimizers, harmonizer, 1.0))
        assert isinstance(result, UpdateResult) and result.stats.step == i and len(expected) == i + 1
        assert math.isfinite(result.loss_cls) and math.isfinite(result.loss_align)
        assert (result.stats.w_align, result.stats.w_cls) == pytest.approx(expected[i], rel=1e-4)
        assert all(math.isfinite(v) for v in result.logs.values())
    assert harmonizer.calls == 3 and harmonizer.lead == "cls"
    assert moved(before, snapshot(method)) == {"backbone", "bottleneck", "classifier", "discriminator"}
    assert all(torch.isfinite(p).all() for p in method.parameters())


def test_gh_weights_are_the_authors_measured_over_the_vit():
    method = make(sr_epsilon=0.0)
    reference = copy.deepcopy(method)
    x_s, y_s, x_t = batch()
    harmonizer = Harmonizer(mode="gh", scope=method.scope_modules(), lead="cls")
    torch.manual_seed(11)
    result = method.update(Batch(x_s, y_s, x_t), StepContext(600, sgd(method), harmonizer, 1.0))
    torch.manual_seed(11)  # the same draws: layer, KL direction, dropout masks
    t = reference.terms(x_s, y_s, x_t, 600, r=reference.ramp(600))
    params = list(reference.backbone.parameters())
    g1, g2 = flat_grad(t.cls, params), flat_grad(t.align, params)  # loss1 = cls, loss2 = domain + r w sr
    gh1, gh2 = gh_weights(g1, g2)
    assert result.stats.w_cls == pytest.approx(float(gh1), rel=1e-4)
    assert result.stats.w_align == pytest.approx(float(gh2), rel=1e-4)
    assert result.logs["cls_loss"] == pytest.approx(t.cls.item(), rel=1e-5)


def test_plain_update_without_a_harmonizer_is_one_backward_of_the_weighted_sum():
    method = make(sr_epsilon=0.0, safe_period=2)
    reference = copy.deepcopy(method)
    x_s, y_s, x_t = batch()
    optimizers, ref_optimizers = sgd(method), sgd(reference)
    for step in (600, 601):
        torch.manual_seed(step)
        result = method.update(Batch(x_s, y_s, x_t), StepContext(step, optimizers, None, 0.7))
        assert result.stats is None and result.guards == ("plain",)
        assert {"target_diversity", "safe_snapshot", "sr_r"} <= set(result.logs)  # the bookkeeping still runs
        torch.manual_seed(step)  # the same draws: layer, KL direction, dropout masks
        reference._begin_step(step, ref_optimizers)
        t = reference.terms(x_s, y_s, x_t, step)
        ref_optimizers["all"].zero_grad()
        (t.cls + 0.7 * t.align).backward()
        ref_optimizers["all"].step()
        reference._end_step(step, int(t.extra["target_logits"].argmax(dim=1).unique().numel()))
        assert result.loss_cls == pytest.approx(t.cls.item(), rel=1e-6)
    pa, pb = snapshot(method), snapshot(reference)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


# ----------------------------------------------------------------------------- state and resume
def test_state_dict_round_trip_keeps_the_safe_training_state_and_resumes_exactly():
    method = make(safe_period=2, safe_restore_optimizer=True)
    optimizers = sgd(method)
    harmonizer = Harmonizer(mode="gh++", scope=method.scope_modules(), lead="cls")
    for step in range(4):
        x_s, y_s, x_t = batch(seed=step)
        method.update(Batch(x_s, y_s, x_t), StepContext(step, optimizers, harmonizer, 1.0))
    method.safe.restore_pending, method.safe.phase, method.safe.collapses = True, 3, 1  # a restart is due
    buffer = io.BytesIO()
    torch.save({"model": method.state_dict(), "opt": optimizers["all"].state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)  # plain containers only: loads with weights_only=True

    other = make(safe_period=2, safe_restore_optimizer=True)
    other.load_state_dict(saved["model"])
    other_optimizers = sgd(other)
    other_optimizers["all"].load_state_dict(saved["opt"])
    a, b = method.safe, other.safe
    for key in (
        "phase",
        "period",
        "r",
        "restore_pending",
        "last_restore_step",
        "divs",
        "divs_last_period",
        "restores",
        "collapses",
    ):
        assert getattr(a, key) == getattr(b, key), key
    assert a.snapshot.keys() == b.snapshot.keys() and all(torch.equal(a.snapshot[k], b.snapshot[k]) for k in a.snapshot)
    assert a.optimizer_snapshot.keys() == b.optimizer_snapshot.keys()
    assert other.grl.step == method.grl.step

    # both continue identically: the restore and a new snapshot at step 4, the restarted ramp
    other_harmonizer = Harmonizer(mode="gh++", scope=other.scope_modules(), lead="cls")
    logs = []
    for step in range(4, 6):
        x_s, y_s, x_t = batch(seed=step)
        torch.manual_seed(step)
        ra = method.update(Batch(x_s, y_s, x_t), StepContext(step, optimizers, harmonizer, 1.0))
        torch.manual_seed(step)
        rb = other.update(Batch(x_s, y_s, x_t), StepContext(step, other_optimizers, other_harmonizer, 1.0))
        assert ra.logs == rb.logs
        logs.append(ra.logs)
    assert logs[0]["safe_restored"] == 1.0 and logs[0]["safe_snapshot"] == 1.0
    assert logs[0]["sr_r"] == pytest.approx(refinement_ramp(4, 3, method.safe.period)) and logs[0]["sr_r"] < 1
    pa, pb = snapshot(method), snapshot(other)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_trains_and_resumes_exactly_through_the_engine(tmp_path):
    """The engine's checkpoints carry the safe-training state (a LeNet backbone: input perturbation)."""
    from gradharmony.uda.config import TrainConfig
    from gradharmony.uda.data import Domain
    from gradharmony.uda.engine import Trainer, train
    from trainer_faults import sigint_during_step

    def domain(n: int, shift: float, seed: int) -> Domain:
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % 4
        images = torch.rand(n, 1, 16, 16, generator=g) * 60 + shift + labels.view(-1, 1, 1, 1) * 40
        return Domain("d", "train", images.clamp(0, 255).to(torch.uint8), labels, num_classes=4)

    def domains():
        return {
            "source": domain(24, 0, 0),
            "target": domain(24, 60, 1),
            "source_test": domain(8, 0, 2),
            "target_test": domain(8, 60, 3),
        }

    def cfg(path):
        return TrainConfig(
            method="ssrt",
            harmonizer="gh++",
            backbone="lenet",
            image_size=16,
            channels=1,
            bottleneck_dim=16,
            steps=6,
            batch_size=8,
            eval_every=3,
            out=str(path),
            progress=False,
            method_params={"safe_period": 2, "sr_epsilon": 0.0},
        )

    result = train(cfg(tmp_path / "a"), domains())
    assert result["steps"] == 6
    trainer = Trainer(cfg(tmp_path / "b"), domains())
    sigint_during_step(trainer, 3)  # arrives mid-step: the step completes, then a checkpoint
    with pytest.raises(KeyboardInterrupt, match="resume"):
        trainer.run()
    assert train(cfg(tmp_path / "b"), domains())["last_target_acc"] == result["last_target_acc"]
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(v, b[k]) for k, v in a.items() if isinstance(v, torch.Tensor))
    sa, sb = a["_extra_state"], b["_extra_state"]
    assert {k: v for k, v in sa.items() if k != "snapshot"} == {k: v for k, v in sb.items() if k != "snapshot"}
    assert all(torch.equal(v, sb["snapshot"][k]) for k, v in sa["snapshot"].items())
