"""Digit backbones, bottleneck, classifier head and domain discriminator: shapes and options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradharmony.uda.models import DTN, Bottleneck, ClassifierHead, DomainDiscriminator, LeNet, build_backbone


@pytest.mark.parametrize("name", ["lenet", "dtn"])
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
    b = Bottleneck(800, 64)
    f = b(torch.randn(5, 800))
    assert f.shape == (5, 64) and (f >= 0).all()
    assert [type(m) for m in b] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert isinstance(Bottleneck(800, 64, dropout=0.5)[-1], nn.Dropout)
    assert b.out_features == 64


def test_classifier_head_variants():
    assert ClassifierHead(64, 10)(torch.randn(3, 64)).shape == (3, 10)
    deep = ClassifierHead(64, 10, hidden=32, dropout=0.5)
    assert [type(m) for m in deep] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert deep(torch.randn(3, 64)).shape == (3, 10)


@pytest.mark.parametrize("batch_norm", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_domain_discriminator(batch_norm, dropout):
    d = DomainDiscriminator(64, hidden=32, batch_norm=batch_norm, dropout=dropout)
    logits = d(torch.randn(6, 64))
    assert logits.shape == (6,)
    kinds = [type(m) for m in d.net]
    assert (nn.BatchNorm1d in kinds) == batch_norm
    assert (nn.Dropout in kinds) == (dropout > 0)
    assert kinds.count(nn.Linear) == 3 and d.net[-1].out_features == 1
    assert not isinstance(d.net[-1], nn.Sigmoid)  # logits, for BCE-with-logits


def test_default_discriminator_width_is_1024():
    d = DomainDiscriminator(256)
    assert d.net[0].out_features == 1024
