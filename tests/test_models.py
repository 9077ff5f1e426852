"""Digit backbones, bottleneck, classifier head and domain discriminator: shapes and options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradharmony.uda.models import DTN, Bottleneck, ClassifierHead, DomainDiscriminator, LeNet, LeNet500, build_backbone


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def normalise(layer: nn.BatchNorm1d, x: torch.Tensor, training: bool) -> torch.Tensor:
    """Batch statistics (biased variance) in training, the running ones in evaluation; then the affine map."""
    mean, var = (x.mean(0), x.var(0, unbiased=False)) if training else (layer.running_mean, layer.running_var)
    return (x - mean) / torch.sqrt(var + layer.eps) * layer.weight + layer.bias


@pytest.mark.parametrize("name", ["lenet", "lenet500", "dtn"])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("image_size", [28, 32])
def test_backbone_out_features_match_the_output(name, in_channels, image_size):
    net = build_backbone(name, in_channels, image_size)
    out = net(torch.rand(3, in_channels, image_size, image_size))
    assert out.shape == (3, net.out_features)


def test_known_out_features():
    assert LeNet(1, 28).out_features == 50 * 4 * 4
    assert LeNet(3, 32).out_features == 50 * 5 * 5
    assert DTN(3, 32).out_features == 256 * 4 * 4
    assert DTN(1, 28).out_features == 256 * 4 * 4


def test_lenet500_is_tllibs_digit_lenet():
    """TLlib's ``lenet``: the two convolutions, then Linear(800, 500) - ReLU - Dropout(0.5); 426,070 weights."""
    net = LeNet500(1, 28)
    layers = list(net)
    assert [type(m) for m in layers[-3:]] == [nn.Linear, nn.ReLU, nn.Dropout]
    assert (layers[-3].in_features, layers[-3].out_features, layers[-1].p) == (800, 500, 0.5)
    convolutions = sum(p.numel() for m in layers[:-3] for p in m.parameters())
    assert convolutions == (1 * 20 * 25 + 20) + (20 * 50 * 25 + 50)
    assert sum(p.numel() for p in net.parameters()) == convolutions + 800 * 500 + 500
    assert net.out_features == 500 and net(torch.rand(2, 1, 28, 28)).shape == (2, 500)


def test_build_backbone_names():
    assert isinstance(build_backbone("LeNet", 1, 28), LeNet)
    assert isinstance(build_backbone("dtn", 3, 32), DTN)
    with pytest.raises(ValueError, match="lenet"):
        build_backbone("resnet9000", 3, 32)


def test_lenet_rejects_too_small_images():
    with pytest.raises(ValueError, match="at least 16"):
        LeNet(1, 8)


def test_backbones_have_the_literature_layers():
    lenet = LeNet(1, 28)
    convs = [m for m in lenet if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(1, 20, (5, 5)), (20, 50, (5, 5))]
    assert any(isinstance(m, nn.Dropout2d) for m in lenet)
    dtn = DTN(3, 32)
    convs = [m for m in dtn if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256]
    assert all(c.stride == (2, 2) and c.padding == (2, 2) and c.kernel_size == (5, 5) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in dtn) == 3


def test_bottleneck():
    torch.manual_seed(0)
    b = Bottleneck(800, 64)
    with torch.no_grad():  # not the initial affine map, so that a skipped or misplaced layer shows
        b[1].weight.uniform_(0.5, 1.5)
        b[1].bias.uniform_(-0.5, 0.5)
    x = torch.randn(5, 800)
    f = b(x)
    assert f.shape == (5, 64) and (f >= 0).all() and (f == 0).any()
    torch.testing.assert_close(f, torch.relu(normalise(b[1], linear(b[0], x), training=True)))
    assert [type(m) for m in b] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert b.out_features == 64
    # evaluation: the running statistics that training forward left (momentum 0.1, unbiased variance)
    h = linear(b[0], x)
    torch.testing.assert_close(b[1].running_mean, 0.1 * h.mean(0))
    torch.testing.assert_close(b[1].running_var, 0.9 + 0.1 * h.var(0, unbiased=True))
    torch.testing.assert_close(b.eval()(x), torch.relu(normalise(b[1], h, training=False)))
    dropped = Bottleneck(800, 64, dropout=0.5)
    assert isinstance(dropped[-1], nn.Dropout) and dropped[-1].p == 0.5
    torch.manual_seed(1)
    out = dropped(x)
    torch.manual_seed(1)  # the same mask, applied by hand after the ReLU
    mask = torch.nn.functional.dropout(torch.ones(5, 64), 0.5, training=True)
    torch.testing.assert_close(out, torch.relu(normalise(dropped[1], linear(dropped[0], x), training=True)) * mask)


def test_classifier_head_variants():
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    head = ClassifierHead(64, 10)
    assert [type(m) for m in head] == [nn.Linear] and head(x).shape == (3, 10)
    torch.testing.assert_close(head(x), linear(head[0], x))
    deep = ClassifierHead(64, 10, hidden=32, dropout=0.5)
    assert [type(m) for m in deep] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear] and deep[2].p == 0.5
    assert (deep[0].out_features, deep[3].in_features, deep[3].out_features) == (32, 32, 10)
    torch.manual_seed(1)
    out = deep(x)
    torch.manual_seed(1)  # the same dropout mask, drawn by hand for the hidden layer
    mask = torch.nn.functional.dropout(torch.ones(3, 32), 0.5, training=True)
    assert out.shape == (3, 10)
    torch.testing.assert_close(out, linear(deep[3], torch.relu(linear(deep[0], x)) * mask))
    torch.testing.assert_close(deep.eval()(x), linear(deep[3], torch.relu(linear(deep[0], x))))  # no dropout


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_domain_discriminator(batch_norm, dropout):
    torch.manual_seed(0)
    d = DomainDiscriminator(64, hidden=32, batch_norm=batch_norm, dropout=dropout)
    x = torch.randn(6, 64)
    logits = d(x)
    assert logits.shape == (6,)
    linears = [m for m in d.net if isinstance(m, nn.Linear)]
    norms = [m for m in d.net if isinstance(m, nn.BatchNorm1d)]

    def by_hand(training: bool) -> torch.Tensor:  # two Linear - [BN] - ReLU blocks, then Linear -> 1
        h = x
        for i in range(2):
            h = linear(linears[i], h)
            h = torch.relu(normalise(norms[i], h, training) if batch_norm else h)
        return linear(linears[2], h).squeeze(-1)

    if dropout == 0:  # training: the batch statistics
        torch.testing.assert_close(logits, by_hand(training=True))
    d.eval()  # evaluation: the running statistics, no dropout
    torch.testing.assert_close(d(x), by_hand(training=False))
    kinds = [type(m) for m in d.net]
    assert (nn.BatchNorm1d in kinds) == batch_norm
    assert (nn.Dropout in kinds) == (dropout > 0)
    assert kinds.count(nn.Linear) == 3 and d.net[-1].out_features == 1
    assert not isinstance(d.net[-1], nn.Sigmoid)  # logits, for BCE-with-logits


def test_default_discriminator_width_is_1024():
    d = DomainDiscriminator(256)
    assert d.net[0].out_features == 1024
