"""Exact GH across processes: 2 gloo processes on CPU equal one process on the concatenated batch."""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from gh_reference import gh_weights_of
from gradharmony import GradientReversal, Harmonizer

CASES = [
    ("gh", "reweight", "full"),
    ("gh", "recombine", "full"),
    ("gh++", "recombine", "bottleneck"),
    ("gh++exact", "features", "full"),
    ("gh", "recombine", "refresh"),
]


class Net(nn.Module):
    """DANN-like, without batch norm (whose statistics are per process by design)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(10, 16), nn.Tanh())
        self.bottleneck = nn.Sequential(nn.Linear(16, 8), nn.Tanh())
        self.classifier = nn.Linear(8, 3)
        self.grl = GradientReversal(max_steps=10)
        self.grl.set_step(5)
        self.discriminator = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))

    def losses(self, xs, ys, xt):
        h = self.backbone(torch.cat([xs, xt]))
        f = self.bottleneck(h)
        cls = nn.functional.cross_entropy(self.classifier(f[: len(xs)]), ys)
        domain = torch.cat([torch.ones(len(xs)), torch.zeros(len(xt))]).double()
        align = nn.functional.binary_cross_entropy_with_logits(self.discriminator(self.grl(f)).squeeze(1), domain)
        return cls, align, f, h


def data(world: int = 2, per_rank: int = 6):
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(world * per_rank, 10, generator=g, dtype=torch.float64)
    xt = torch.randn(world * per_rank, 10, generator=g, dtype=torch.float64) + 0.7
    ys = torch.randint(0, 3, (world * per_rank,), generator=g)
    return xs, ys, xt


def train_steps(model, xs, ys, xt, mode, strategy, scope_kind, steps=3):
    torch.manual_seed(0)
    scope = [model.bottleneck] if scope_kind == "bottleneck" else [model.backbone, model.bottleneck, model.classifier]
    h = Harmonizer(mode=mode, scope=scope, strategy=strategy, refresh_every=2 if scope_kind == "refresh" else 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    weights = []
    for _ in range(steps):
        opt.zero_grad()
        cls, align, f, hidden = model.losses(xs, ys, xt)
        cut = hidden if scope_kind == "bottleneck" else f
        s = h.backward(cls=cls, align=align, trade_off=0.8, features=cut)
        weights.append((s.w_align, s.w_cls))
        opt.step()
    return weights, [p.detach().clone() for p in model.parameters()]


def exit_without_finalization(queue) -> None:
    """Flush what this worker queued, then end it with exit code 0, skipping interpreter teardown.

    Rarely (seen once, on CI), a gloo thread torn down during interpreter
    finalization aborts the process with "terminate called without an active exception", after
    its results are queued and its group destroyed. That would fail a test whose work was right.
    """
    queue.close()
    queue.join_thread()
    os._exit(0)


@contextmanager
def gloo_group(rank, world, init_file, queue):
    """The body runs as process ``rank`` of a gloo group, one thread; all leave together.

    A body that raises ends the process with its traceback and a non-zero exit code, as usual.
    """
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    yield
    dist.barrier()
    dist.destroy_process_group()
    exit_without_finalization(queue)


def run_two_processes(target, tmp_path, *args, timeout=120):
    """``target(rank, 2, init_file, *args, queue)`` in 2 spawned processes; what they queued, by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, 2, str(tmp_path / "init"), *args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=timeout) for _ in procs), key=lambda item: item[0])
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def initial_net():
    torch.manual_seed(0)
    return Net().double()


def _worker(rank, world, init_file, case, queue):
    # Each process builds its own model: tensors handed to a spawned process share its memory.
    with gloo_group(rank, world, init_file, queue):
        xs, ys, xt = data(world)
        n = len(xs) // world
        part = slice(rank * n, (rank + 1) * n)
        weights, params = train_steps(initial_net(), xs[part], ys[part], xt[part], *case)
        queue.put((rank, weights, [p.numpy() for p in params]))  # numpy: no shared-memory handles


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_two_processes_equal_one_process_on_the_concatenated_batch(case, tmp_path):
    single_weights, single_params = train_steps(initial_net(), *data(), *case)
    assert any(w != (1.0, 1.0) for w in single_weights), "the case must harmonize something"
    for _, weights, params in run_two_processes(_worker, tmp_path, case):
        flat = [w for pair in weights for w in pair]
        assert flat == pytest.approx([w for pair in single_weights for w in pair], rel=1e-9)
        for a, b in zip(params, single_params):
            assert torch.allclose(torch.from_numpy(a), b, atol=1e-5, rtol=0)


def test_exact_mode_without_a_process_group_is_a_clear_error():
    h = Harmonizer(mode="gh", scope=nn.Linear(2, 2), distributed="exact")
    w = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        h.backward(cls=w(torch.ones(1, 2)).sum(), align=w(torch.ones(1, 2)).sum())


def test_unknown_distributed_mode_is_rejected():
    with pytest.raises(ValueError, match="distributed"):
        Harmonizer(scope=nn.Linear(2, 2), distributed="ring")


# ----------------------------------------------------------------------------- multi-step methods
# MCD's entropy term is the entropy of the batch's mean prediction, a per-process quantity under
# data parallelism: it is off here so that the two-process loss is the concatenated batch's.
# DWL's pseudo-label phase weighs by the batch's mean entropy (per process): phase 4 is off, and a
# window of one step makes the dynamic weight move every step, from statistics summed over processes.
MULTI_STEP = {
    "mcd": {"num_k": 2, "head_hidden": 0, "entropy_weight": 0.0},
    "gvb": {"disc_hidden": 8, "disc_dropout": 0.0},
    "dwl": {"num_k1": 1, "num_k3": 2, "num_k4": 0, "disc_hidden": 8, "disc_dropout": 0.0, "stats_window": 1},
}
# GVB-GD (like CDAN+E) normalises its entropy weights by the mean over the local batch, so its
# data-parallel loss is not the loss of the concatenated batch: there both processes get the same
# half, which must give exactly the single-process update on that half (nothing counted twice).
SAME_HALF = {"gvb"}


class TinyBackbone(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(10, 16), nn.Tanh())
        self.out_features = 16


def multi_step_method(name):
    from gradharmony.uda.methods import build_method

    torch.manual_seed(0)
    method = build_method(name, TinyBackbone(), 3, 100, bottleneck_dim=8, **MULTI_STEP[name])
    method.bottleneck = nn.Sequential(nn.Linear(16, 8), nn.Tanh())  # no batch norm: statistics per process
    return method.double().train()


# ----------------------------------------------------------------------------- one step by hand
class HandSGD:
    """``torch.optim.SGD`` written out: ``buf = g`` at first, then ``m buf + g``; ``p -= lr buf`` (``g`` if m = 0)."""

    def __init__(self, method, lr=0.1, momentum=0.9):
        groups = [g for gs in method.optimizer_groups(lr).values() for g in gs]
        self.hyper = {p: (g["lr"], g.get("momentum", momentum)) for g in groups for p in g["params"]}
        self.buffers = {}

    def step(self, loss, params):
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is None:
                    continue
                lr, momentum = self.hyper[p]
                if momentum:
                    g = g.clone() if p not in self.buffers else momentum * self.buffers[p] + g
                    self.buffers[p] = g
                p -= lr * g


def gh_by_hand(align, cls, scope, plain):
    """GH's ``(w_align, w_cls)`` from the two gradients over ``scope`` (1, 1 without conflict, or plain)."""
    return (1.0, 1.0) if plain else gh_weights_of(align, cls, scope)


def params_of(*modules):
    return [p for m in modules for p in m.parameters()]


def discrepancy(a, b):
    return (a.softmax(dim=1) - b.softmax(dim=1)).abs().mean()


def mcd_by_hand(m, xs, ys, xt, plain, sgd):
    """Steps A, B (GH over the generator, the classifiers step) and C x num_k (2); trade-off 1, no entropy term."""
    n, x = len(xs), torch.cat((xs, xt))
    generator, heads = params_of(m.backbone, m.bottleneck), params_of(m.classifier, m.classifier2)

    def forward():
        f = m.features(x)
        y1, y2 = m.classifier(f), m.classifier2(f)
        return F.cross_entropy(y1[:n], ys) + F.cross_entropy(y2[:n], ys), discrepancy(y1[n:], y2[n:])

    sgd.step(forward()[0], generator + heads)
    loss, disc = forward()
    w_align, w_cls = gh_by_hand(-disc, loss, generator, plain)
    sgd.step(w_cls * loss - w_align * disc, heads)
    for _ in range(2):
        sgd.step(forward()[1], generator)


def gvb_by_hand(m, xs, ys, xt, plain, sgd):
    """One step of the authors' total loss, GH on (align, cls) and on (bridge_g, bridge_d) over the base network."""
    t = m._terms(xs, ys, xt, 0)
    scope = params_of(m.backbone, m.bottleneck, m.classifier)
    bridge_g, bridge_d = t.extra["bridge_g"], t.extra["bridge_d"]
    w1, w2 = gh_by_hand(t.align, t.cls, scope, plain)
    w3, w4 = gh_by_hand(bridge_g, bridge_d, scope, plain)
    sgd.step(w1 * t.align + w2 * t.cls + w3 * bridge_g + w4 * bridge_d, list(m.parameters()))


def dwl_by_hand(m, xs, ys, xt, plain, sgd):
    """Phases 1, 2a, 2b and 3 x num_k3 (2) of DWL's docstring at T = 0.5 (the first window); no phase 4."""
    weight = 0.5
    generator, clf = params_of(m.backbone, m.bottleneck), params_of(m.classifier)
    heads = (m.classifier, m.classifier1, m.classifier2)

    def domain(f_s, f_t):  # the authors' BCE(sigmoid(D_s), sigmoid(D_t)), target detached
        d_s, d_t = m.discriminator(f_s).squeeze(-1), m.discriminator(f_t).squeeze(-1)
        return F.binary_cross_entropy_with_logits(d_s, torch.sigmoid(d_t).detach())

    sgd.step(F.cross_entropy(m.classifier(m.features(xs)), ys), generator + clf)
    with torch.no_grad():
        f_s, f_t = m.features(xs), m.features(xt)
    sgd.step(m.disc_weight * domain(f_s, f_t), params_of(m.discriminator))
    ce3 = sum(F.cross_entropy(c(f_s), ys) for c in heads)
    sgd.step(ce3 - discrepancy(m.classifier1(f_t), m.classifier2(f_t)), params_of(m.classifier1, m.classifier2) + clf)
    for _ in range(2):
        f_s, f_t = m.features(xs), m.features(xt)
        adv = -m.adv_weight * domain(f_s, f_t)
        y, y1, y2 = (c(f_t) for c in heads)
        dis = discrepancy(y1, y2) + discrepancy(y, y1) + discrepancy(y, y2)
        w_align, w_cls = gh_by_hand(adv, dis, generator, plain)
        sgd.step(weight * w_align * adv + (1 - weight) * w_cls * dis, generator)


BY_HAND = {"mcd": mcd_by_hand, "gvb": gvb_by_hand, "dwl": dwl_by_hand}


def multi_step_updates(method, xs, ys, xt, steps=3, plain=False):
    """``steps`` updates through the one contract; ``plain``: no harmonizer (plain training)."""
    from gradharmony.uda.methods import Batch, StepContext

    optimizers = {
        name: torch.optim.SGD(groups, lr=0.1, momentum=0.9) for name, groups in method.optimizer_groups(0.1).items()
    }
    h = None if plain else Harmonizer(mode="gh", scope=method.scope_modules(), lead=method.default_lead)
    for step in range(steps):
        method.update(Batch(xs, ys, xt), StepContext(step, optimizers, h, 1.0))
    return [p.detach().clone() for p in method.parameters()]


def _multi_step_worker(rank, world, init_file, name, plain, queue):
    with gloo_group(rank, world, init_file, queue):
        xs, ys, xt = data(world)
        n = len(xs) // world
        part = slice(0, n) if name in SAME_HALF else slice(rank * n, (rank + 1) * n)
        method = multi_step_method(name)
        params = multi_step_updates(method, xs[part], ys[part], xt[part], plain=plain)
        state = method.dwl_state.numpy().copy() if name == "dwl" else None
        queue.put((rank, [p.numpy() for p in params], state))


@pytest.mark.parametrize(
    "name, plain",
    [(name, False) for name in sorted(MULTI_STEP)] + [("mcd", True)],
    ids=[*sorted(MULTI_STEP), "mcd-plain"],
)
def test_multi_step_methods_in_two_processes_equal_one_process(name, plain, tmp_path):
    before = [p.detach().clone() for p in multi_step_method(name).parameters()]
    xs, ys, xt = data()
    n = len(xs) // 2 if name in SAME_HALF else len(xs)
    single = multi_step_updates(multi_step_method(name), xs[:n], ys[:n], xt[:n], plain=plain)
    assert any(not torch.equal(a, b) for a, b in zip(before, single))
    # the reference's first step is the update written out by hand (phases, GH weights, momentum SGD)
    first = multi_step_updates(multi_step_method(name), xs[:n], ys[:n], xt[:n], steps=1, plain=plain)
    by_hand = multi_step_method(name)
    BY_HAND[name](by_hand, xs[:n], ys[:n], xt[:n], plain, HandSGD(by_hand))
    for a, b in zip(first, by_hand.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=1e-9, atol=1e-12)
    for _, params, _ in run_two_processes(_multi_step_worker, tmp_path, name, plain):
        for a, b in zip(params, single):
            assert torch.allclose(torch.from_numpy(a), b, atol=1e-5, rtol=0)


def test_dwl_window_statistics_are_the_global_batchs(tmp_path):
    """Besides equal parameters: the dynamic weight's state after 3 windows equals one process's."""
    single = multi_step_method("dwl")
    multi_step_updates(single, *data())
    states = [state for _, _, state in run_two_processes(_multi_step_worker, tmp_path, "dwl", False)]
    from gradharmony.uda.methods.dwl import WINDOWS

    assert single.dwl_state[WINDOWS] == 3
    for state in states:
        assert torch.allclose(torch.from_numpy(state), single.dwl_state, atol=1e-9, rtol=1e-7)


def _diversity_worker(rank, world, init_file, queue):
    from gradharmony.distributed import gather_rows, resolve_world

    with gloo_group(rank, world, init_file, queue):
        predicted = torch.tensor([0, 1, 1]) if rank == 0 else torch.tensor([2, 2, 1])
        queue.put((rank, gather_rows(predicted, resolve_world("auto")).tolist()))


def test_gathered_predictions_give_the_global_batchs_diversity(tmp_path):
    """SSRT decides its restarts from the distinct classes predicted on the whole global batch."""
    for _, rows in run_two_processes(_diversity_worker, tmp_path, timeout=60):
        assert rows == [0, 1, 1, 2, 2, 1] and len(set(rows)) == 3  # each process alone sees 2


def test_a_method_that_declares_a_blocker_is_refused_in_several_processes(tmp_path, monkeypatch):
    from gradharmony.uda.config import ConfigError, TrainConfig
    from gradharmony.uda.engine import loop

    monkeypatch.setattr(loop, "init_distributed", lambda device: (0, 2, False))
    blocked = type("Blocked", (nn.Module,), {"distributed_blocker": "its statistics stay per process"})
    monkeypatch.setattr(loop, "build_model", lambda cfg, *args: blocked())
    cfg = TrainConfig(method="mcc", out=str(tmp_path / "run"), progress=False)
    with pytest.raises(ConfigError, match="cannot train in several processes: its statistics stay per process"):
        loop.Trainer(cfg, domains=_tiny_engine_domains())


def _tiny_engine_domains():
    from gradharmony.uda.data.domain import Domain

    images, labels = torch.zeros(4, 1, 16, 16, dtype=torch.uint8), torch.arange(4) % 2
    return {key: Domain(key, "train", images, labels, 2) for key in ("source", "target", "source_test", "target_test")}


def test_sync_batchnorm_converts_every_batch_norm_and_refuses_the_cpu(tmp_path, monkeypatch):
    from gradharmony.uda.config import ConfigError, TrainConfig
    from gradharmony.uda.engine import loop, process

    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Sequential(nn.BatchNorm1d(8)))
    model[1].running_mean.fill_(0.25)
    converted = process.synchronised_batch_norm(model, torch.device("cuda"))  # converting needs no GPU
    norms = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 2 and all(isinstance(m, nn.SyncBatchNorm) for m in norms)
    assert torch.equal(converted[1].running_mean, torch.full((8,), 0.25))
    with pytest.raises(ConfigError, match="needs CUDA"):
        process.synchronised_batch_norm(model, torch.device("cpu"))
    monkeypatch.setattr(loop, "init_distributed", lambda device: (0, 2, False))
    cfg = TrainConfig(
        method="mcc",
        out=str(tmp_path / "run"),
        progress=False,
        sync_batchnorm=True,
        image_size=16,
        channels=1,
        bottleneck_dim=4,
    )
    with pytest.raises(ConfigError, match="sync_batchnorm needs CUDA"):
        loop.Trainer(cfg, domains=_tiny_engine_domains())
