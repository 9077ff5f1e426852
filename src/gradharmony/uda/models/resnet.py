"""torchvision ResNets (18 / 34 / 50 / 101) as feature extractors: everything up to the pooled features.

The ImageNet classifier ``fc`` is replaced by ``nn.Identity`` (its weights are not loaded), so the
output is the globally averaged last stage: ``out_features`` = 512 (ResNet-18/34) or 2048
(ResNet-50/101).  ImageNet weights (torchvision's ``IMAGENET1K_V1`` by default, the ones TLlib and
the GH authors use through ``pretrained=True``) come from, in order: a local file passed as
``pretrained``, torchvision's download cache (``$TORCH_HOME/hub/checkpoints``), a download (only
with ``download=True``).  Inputs: RGB normalised with ImageNet's mean and std, any size >= 32.

Example:
    >>> import torch
    >>> net = build_resnet("resnet18")            # random weights, offline
    >>> net.out_features, net(torch.rand(1, 3, 64, 64)).shape
    (512, torch.Size([1, 512]))
"""

from __future__ import annotations

from pathlib import Path

import torchvision.models as tvm
from torch import nn

from gradharmony.uda.models.pretrained import (
    PretrainedWeightsNotFoundError,
    hub_checkpoint_path,
    load_weights,
    no_weights_message,
    read_state_dict,
)

RESNETS: dict[str, int] = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _imagenet_state(name: str, weights_name: str, download: bool) -> tuple[dict, str]:
    options = tvm.get_model_weights(name)
    if weights_name not in options.__members__:
        raise ValueError(f"unknown {name} weights {weights_name!r}; torchvision has {', '.join(options.__members__)}")
    weights = options[weights_name]
    cached = hub_checkpoint_path(weights.url)
    if cached.is_file():
        return read_state_dict(cached), str(cached)
    cause = None
    if download:
        try:
            return weights.get_state_dict(progress=False, check_hash=True), weights.url
        except (OSError, RuntimeError) as exc:  # URLError is an OSError; a bad hash is a RuntimeError
            cause = exc
    ways = [
        f'on a machine with internet run `python -c "import torchvision; torchvision.models.{name}'
        f"(weights='{weights_name}')\"` and copy {cached.name} into {cached.parent} "
        "(or point $TORCH_HOME at a folder holding hub/checkpoints/" + cached.name + ")",
        f"download {weights.url} and pass pretrained='/path/to/{cached.name}'",
    ]
    looked = [f"{cached} (torchvision's download cache)"]
    if not download:
        looked.append("(download=False: no download tried)")
    raise PretrainedWeightsNotFoundError(no_weights_message(f"{name} ({weights_name})", looked, ways, cause))


def build_resnet(
    name: str = "resnet50",
    pretrained: bool | str | Path = False,
    *,
    weights_name: str = "IMAGENET1K_V1",
    download: bool = True,
) -> nn.Module:
    """A torchvision ResNet without its classifier, with ``out_features`` and input facts set.

    Args:
        name: ``resnet18``, ``resnet34``, ``resnet50`` or ``resnet101``.
        pretrained: ``False`` (random), ``True`` (torchvision's ImageNet weights ``weights_name``:
            cache, then download if allowed) or the path of a weights file (a torchvision
            checkpoint, with or without ``fc``).
        weights_name: which torchvision weights ``pretrained=True`` means (``IMAGENET1K_V2`` exists
            for ResNet-50/101).
        download: allow downloading when the weights are not cached.

    Raises:
        PretrainedWeightsNotFoundError: the weights are neither on disk nor downloadable.
        ValueError: unknown name, or a weights file that does not fit.
    """
    if name not in RESNETS:
        raise ValueError(f"unknown ResNet {name!r}; choose one of {', '.join(RESNETS)}")
    net = tvm.get_model(name, weights=None)
    net.fc = nn.Identity()
    net.out_features = RESNETS[name]
    net.input_size, net.input_mean, net.input_std = 224, IMAGENET_MEAN, IMAGENET_STD
    net.pretrained_source = None
    if pretrained is None or pretrained is False:
        return net
    if pretrained is True:
        state, source = _imagenet_state(name, weights_name, download)
    else:
        state, source = read_state_dict(pretrained), str(pretrained)
    load_weights(net, state, source, ignore_prefixes=("fc.",))
    net.pretrained_source = source
    return net
