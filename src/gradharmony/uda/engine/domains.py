"""The four domains a run uses: source train, target train (labels never read), source and target test."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from gradharmony.uda.config import ConfigError, TrainConfig
from gradharmony.uda.data import Domain, default_data_root, load_domain
from gradharmony.uda.engine.evaluation import num_classes_of


def _limited(data: Domain | Dataset, limit: int | None, seed: int) -> Domain | Dataset:
    """``limit`` examples of ``data`` drawn without replacement (seeded), or ``data`` itself."""
    if limit is None or limit >= len(data):
        return data
    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:limit]
    if isinstance(data, Domain):
        return replace(data, images=data.images[keep], labels=data.labels[keep])
    subset = Subset(data, keep.tolist())
    subset.num_classes = data.num_classes
    return subset


def load_domains(cfg: TrainConfig) -> dict[str, Domain | Dataset]:
    """Source train (labelled), target train (labels never used), source and target test.

    Image benchmarks with label-free validation also get both training splits read with the
    evaluation transforms (``source_eval_view``, ``target_eval_view``: the same samples, in the same
    order), which the validators score.

    Digit domains are decoded or generated once and cached in ``cfg.cache_dir`` (default: the
    user's cache folder, see :func:`gradharmony.uda.data.cache.default_cache_dir`); nothing is
    written into ``cfg.data_root``.
    """
    root = Path(cfg.data_root) if cfg.data_root else default_data_root()

    def load(name: str, split: str, train: bool) -> Domain | Dataset:
        return _load(cfg, name, split, root, train=train, cache_dir=cfg.cache_dir)

    domains = {
        "source": _limited(load(cfg.source, "train", True), cfg.source_limit, 0),
        "target": _limited(load(cfg.target, "train", True), cfg.target_limit, 1),
        "source_test": _limited(load(cfg.source, "test", False), cfg.source_eval_size, 2),
        "target_test": load(cfg.target, "test", False),
    }
    if is_image_task(cfg.target) and (cfg.validators or cfg.source_val_fraction > 0):
        # the label-free validators score training samples with the evaluation transforms
        domains["source_eval_view"] = _limited(load(cfg.source, "train", False), cfg.source_limit, 0)
        domains["target_eval_view"] = _limited(load(cfg.target, "train", False), cfg.target_limit, 1)
    if num_classes_of(domains["source"]) != num_classes_of(domains["target"]):
        raise ConfigError(
            f"{cfg.source} has {num_classes_of(domains['source'])} classes but {cfg.target} has "
            f"{num_classes_of(domains['target'])}; closed-set UDA needs the same classes"
        )
    return domains


def is_image_task(name: str) -> bool:
    """Image-benchmark domains are named ``benchmark:domain`` (e.g. ``office31:amazon``)."""
    return ":" in name


def load_eval_domain(
    cfg: TrainConfig,
    name: str,
    split: str,
    data_root: str | Path | None,
    cache_dir: str | Path | None = None,
) -> Domain | Dataset:
    """One domain for evaluation, in the input space the run was trained in.

    ``cache_dir``: where a digit domain is cached (default ``cfg.cache_dir``, else the user's cache
    folder); nothing is written into the data root.
    """
    root = Path(data_root) if data_root else default_data_root()
    return _load(cfg, name, split, root, train=False, cache_dir=cache_dir if cache_dir is not None else cfg.cache_dir)


def _load(
    cfg: TrainConfig, name: str, split: str, root: Path, *, train: bool, cache_dir: str | Path | None
) -> Domain | Dataset:
    """One domain in the run's input space: an image benchmark's Dataset (train or evaluation
    transforms), or a digit or feature :class:`Domain` (cached in ``cache_dir``)."""
    if is_image_task(name):
        from gradharmony.uda.data.image_domains import load_image_domain

        benchmark, domain = name.split(":", 1)
        return load_image_domain(benchmark, domain, split, root, train=train, resize=cfg.resize, crop=cfg.crop)
    return load_domain(
        name,
        split,
        data_root=root,
        image_size=cfg.image_size,
        channels=cfg.channels,
        cache_dir=cache_dir,
        resize_filter=cfg.resize_filter,
    )
