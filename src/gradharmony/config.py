"""The resolved configuration of one training run: defaults, YAML recipes, overrides, validation.

A run is fully described by a :class:`TrainConfig`; it is saved next to the results, and its hash
(over the fields that change the outcome) keys resumable runs and sweeps.

Example:
    >>> cfg = TrainConfig(method="dann", harmonizer="gh++", steps=100)
    >>> cfg.with_overrides({"seed": 3}).seed
    3
    >>> TrainConfig.from_dict({"stepz": 10})
    Traceback (most recent call last):
    ...
    gradharmony.config.ConfigError: unknown config key 'stepz' (did you mean 'steps'?)
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gradharmony.harmonize import LEADS, check_mode
from gradharmony.harmonizer import STRATEGIES

SCOPES = ("default", "bottleneck", "backbone", "all")
# Fields that do not change the outcome of a run: excluded from its hash.
NON_OUTCOME_FIELDS = ("out", "data_root", "progress", "threads", "device", "checkpoint_every", "loader_workers",
                      "tensorboard")
# Fields added after runs were first keyed by their hash: left out of the hash while at these
# defaults, so that run folders named by earlier versions keep their names (and resume).
ADDED_FIELD_DEFAULTS: dict[str, Any] = {"pretrained": None, "amp": "none", "resize": 256, "crop": 224,
                                        "sync_batchnorm": False}


class ConfigError(ValueError):
    """A configuration value or key that cannot be used, with what would be accepted."""


def _check_image_domain(role: str, name: str) -> None:
    from gradharmony.data.benchmarks import get_benchmark

    benchmark, domain = name.split(":", 1)
    try:
        get_benchmark(benchmark).domain(domain)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{role} {name!r}: {e}") from None


@dataclass
class TrainConfig:
    # what to train
    method: str = "dann"
    source: str = "mnist"
    target: str = "mnistm-synth"
    backbone: str = "lenet"
    pretrained: str | None = None  # image backbones: "imagenet" (the standard weights) or a weights file
    image_size: int = 32
    channels: int = 3
    resize: int = 256  # image benchmarks (source "benchmark:domain"): resize, then crop
    crop: int = 224
    bottleneck_dim: int = 256
    method_params: dict[str, Any] = field(default_factory=dict)
    # gradient harmonization
    harmonizer: str = "none"
    strategy: str = "recombine"
    scope: str = "default"
    k: float = 0.5
    lead: str = "default"  # "default": the method's own GH++ lead
    refresh_every: int = 1
    max_weight: float | None = None
    trade_off: float = 1.0
    # optimisation (TLlib's digit recipe: SGD, nesterov, inverse decay)
    steps: int = 3000
    batch_size: int = 32
    lr: float = 0.01
    lr_gamma: float = 0.001
    lr_decay: float = 0.75
    momentum: float = 0.9
    weight_decay: float = 1e-3
    nesterov: bool = True
    # data
    data_root: str | None = None
    source_limit: int | None = None  # use only the first N (shuffled by seed) source training images
    target_limit: int | None = None
    # evaluation, logging, reproducibility
    eval_every: int = 500
    source_eval_size: int = 2000  # source-test images evaluated (a cheap diagnostic); 0: none
    checkpoint_every: int | None = None  # default: at every evaluation
    seed: int = 0
    out: str = "runs/default"
    device: str = "cpu"
    amp: str = "none"  # mixed precision: "bf16" (autocast), "fp16" (autocast + gradient scaler, CUDA)
    sync_batchnorm: bool = False  # several processes: batch-norm statistics of the global batch (CUDA)
    threads: int | None = None
    progress: bool = True
    tensorboard: str | None = None  # also log the scalars as TensorBoard events in this folder
    loader_workers: int = 0  # DataLoader processes for image benchmarks

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        try:
            self.harmonizer = check_mode(self.harmonizer)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.scope not in SCOPES:
            raise ConfigError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.lead not in (*LEADS, "default"):
            raise ConfigError(f"lead must be 'align', 'cls' or 'default', got {self.lead!r}")
        if not 0.0 <= self.k <= 1.0:
            raise ConfigError(f"k must lie in [0, 1], got {self.k}")
        for name in ("steps", "batch_size", "eval_every", "refresh_every", "image_size", "channels",
                     "bottleneck_dim"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if not isinstance(self.method_params, dict):
            raise ConfigError("method_params must be a mapping of hyper-parameter names to values")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"amp must be none, bf16 or fp16, got {self.amp!r}")
        if self.source_eval_size < 0:
            raise ConfigError(f"source_eval_size must be >= 0, got {self.source_eval_size}")
        self._validate_names()

    def _validate_names(self) -> None:
        """Method, its hyper-parameters, backbone and domains: checked before any data is read."""
        from gradharmony.data import DOMAIN_NAMES
        from gradharmony.methods import METHODS
        from gradharmony.models import BACKBONES, FEATURE_BACKBONES
        from gradharmony.models.backbones import IMAGE_BACKBONE_NAMES

        def check(kind: str, value: str, valid) -> None:
            if value not in valid:
                hint = difflib.get_close_matches(value, list(valid), n=1)
                maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ConfigError(f"unknown {kind} {value!r}{maybe}; choose one of {', '.join(sorted(valid))}")

        check("method", self.method, METHODS)
        check("backbone", self.backbone, {**BACKBONES, **FEATURE_BACKBONES, **dict.fromkeys(IMAGE_BACKBONE_NAMES)})
        if self.pretrained is not None and self.backbone not in IMAGE_BACKBONE_NAMES:
            raise ConfigError(f"pretrained weights apply to the image backbones ({', '.join(IMAGE_BACKBONE_NAMES)}), "
                              f"not to {self.backbone!r}")
        for role, name in (("source", self.source), ("target", self.target)):
            if ":" in name:  # an image benchmark's domain, e.g. office31:amazon
                _check_image_domain(role, name)
            else:
                check(f"{role} domain", name, DOMAIN_NAMES)
        if (":" in self.source) != (":" in self.target):
            raise ConfigError(f"source {self.source!r} and target {self.target!r} must both be image-benchmark "
                              f"domains (benchmark:domain) or both not")
        accepted = METHODS[self.method].hparam_defaults()
        accepted.pop("bottleneck_dim", None)  # a config field of its own
        for key in self.method_params:
            check(f"hyper-parameter of {self.method}", key, accepted)

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        names = cls.field_names()
        for key in values:
            if key not in names:
                hint = difflib.get_close_matches(key, names, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else f"; valid keys: {', '.join(names)}"
                raise ConfigError(f"unknown config key {key!r}{suggestion}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        try:
            return cls.from_dict({**values, **(overrides or {})})
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def with_overrides(self, overrides: dict[str, Any]) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **overrides})

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def outcome_hash(self) -> str:
        """Hash of every field that changes the result (not paths, devices or logging)."""
        values = {k: v for k, v in self.to_dict().items() if k not in NON_OUTCOME_FIELDS
                  and not (k in ADDED_FIELD_DEFAULTS and v == ADDED_FIELD_DEFAULTS[k])}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
