"""Everything a run is built from, given its config: device, model, harmonizer, optimizers.

:func:`load_run` rebuilds a trained model from a checkpoint (used by ``gradharmony eval`` and the
t-SNE plot).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gradharmony.harmonizer import Harmonizer
from gradharmony.uda.config import ConfigError, TrainConfig
from gradharmony.uda.engine.checkpoint import CheckpointError, load_checkpoint
from gradharmony.uda.methods import Method, build_method
from gradharmony.uda.models import FEATURE_BACKBONES, build_backbone
from gradharmony.uda.models.backbones import IMAGE_BACKBONE_NAMES, build_image_backbone


def resolve_device(name: str) -> torch.device:
    """The device a config's ``device`` names: ``auto`` is CUDA when available, else the CPU.

    ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` are taken as given; an unknown name, or a device this
    machine does not have, is a :class:`ConfigError` saying what it has.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(
            f"unknown device {name!r}; use auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} requested but CUDA is not available on this machine (use --device auto or cpu)"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device {name!r} requested but this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} requested but MPS (Apple GPU) is not available on this machine")
    return device


def build_harmonizer(cfg: TrainConfig, method: Method) -> Harmonizer:
    scopes = {
        "default": method.scope_modules(),
        "bottleneck": [method.bottleneck],
        "heads": [method.bottleneck, method.classifier],
        "backbone": [method.backbone],
        "all": None,
    }
    lead = method.default_lead if cfg.lead == "default" else cfg.lead
    return Harmonizer(
        mode=cfg.harmonizer,
        scope=scopes[cfg.scope],
        strategy=cfg.strategy,
        k=cfg.k,
        lead=lead,
        refresh_every=cfg.refresh_every,
        max_weight=cfg.max_weight,
    )


def build_model(cfg: TrainConfig, num_classes: int, input_shape: tuple[int, ...]) -> Method:
    """The method with its backbone; ``input_shape`` is one example's shape (C, H, W) or (D,)."""
    if cfg.backbone in FEATURE_BACKBONES:
        if len(input_shape) != 1:
            raise ConfigError(f"backbone {cfg.backbone!r} takes feature vectors; {cfg.source} holds images")
        backbone = FEATURE_BACKBONES[cfg.backbone](input_shape[0])
    else:
        if len(input_shape) != 3:
            raise ConfigError(
                f"backbone {cfg.backbone!r} takes images; {cfg.source} holds feature vectors (use --backbone mlp)"
            )
        if cfg.backbone in IMAGE_BACKBONE_NAMES:
            if cfg.channels != 3:
                raise ConfigError(f"{cfg.backbone} takes RGB images: set channels: 3")
            # Inputs are in [-1, 1], which is what EfficientNet-Lite's weights expect ((x - 127) / 128);
            # ResNet/ViT weights expect ImageNet statistics, close to it after their first batch norm.
            pretrained = {None: False, "imagenet": True}.get(cfg.pretrained, cfg.pretrained)
            backbone = build_image_backbone(cfg.backbone, pretrained=pretrained)
        else:
            backbone = build_backbone(cfg.backbone, in_channels=cfg.channels, image_size=cfg.image_size)
    return build_method(
        cfg.method, backbone, num_classes, max_steps=cfg.steps, bottleneck_dim=cfg.bottleneck_dim, **cfg.method_params
    )


def build_optimizers(cfg: TrainConfig, model: Method) -> dict[str, torch.optim.Optimizer]:
    """One SGD per named group set: a single one, or several for multi-step methods (MCD)."""
    groups = model.optimizer_groups(cfg.lr)
    return {
        name: torch.optim.SGD(g, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
        for name, g in groups.items()
    }


@dataclass
class LoadedRun:
    """A trained model rebuilt from a checkpoint, with the config it was trained with."""

    cfg: TrainConfig
    model: Method
    step: int


def run_config(state: dict, path: str | Path) -> TrainConfig:
    """The configuration a run checkpoint was trained with (``state``: read by :func:`load_checkpoint`).

    A checkpoint without one, or with one this version refuses, is a :class:`CheckpointError`.
    """
    try:
        return TrainConfig.from_dict(state["config"])
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(
            f"checkpoint {path} is not a gradharmony run checkpoint (it holds no run configuration)"
        ) from None
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path} holds a configuration this version cannot use: {e}") from None


def load_run(
    checkpoint: str | Path,
    num_classes: int,
    input_shape: tuple[int, ...],
    device: torch.device | str = "cpu",
    state: dict | None = None,
) -> LoadedRun:
    """Rebuild the model of ``checkpoint`` (read safely: tensors and plain types only), in eval mode.

    ``num_classes`` and ``input_shape`` (one example's shape) come from the data it will be
    evaluated on; a mismatch with the trained weights is a :class:`CheckpointError`.  ``state``:
    the checkpoint already read by :func:`load_checkpoint` (it is then not read again).
    """
    path = Path(checkpoint)
    state = load_checkpoint(path) if state is None else state
    cfg = run_config(state, path)
    try:
        step = int(state["step"])
        model_state = state["model"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is not a gradharmony run checkpoint ({e})") from None
    model = build_model(cfg, num_classes, input_shape).to(device)
    try:
        model.load_state_dict(model_state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit a {cfg.method} model on this data: {first}") from None
    model.eval()
    return LoadedRun(cfg=cfg, model=model, step=step)
