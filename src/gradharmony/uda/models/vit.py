"""Vision Transformers from timm (ViT-B/16 for SSRT) as feature extractors: the class-token features.

Built with ``num_classes=0``, so the output is the normalised class token: ``out_features`` = 768
for ViT-B/16 (384 for ViT-S/16, 192 for ViT-Ti/16, handy for cheap runs).  The input size is fixed
when the model is built (``img_size``, default 224); pretrained position embeddings are resampled
by timm when it differs.

timm is an optional dependency, imported only here (``pip install timm``).  ImageNet weights come
from a local file passed as ``pretrained`` (``.safetensors``, ``.pth`` or the original ``.npz``,
loaded through timm so its checkpoint conversions apply) or, with ``pretrained=True``, from timm's
sources: the Hugging Face cache (``$HF_HOME/hub``, default ``~/.cache/huggingface/hub``; needs the
``huggingface_hub`` package) or a download.  timm's default ``vit_base_patch16_224`` weights are
``augreg2_in21k_ft_in1k`` and expect inputs normalised with mean = std = 0.5 (``input_mean`` /
``input_std``); SSRT used the ImageNet-21k-pretrained, ImageNet-1k fine-tuned ViT-B/16 too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from gradharmony.uda.models.pretrained import PretrainedWeightsNotFoundError, no_weights_message

VITS: dict[str, int] = {"vit_base_patch16_224": 768, "vit_small_patch16_224": 384, "vit_tiny_patch16_224": 192}
TIMM_PIN = "timm==1.0.31"


def import_timm() -> Any:
    """The ``timm`` module, or an ImportError that says how to install it."""
    try:
        import timm
    except ImportError as exc:
        raise ImportError(
            f"ViT backbones need timm, which is not installed: pip install {TIMM_PIN} "
            "(plus huggingface_hub to download ImageNet weights)"
        ) from exc
    return timm


def build_vit(
    name: str = "vit_base_patch16_224",
    pretrained: bool | str | Path = False,
    *,
    img_size: int = 224,
    drop_path_rate: float = 0.0,
    **timm_kwargs: Any,
) -> nn.Module:
    """A timm ViT without its classifier, with ``out_features`` and input facts set.

    Args:
        name: a timm model name, optionally with a weights tag
            (``vit_base_patch16_224.augreg_in21k_ft_in1k``); :data:`VITS` lists the registered ones.
        pretrained: ``False`` (random), ``True`` (timm's cache or download) or a weights file.
        img_size: the input side the model accepts.
        drop_path_rate: stochastic depth (0 as in SSRT's default).
        timm_kwargs: passed to ``timm.create_model``.

    Raises:
        ImportError: timm is not installed.
        PretrainedWeightsNotFoundError: the weights are neither on disk nor downloadable.
    """
    timm = import_timm()
    kwargs = dict(num_classes=0, img_size=img_size, drop_path_rate=drop_path_rate, **timm_kwargs)
    source = None
    if pretrained is None or pretrained is False:
        net = timm.create_model(name, pretrained=False, **kwargs)
    elif pretrained is True:
        try:
            net = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:  # hub and download errors come in many types (OSError, RuntimeError, HTTP...)
            raise PretrainedWeightsNotFoundError(
                no_weights_message(
                    f"timm {name}",
                    ["the Hugging Face cache ($HF_HOME/hub) and timm's download sources"],
                    [
                        f"on a machine with internet run `python -c \"import timm; timm.create_model('{name}', "
                        'pretrained=True)"` and copy the cache folder ($HF_HOME/hub, default '
                        "~/.cache/huggingface/hub) to this machine (needs huggingface_hub installed)",
                        "download the weights file (.safetensors / .pth / .npz) and pass pretrained='/path/to/file'",
                    ],
                    exc,
                )
            ) from exc
        source = str(net.pretrained_cfg.get("hf_hub_id") or net.pretrained_cfg.get("url") or name)
    else:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise PretrainedWeightsNotFoundError(f"weights file {path} for timm {name} does not exist")
        net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        source = str(path)
    net.out_features = int(net.num_features)
    net.input_size = img_size
    net.input_mean = tuple(net.pretrained_cfg.get("mean", (0.5, 0.5, 0.5)))
    net.input_std = tuple(net.pretrained_cfg.get("std", (0.5, 0.5, 0.5)))
    net.pretrained_source = source
    return net
