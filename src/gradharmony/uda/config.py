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
    gradharmony.uda.config.ConfigError: unknown config key 'stepz' (did you mean 'steps'?)
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import math
import numbers
import operator
import os
import types
import typing
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gradharmony.harmonize import LEADS, MODES, check_mode
from gradharmony.harmonizer import STRATEGIES

SCOPES = ("default", "bottleneck", "heads", "backbone", "all")
LEAD_CHOICES = (*LEADS, "default")
AMP_MODES = ("none", "bf16", "fp16")
# Fields that do not change the outcome of a run: excluded from its hash.
NON_OUTCOME_FIELDS = (
    "out",
    "data_root",
    "progress",
    "threads",
    "device",
    "checkpoint_every",
    "loader_workers",
    "tensorboard",
    "cache_dir",
    "overwrite",
    "select_by",  # which validator's pick the reports show: chosen again at report time
)
#: The validators computed at every evaluation unless the config says otherwise: the cheap,
#: target-only ones (one forward of the target subset, plus MixVal's mixtures).  The source-based
#: ones (``source_val``, ``dev``) need ``source_val_fraction > 0``.
DEFAULT_VALIDATORS = ("entropy", "im", "bnm", "snd", "mixval")
#: The label-free pick the reports show when a config's ``select_by`` is none.  Chosen from
#: benchmarks/model_selection.py (docs/results.md), all 504 runs: BNM has the lowest mean regret of
#: the label-free validators that need no source split, ahead of the last checkpoint on the digit
#: tasks (0.32 against 0.41 points) and level with it on the SURF features, never picking the worst
#: more often, at no cost beyond the forward pass.  Entropy, the earlier default, falls behind last
#: on the digits (0.66, through MDD); MixVal, the first one, is behind last on both families.
DEFAULT_SELECT_BY = "bnm"
#: Target train and source validation samples scored at each evaluation when the config gives no size.
DEFAULT_VALIDATION_SIZE = 1000
# Fields added after runs were first keyed by their hash: left out of the hash while at these
# defaults, so that run folders named by earlier versions keep their names (and resume).
ADDED_FIELD_DEFAULTS: dict[str, Any] = {
    "pretrained": None,
    "amp": "none",
    "resize": 256,
    "crop": 224,
    "sync_batchnorm": False,
    "measure_every": 0,
    "resize_filter": "bilinear",
    # label-free model selection: none of these changes the weights a run trains, but they change
    # its records (validators, select) or its training data (source_val_fraction), so they count
    # once they differ from the values below (the validators computed by default follow
    # DEFAULT_VALIDATORS: a default config keeps its hash, and earlier run folders resume)
    "validators": list(DEFAULT_VALIDATORS),
    "select": [],
    "source_val_fraction": 0.0,
    "target_val_size": None,
    "source_val_size": None,
}


class ConfigError(ValueError):
    """A configuration value or key that cannot be used, with what would be accepted."""


def unknown_name_message(kind: str, value: str, valid: Iterable[str]) -> str:
    """``unknown <kind> 'x' (did you mean 'y'?); choose one of ...``: shared by recipes and the command line."""
    valid = list(valid)
    hint = difflib.get_close_matches(value, valid, n=1)
    maybe = f" (did you mean {hint[0]!r}?)" if hint else ""
    return f"unknown {kind} {value!r}{maybe}; choose one of {', '.join(sorted(valid))}"


def field_choices() -> dict[str, tuple[str, ...]]:
    """The accepted values of each :class:`TrainConfig` field that takes one of a closed set of names.

    Read from the registries (methods, harmonizer modes, strategies, backbones), so that validation,
    ``gradharmony train --help`` and the command line's checks always agree.
    """
    from gradharmony.uda.data.transforms import RESIZE_FILTERS
    from gradharmony.uda.methods import METHODS
    from gradharmony.uda.models import BACKBONES, FEATURE_BACKBONES
    from gradharmony.uda.models.backbones import IMAGE_BACKBONE_NAMES

    return {
        "method": tuple(METHODS),
        "backbone": (*BACKBONES, *FEATURE_BACKBONES, *IMAGE_BACKBONE_NAMES),
        "harmonizer": MODES,
        "strategy": STRATEGIES,
        "scope": SCOPES,
        "lead": LEAD_CHOICES,
        "amp": AMP_MODES,
        "resize_filter": RESIZE_FILTERS,
    }


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _split_optional(hint: Any) -> tuple[type, bool]:
    """``(base type, whether None is allowed)`` of a field's annotation (``int``, ``str | None``, ``dict[...]``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return typing.get_origin(args[0]) or args[0], len(args) < len(typing.get_args(hint))
    return typing.get_origin(hint) or hint, False


def field_type(name: str) -> type:
    """The type of :class:`TrainConfig` field ``name``, without ``| None`` (``int`` for ``threads``,
    ``dict`` for ``method_params``)."""
    return _split_optional(_field_types()[name])[0]


def _checked_value(name: str, hint: Any, value: Any) -> Any:
    """``value`` if it has the field's type, else a :class:`ConfigError` naming field, type and value.

    A path is taken as a string, and a number written like ``1e-3`` (which YAML reads as a string)
    as a number.
    """
    base, optional = _split_optional(hint)
    if optional and value is None:
        return value
    if base is bool and isinstance(value, bool):
        return value
    if base is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if base is float and not isinstance(value, bool):
        if isinstance(value, numbers.Real):
            return value  # an int stays an int: converting it would change the hash of existing runs
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    if base is str and isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if base is dict and isinstance(value, dict):
        return value
    if base is list:  # a list of names: a YAML list, or one string "a,b" (the command line's form)
        if isinstance(value, str):
            value = [] if value.strip().lower() in ("", "none", "[]") else [v.strip() for v in value.split(",")]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
            return list(value)
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        dict: "a mapping",
        list: "a list of names (or one string, comma-separated)",
    }
    expected = names.get(base, getattr(base, "__name__", str(base))) + (" or null" if optional else "")
    raise ConfigError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")


def _hparam_type(method: type, name: str, default: Any) -> tuple[type, bool] | None:
    """``(type, whether None is allowed)`` of a method's hyper-parameter, or ``None`` if not a plain scalar.

    The constructor's annotation where it names one of ``bool``, ``int``, ``float``, ``str``
    (optionally ``| None``: ``generator_momentum: float | None = 0.0``); otherwise the type of the
    default.  Anything else (a sequence, a union of several types) is left to the method.
    """
    scalars = (bool, int, float, str)
    for klass in method.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or name not in inspect.signature(init).parameters:
            continue
        try:
            hint = typing.get_type_hints(init).get(name)
        except Exception:  # an annotation that does not resolve here: fall back to the default's type
            break
        if hint is None:
            break
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) == 1 and kinds[0] in scalars:
            return kinds[0], len(kinds) < len(args)
        return None
    return (type(default), False) if isinstance(default, scalars) else None


def _checked_hparam(method: str, name: str, expected: tuple[type, bool], value: Any) -> Any:
    """``value`` if it has the hyper-parameter's type (a float also finite), else a :class:`ConfigError`.

    An integer is accepted for a float (and kept as written, which keeps run hashes); a number
    written as a string (``1e-3``, which YAML reads as a string) becomes a float.
    """
    base, optional = expected
    if value is None and optional:
        return value
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    fits = {
        bool: isinstance(value, bool),
        int: is_number and isinstance(value, numbers.Integral),
        float: is_number,
        str: isinstance(value, str),
    }[base]
    checked = value
    if base is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            checked, fits = float(value), True
    names = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}
    expected_text = names[base] + (" or null" if optional else "")
    if not fits or (base is float and not math.isfinite(checked)):
        shown = repr(checked) if fits else f"{value!r} ({type(value).__name__})"
        raise ConfigError(f"method_params of {method}: {name} must be {expected_text}, got {shown}")
    return checked


_METHOD_CHECKS: dict[str, str | None] = {}


def _method_constructor_error(method: str, steps: int, bottleneck_dim: int, params: dict[str, Any]) -> str | None:
    """What the method's constructor refuses in ``params`` (its ``ValueError`` or ``TypeError``), or ``None``.

    The method is built on the ``meta`` device (no memory, no weights) around a stand-in
    backbone, with the global random state restored afterwards, so the check changes nothing;
    results are cached, since sweeps validate the same parameters many times.  Checks that depend
    on the real backbone (e.g. SSRT's ``sr_layers`` against the ViT's depth) are left to training.
    """
    key = json.dumps([method, steps, bottleneck_dim, params], sort_keys=True, default=repr)
    if key in _METHOD_CHECKS:
        return _METHOD_CHECKS[key]
    import torch
    from torch import nn

    from gradharmony.uda.methods import METHODS

    class StandIn(nn.Module):
        out_features = 8

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    problem = None
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        try:
            METHODS[method](StandIn(), 10, steps, bottleneck_dim=bottleneck_dim, **params)
        except (ValueError, TypeError) as e:
            problem = " ".join(str(e).split())
        except Exception:  # e.g. a step the meta device cannot take: the real build will tell
            problem = None
    if len(_METHOD_CHECKS) > 4096:
        _METHOD_CHECKS.clear()
    _METHOD_CHECKS[key] = problem
    return problem


def _check_name(kind: str, value: str, valid: Collection[str]) -> None:
    """A :class:`ConfigError` (:func:`unknown_name_message`) unless ``value`` is one of ``valid``."""
    if value not in valid:
        raise ConfigError(unknown_name_message(kind, value, valid))


def check_domain(name: str, role: str | None = None) -> None:
    """A :class:`ConfigError` unless ``name`` is a digit or feature domain, or an image benchmark's
    ``benchmark:domain`` (e.g. ``office31:amazon``); ``role`` (``source``, ``target``) is named in it.

    Shared by the validation of a config and the command line's ``eval --target``.
    """
    if ":" in name:  # an image benchmark's domain
        from gradharmony.uda.data.benchmarks import get_benchmark

        benchmark, domain = name.split(":", 1)
        try:
            get_benchmark(benchmark).domain(domain)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"{f'{role} ' if role else ''}{name!r}: {e}") from None
    else:
        from gradharmony.uda.data import DOMAIN_NAMES

        _check_name(f"{role} domain" if role else "domain", name, DOMAIN_NAMES)


def _option(
    default: Any,
    help: str,
    *,
    group: str,
    minimum: float | str | None = None,
    maximum: float | str | None = None,
    exclusive_minimum: float | None = None,
    exclusive_maximum: float | None = None,
) -> Any:
    """A :class:`TrainConfig` field with its one-line help, its section and its allowed range.

    ``minimum`` and ``maximum`` are inclusive bounds, ``exclusive_minimum`` and
    ``exclusive_maximum`` exclusive ones; a bound may also name another field (``crop``'s maximum is
    ``"resize"``).  :meth:`TrainConfig.validate` checks them (and that every float is finite), and
    ``gradharmony train --help`` shows them (:func:`field_range`).
    """
    metadata: dict[str, Any] = {"help": help, "group": group}
    bounds = {
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_minimum": exclusive_minimum,
        "exclusive_maximum": exclusive_maximum,
    }
    metadata.update({key: value for key, value in bounds.items() if value is not None})
    return field(default=default, metadata=metadata)


def _bound_text(bound: float | str) -> str:
    return bound if isinstance(bound, str) else f"{bound:g}"


def field_range(f: dataclasses.Field) -> str | None:
    """The allowed values of a numeric :class:`TrainConfig` field in words, or ``None`` if it has no bounds.

    For example ``'> 0'`` (``lr``), ``'in [0, 1)'`` (``momentum``), ``'>= 1 or none'``
    (``max_weight``), ``'in [1, resize]'`` (``crop``): read from the field's metadata.

    Example:
        >>> fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
        >>> field_range(fields["momentum"]), field_range(fields["max_weight"]), field_range(fields["method"])
        ('in [0, 1)', '>= 1 or none', None)
    """
    meta = f.metadata
    low, low_open = (meta["minimum"], False) if "minimum" in meta else (meta.get("exclusive_minimum"), True)
    high, high_open = (meta["maximum"], False) if "maximum" in meta else (meta.get("exclusive_maximum"), True)
    if low is None and high is None:
        return None
    if low is not None and high is not None:
        text = f"in {'(' if low_open else '['}{_bound_text(low)}, {_bound_text(high)}{')' if high_open else ']'}"
    elif low is not None:
        text = f"{'>' if low_open else '>='} {_bound_text(low)}"
    else:
        text = f"{'<' if high_open else '<='} {_bound_text(high)}"
    optional = _split_optional(_field_types()[f.name])[1]
    return text + (" or none" if optional else "")


#: Each bound of a field's metadata (see :func:`_option`), and whether a value is inside it.
_INSIDE = {
    "minimum": operator.ge,
    "maximum": operator.le,
    "exclusive_minimum": operator.gt,
    "exclusive_maximum": operator.lt,
}


def _range_error(cfg: TrainConfig, f: dataclasses.Field) -> str | None:
    """Why the value of field ``f`` of ``cfg`` is out of its range (or not finite), or ``None`` if it is fine."""
    value = getattr(cfg, f.name)
    if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    bounds = [(key, f.metadata[key]) for key in _INSIDE if key in f.metadata]  # a str bound: another field
    finite = math.isfinite(value)
    if finite and all(_INSIDE[key](value, getattr(cfg, b) if isinstance(b, str) else b) for key, b in bounds):
        return None
    kind = "an integer" if field_type(f.name) is int else "a finite number"
    allowed = field_range(f)
    message = f"{f.name} must be {kind}{f' {allowed}' if allowed else ''}, got {value!r}"
    if finite:
        message += "".join(f" ({b} is {getattr(cfg, b)!r})" for _, b in bounds if isinstance(b, str))
    return message


WHAT = "what to train"
HARMONIZATION = "gradient harmonization"
OPTIMISATION = "optimisation (TLlib's digit recipe: SGD, nesterov, inverse decay)"
DATA = "data"
RUN = "evaluation, logging, hardware, reproducibility"
SELECTION = "label-free model selection (validators scored at each evaluation; see gradharmony.uda.validators)"


@dataclass
class TrainConfig:
    """Everything one training run depends on; each field is also a ``gradharmony train`` flag."""

    # what to train
    method: str = _option("dann", "the UDA method", group=WHAT)
    source: str = _option("mnist", "labelled source domain", group=WHAT)
    target: str = _option(
        "mnistm-synth", "unlabelled target domain, evaluated on its test split; the same kinds as source", group=WHAT
    )
    backbone: str = _option(
        "lenet",
        "feature extractor: digit CNNs, an MLP for feature-vector domains, or an "
        "image backbone for the image benchmarks",
        group=WHAT,
    )
    pretrained: str | None = _option(
        None,
        "image backbones: 'imagenet' (the standard weights) or a weights file; none: random initialisation",
        group=WHAT,
    )
    image_size: int = _option(32, "digit domains: images are resized to this many pixels a side", group=WHAT, minimum=1)
    channels: int = _option(3, "digit domains: 1 (grey) or 3 (RGB)", group=WHAT)
    resize_filter: str = _option(
        "bilinear",
        "digit domains: the filter that resizes them, bilinear (antialiased) or bicubic (Pillow's, "
        "as TLlib's digit scripts)",
        group=WHAT,
    )
    resize: int = _option(256, "image benchmarks: resize to this square size, then crop", group=WHAT, minimum=1)
    crop: int = _option(
        224,
        "image benchmarks: crop size (random for training, centre for evaluation)",
        group=WHAT,
        minimum=1,
        maximum="resize",
    )
    bottleneck_dim: int = _option(
        256, "width of the bottleneck layer between backbone and classifier", group=WHAT, minimum=1
    )
    method_params: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "the method's own hyper-parameters (name: value)", "group": WHAT}
    )
    # gradient harmonization
    harmonizer: str = _option(
        "none",
        "how the classification and alignment gradients are combined: none "
        "(plain sum), gh (remove each one's conflicting component), gh++ (the "
        "authors' rotation rule), gh++exact (exact rotation to 90 degrees)",
        group=HARMONIZATION,
    )
    strategy: str = _option(
        "recombine",
        "how the two per-loss gradients are obtained: reweight (the authors' "
        "three backward passes), recombine (two passes, same update), features "
        "(measured on shared features: cheaper, approximate)",
        group=HARMONIZATION,
    )
    scope: str = _option(
        "default",
        "parameters whose gradients are harmonized: default (the method's own: "
        "backbone, bottleneck, classifier), bottleneck, heads (bottleneck and "
        "classifier), backbone, or all",
        group=HARMONIZATION,
    )
    k: float = _option(
        0.5,
        "gh++ and gh++exact: share of the rotation given to the lead gradient",
        group=HARMONIZATION,
        minimum=0,
        maximum=1,
    )
    lead: str = _option(
        "default",
        "gh++ and gh++exact: the gradient that leads: align, cls, or default (the method's own choice)",
        group=HARMONIZATION,
    )
    refresh_every: int = _option(
        1,
        "measure the harmonizer weights every this many steps and reuse them in between (1: every step)",
        group=HARMONIZATION,
        minimum=1,
    )
    max_weight: float | None = _option(
        None, "cap on each harmonizer weight; none: no cap", group=HARMONIZATION, minimum=1
    )
    trade_off: float = _option(
        1.0, "weight of the alignment loss: the update is trade_off * align + cls", group=HARMONIZATION, minimum=0
    )
    measure_every: int = _option(
        0,
        "harmonizer none only: measure the gradient geometry (angle, norms, "
        "conflicts) every this many steps, for the logs; 0: never (plain training "
        "at full speed)",
        group=HARMONIZATION,
        minimum=0,
    )
    # optimisation (TLlib's digit recipe: SGD, nesterov, inverse decay)
    steps: int = _option(
        3000, "training steps (one source batch and one target batch each)", group=OPTIMISATION, minimum=1
    )
    batch_size: int = _option(32, "images per batch, in each domain", group=OPTIMISATION, minimum=1)
    lr: float = _option(0.01, "initial learning rate of SGD", group=OPTIMISATION, exclusive_minimum=0)
    lr_gamma: float = _option(
        0.001, "learning-rate decay: lr * (1 + lr_gamma * step) ** -lr_decay", group=OPTIMISATION, minimum=0
    )
    lr_decay: float = _option(0.75, "learning-rate decay exponent (see --lr-gamma)", group=OPTIMISATION, minimum=0)
    momentum: float = _option(0.9, "SGD momentum", group=OPTIMISATION, minimum=0, exclusive_maximum=1)
    weight_decay: float = _option(1e-3, "SGD weight decay", group=OPTIMISATION, minimum=0)
    nesterov: bool = _option(True, "Nesterov momentum", group=OPTIMISATION)
    # data
    data_root: str | None = _option(
        None, "folder holding the datasets; none: $GRADHARMONY_DATA_ROOT, else ./data", group=DATA
    )
    source_limit: int | None = _option(
        None, "use only the first N source training images (shuffled by seed); none: all", group=DATA, minimum=1
    )
    target_limit: int | None = _option(
        None, "use only the first N target training images (shuffled by seed); none: all", group=DATA, minimum=1
    )
    cache_dir: str | None = _option(
        None,
        "folder for decoded and generated datasets (the data root is never written to); "
        "none: $GRADHARMONY_CACHE_DIR, else $XDG_CACHE_HOME/gradharmony or ~/.cache/gradharmony",
        group=DATA,
    )
    # evaluation, logging, reproducibility
    eval_every: int = _option(
        500, "evaluate on the target test split every this many steps (and at the end)", group=RUN, minimum=1
    )
    source_eval_size: int = _option(
        2000, "source test images evaluated at each evaluation (a cheap diagnostic); 0: none", group=RUN, minimum=0
    )
    checkpoint_every: int | None = _option(
        None, "save a checkpoint every this many steps; none: at every evaluation", group=RUN, minimum=1
    )
    seed: int = _option(0, "random seed of weights, batches and data subsets", group=RUN, minimum=0)
    out: str = _option(
        "runs/default",
        "run folder: config.yaml, metrics.jsonl, steps.csv, last.pt; a run whose folder holds a checkpoint resumes",
        group=RUN,
    )
    overwrite: bool = _option(
        False,
        "start the run over: delete the records and checkpoint that --out holds (of any configuration) first",
        group=RUN,
    )
    device: str = _option("auto", "auto (CUDA when available, else CPU), cpu, cuda, cuda:N or mps", group=RUN)
    amp: str = _option(
        "none", "mixed precision: none, bf16 (autocast), fp16 (autocast and gradient scaler; CUDA)", group=RUN
    )
    sync_batchnorm: bool = _option(
        False, "several processes (torchrun): batch-norm statistics of the global batch (CUDA)", group=RUN
    )
    threads: int | None = _option(None, "CPU threads of this run; none: PyTorch's default", group=RUN, minimum=1)
    progress: bool = _option(True, "show a progress bar", group=RUN)
    tensorboard: str | None = _option(None, "also log the scalars as TensorBoard events in this folder", group=RUN)
    loader_workers: int = _option(
        0, "image benchmarks: DataLoader worker processes (0: load in the training process)", group=RUN, minimum=0
    )
    # label-free model selection
    validators: list[str] = field(
        default_factory=lambda: list(DEFAULT_VALIDATORS),
        metadata={
            "help": "label-free validators scored at each evaluation on a fixed subset of the target train "
            "split (and the source validation split), written to metrics.jsonl with the subset's "
            "predictions: source_val, entropy, im, bnm, snd, dev, mixval (comma-separated; none: no "
            "validation)",
            "group": SELECTION,
        },
    )
    select: list[str] = field(
        default_factory=list,
        metadata={
            "help": "keep the checkpoint each of these validators picks (and/or oracle, the best on target "
            "test labels) under <out>/selected/, for gradharmony eval --select (comma-separated)",
            "group": SELECTION,
        },
    )
    select_by: str | None = _option(
        None,
        f"the label-free pick the reports show beside last and the oracle: a validator, mixval_rank or ensv; "
        f"none: {DEFAULT_SELECT_BY} where computed, else the first validator computed (not part of the "
        f"run: reports may choose again)",
        group=SELECTION,
    )
    source_val_fraction: float = _option(
        0.0,
        "share of the source training split held out (stratified, never trained on) for source_val "
        "and dev; 0: none. Off by default because holding out changes the training data, so runs of "
        "earlier versions and their results stay as they were",
        group=SELECTION,
        minimum=0,
        maximum=0.5,
    )
    target_val_size: int | None = _option(
        None,
        f"target train samples scored at each evaluation (a fixed subset, the same for every run of "
        f"the target); none: up to {DEFAULT_VALIDATION_SIZE}",
        group=SELECTION,
        minimum=2,
    )
    source_val_size: int | None = _option(
        None,
        f"held-out source samples scored at each evaluation; none: up to {DEFAULT_VALIDATION_SIZE}",
        group=SELECTION,
        minimum=2,
    )

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check types, ranges and names; raise a :class:`ConfigError` saying what is accepted.

        Every numeric field must be finite and inside the range written next to it (``minimum``,
        ``maximum``, ... in its metadata, see :func:`field_range`); the method's hyper-parameters
        (``method_params``) must have the types of their defaults, be finite, and pass the method's
        own checks.  Nothing is read or written: a config that passes can start a run.

        Example:
            >>> TrainConfig(lr=float("nan"))
            Traceback (most recent call last):
            ...
            gradharmony.uda.config.ConfigError: lr must be a finite number > 0, got nan
            >>> TrainConfig(momentum=1.5)
            Traceback (most recent call last):
            ...
            gradharmony.uda.config.ConfigError: momentum must be a finite number in [0, 1), got 1.5
        """
        hints = _field_types()
        fields = dataclasses.fields(self)
        for f in fields:
            setattr(self, f.name, _checked_value(f.name, hints[f.name], getattr(self, f.name)))
        for f in fields:
            problem = _range_error(self, f)
            if problem is not None:
                raise ConfigError(problem)
        try:
            self.harmonizer = check_mode(self.harmonizer)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        choices = field_choices()  # the same names and messages as the command line's
        for name in ("strategy", "scope", "lead"):
            _check_name(name, getattr(self, name), choices[name])
        if self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {self.channels}")
        _check_name("amp", self.amp, choices["amp"])
        _check_name("resize_filter", self.resize_filter, choices["resize_filter"])
        self._validate_selection()
        self._validate_names(choices)
        self._validate_method_params()

    def _validate_names(self, choices: dict[str, tuple[str, ...]]) -> None:
        """Method, backbone and domains (``choices``: :func:`field_choices`): checked before any data is read."""
        from gradharmony.uda.models.backbones import IMAGE_BACKBONE_NAMES

        _check_name("method", self.method, choices["method"])
        _check_name("backbone", self.backbone, choices["backbone"])
        if self.pretrained is not None and self.backbone not in IMAGE_BACKBONE_NAMES:
            raise ConfigError(
                f"pretrained weights apply to the image backbones ({', '.join(IMAGE_BACKBONE_NAMES)}), "
                f"not to {self.backbone!r}"
            )
        check_domain(self.source, "source")
        check_domain(self.target, "target")
        if (":" in self.source) != (":" in self.target):
            raise ConfigError(
                f"source {self.source!r} and target {self.target!r} must both be image-benchmark "
                f"domains (benchmark:domain) or both not"
            )

    def _validate_selection(self) -> None:
        """Validator names (each known, in its canonical order, once), what they need, and what is kept."""
        from gradharmony.uda.validators import ORACLE, POOL_VALIDATORS, SOURCE_VALIDATORS, VALIDATORS

        for name in self.validators:
            if name in POOL_VALIDATORS:
                raise ConfigError(
                    f"validators: {name} scores a pool of candidates, not one model; gradharmony report "
                    f"--select {name} computes it from what the evaluations stored (leave it out of validators)"
                )
            if name == ORACLE:
                raise ConfigError(
                    "validators: the oracle (target test accuracy) is always measured; leave it out of validators"
                )
            _check_name("validator", name, VALIDATORS)
        canonical = [name for name in VALIDATORS if name in self.validators]
        if canonical != self.validators:
            self.validators = canonical
        needs_source = [name for name in self.validators if name in SOURCE_VALIDATORS]
        if needs_source and self.source_val_fraction == 0:
            raise ConfigError(
                f"{' and '.join(needs_source)} need{'s' if len(needs_source) == 1 else ''} a held-out source "
                f"validation split: set source_val_fraction (e.g. 0.1)"
            )
        if self.source_val_size is not None and self.source_val_fraction == 0:
            raise ConfigError("source_val_size needs a held-out source validation split: set source_val_fraction")
        for name in self.select:
            if name in POOL_VALIDATORS:
                raise ConfigError(
                    f"select: {name} scores a pool, so its pick is known only once the pool is complete; "
                    f"gradharmony report --select {name} gives it (keep it out of select)"
                )
            _check_name("validator to select by", name, (*VALIDATORS, ORACLE))
            if name != ORACLE and name not in self.validators:
                raise ConfigError(f"select: {name} is not computed; add it to validators")
        selected = [name for name in (*VALIDATORS, ORACLE) if name in self.select]
        if selected != self.select:
            self.select = selected
        if self.select_by is not None:
            if self.select_by == ORACLE:
                raise ConfigError(
                    "select_by must be label-free; the oracle (target test accuracy) is always reported beside it"
                )
            _check_name("validator to select by", self.select_by, (*VALIDATORS, *POOL_VALIDATORS))
            if self.select_by == "mixval_rank" and "mixval" not in self.validators:
                raise ConfigError("select_by: mixval_rank ranks the probes of mixval; add mixval to validators")
            if self.select_by in POOL_VALIDATORS and not self.validators:
                raise ConfigError(
                    f"select_by {self.select_by} needs the target predictions stored with the validators: "
                    f"validators must not be none"
                )
            if self.select_by in VALIDATORS and self.select_by not in self.validators:
                raise ConfigError(f"select_by: {self.select_by} is not computed; add it to validators")

    def _validate_method_params(self) -> None:
        """The method's hyper-parameters: names it accepts, the types of their defaults, finite, and
        accepted by the method's constructor."""
        from gradharmony.uda.methods import METHODS

        cls = METHODS[self.method]
        defaults = cls.hparam_defaults()
        accepted = {key: value for key, value in defaults.items() if key != "bottleneck_dim"}  # a field of its own
        for key in self.method_params:
            _check_name(f"hyper-parameter of {self.method}", key, accepted)
        checked = {}
        for key, value in self.method_params.items():
            expected = _hparam_type(cls, key, defaults[key])
            checked[key] = value if expected is None else _checked_hparam(self.method, key, expected, value)
        if any(checked[key] is not value for key, value in self.method_params.items()):
            self.method_params = checked  # a number written as a string (1e-3 in YAML), now a float
        problem = _method_constructor_error(self.method, self.steps, self.bottleneck_dim, self.method_params)
        if problem is not None:
            raise ConfigError(f"method_params of {self.method}: {problem}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        """The names of every field, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A validated config from a mapping of field names to values; unknown keys are named."""
        names = cls.field_names()
        for key in values:
            if key not in names:
                hint = difflib.get_close_matches(key, names, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else f"; valid keys: {', '.join(names)}"
                raise ConfigError(f"unknown config key {key!r}{suggestion}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """A validated config from a YAML recipe (a mapping of field names to values), with ``overrides``."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {yaml_error_line(e)}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        try:
            return cls.from_dict({**values, **(overrides or {})})
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def with_overrides(self, overrides: dict[str, Any]) -> TrainConfig:
        """A copy with ``overrides`` applied, validated."""
        return TrainConfig.from_dict({**self.to_dict(), **overrides})

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        """Every field, as plain values (what ``config.yaml`` holds)."""
        return dataclasses.asdict(self)

    def outcome_hash(self) -> str:
        """Hash of every field that changes the result (not paths, devices or logging)."""
        values = {
            k: v
            for k, v in self.to_dict().items()
            if k not in NON_OUTCOME_FIELDS and not (k in ADDED_FIELD_DEFAULTS and v == ADDED_FIELD_DEFAULTS[k])
        }
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def yaml_error_line(error: yaml.YAMLError) -> str:
    """A YAML parse error on one line: where (line, column) and what, as PyYAML words it."""
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    return " ".join(f"{where}{what}{f' ({context})' if context else ''}".split())
