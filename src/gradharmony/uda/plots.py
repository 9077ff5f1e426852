"""Plots of the gradient geometry: the angle between the two gradients and the GH weights.

Runs are read through :mod:`gradharmony.uda.runs`; the t-SNE plot's model comes from
:func:`gradharmony.uda.engine.load_run`.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
import numpy as np

from gradharmony.uda.runs import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    STEPS_FILE,
    labelled_runs,
    read_config,
    read_metrics,
    read_steps,
)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Moving average that ignores NaN (unmeasured steps)."""
    window = min(window, len(values))  # np.convolve "same" returns the longer of the two
    if window <= 1:
        return values
    ok = np.isfinite(values)
    kernel = np.ones(window)
    total = np.convolve(np.where(ok, values, 0.0), kernel, mode="same")
    count = np.convolve(ok.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def plot_geometry(runs: dict[str, str | Path], path: str | Path, smooth: int = 50) -> Path:
    """One figure, three panels: angle (degrees), w_align, w_cls over training, one line per run.

    ``runs`` maps a label to a run directory holding ``steps.csv``.
    """
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, run_dir in runs.items():
        rows = read_steps(run_dir)
        step = np.array([r["step"] for r in rows])
        for ax, key in zip(axes, ("angle", "w_align", "w_cls")):
            values = np.array([r.get(key, math.nan) for r in rows], dtype=float)
            ax.plot(step, _smooth(values, smooth), label=label, linewidth=1.2)
    axes[0].axhline(90.0, color="grey", linestyle=":", linewidth=1)
    axes[0].set_title("angle between the alignment and classification gradients")
    axes[0].set_ylabel("degrees (above 90 = conflict)")
    axes[1].set_title("weight of the alignment loss")
    axes[2].set_title("weight of the classification loss")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"gradient geometry ({smooth}-step moving average)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _group_runs(root: Path) -> dict[tuple[str, str], dict[str, list[Path]]]:
    """(task, method) -> variant -> run folders, from a sweep's labelled runs."""
    groups: dict[tuple[str, str], dict[str, list[Path]]] = {}
    for labels, folder in labelled_runs(root):
        if (folder / STEPS_FILE).exists():
            groups.setdefault((labels["task"], labels["method"]), {}).setdefault(labels["variant"], []).append(folder)
    return groups


def _mean_curve(runs: list[list[dict]], key: str, smooth: int) -> tuple[np.ndarray, np.ndarray]:
    """Step index and the mean over ``runs`` (each a run's :func:`read_steps` rows) of ``key``, smoothed."""
    curves = [np.array([r.get(key, math.nan) for r in rows], dtype=float) for rows in runs]
    length = min(len(c) for c in curves)
    stacked = np.stack([_smooth(c[:length], smooth) for c in curves])
    # Mean over the seeds that have a value at each step; NaN where none has (unmeasured steps).
    present = ~np.isnan(stacked)
    counts = present.sum(axis=0)
    totals = np.where(present, stacked, 0.0).sum(axis=0)
    return np.arange(length), np.where(counts > 0, totals / np.maximum(counts, 1), math.nan)


def plot_sweep(root: str | Path, out_dir: str | Path, smooth: int = 100) -> list[Path]:
    """Per (task, method): angle histogram and trajectory, conflict rate, weights, accuracy curves.

    Curves are means over the seeds of each variant; the angle is the raw (pre-harmonization)
    angle between the two gradients, measured on the steps where it was measured.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (task, method), variants in sorted(_group_runs(Path(root)).items()):
        fig, axes = plt.subplots(2, 3, figsize=(16, 8))
        (hist, angle, conflict), (w_align, w_cls, accuracy) = axes
        for variant, folders in sorted(variants.items()):
            steps_of = [read_steps(f) for f in folders]  # each run's steps.csv, read once
            angles = np.concatenate([[r["angle"] for r in rows if r.get("measured")] for rows in steps_of])
            angles = angles[np.isfinite(angles)]
            if len(angles):
                hist.hist(angles, bins=60, histtype="step", density=True, label=variant)
            for ax, key in ((angle, "angle"), (w_align, "w_align"), (w_cls, "w_cls")):
                x, y = _mean_curve(steps_of, key, smooth)
                ax.plot(x, y, label=variant, linewidth=1.2)
            records = [read_metrics(f) for f in folders if (f / METRICS_FILE).exists()]
            if records:
                length = min(len(r) for r in records)
                steps = [r["step"] for r in records[0][:length]]
                acc = np.mean([[100 * e["target_acc"] for e in r[:length]] for r in records], axis=0)
                rate = np.mean(
                    [[100 * (e["harmonizer"].get("conflict_rate") or math.nan) for e in r[:length]] for r in records],
                    axis=0,
                )
                accuracy.plot(steps, acc, marker="o", label=variant)
                conflict.plot(steps, rate, marker="o", label=variant)
        hist.axvline(90, color="grey", linestyle=":")
        angle.axhline(90, color="grey", linestyle=":")
        titles = [
            "angle histogram (degrees)",
            f"angle ({smooth}-step mean)",
            "conflict rate per interval (%)",
            "weight of the alignment loss",
            "weight of the classification loss",
            "target accuracy (%)",
        ]
        for ax, title in zip(axes.flat, titles):
            ax.set_title(title)
            ax.grid(alpha=0.3)
        hist.legend()
        fig.suptitle(f"{task}, {method}: mean over seeds")
        fig.tight_layout()
        path = out_dir / f"{task.replace('->', '_to_')}_{method}.png".replace("/", "_")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_tsne(run_dir: str | Path, path: str | Path, samples: int = 500, seed: int = 0) -> Path:
    """t-SNE of the shared features of source and target test samples, from a run's checkpoint.

    Up to ``samples`` images per domain; colour = class, marker = domain.  A well-aligned model
    mixes the two domains inside each class cluster.
    """
    import torch
    from sklearn.manifold import TSNE

    from gradharmony.uda.batches import to_input
    from gradharmony.uda.config import TrainConfig
    from gradharmony.uda.engine import load_eval_domain, load_run
    from gradharmony.uda.engine.evaluation import num_classes_of

    run_dir = Path(run_dir)
    cfg = TrainConfig.from_dict(read_config(run_dir))  # which domains, in which input space
    batches = []
    for name in (cfg.source, cfg.target):
        data = load_eval_domain(cfg, name, "test", cfg.data_root)
        chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:samples].tolist()
        items = [data[i] for i in chosen]
        batches.append(
            (
                torch.stack([torch.as_tensor(item[0]) for item in items]),
                torch.as_tensor([int(item[1]) for item in items]),
                num_classes_of(data),
            )
        )
    x, _, num_classes = batches[0]
    loaded = load_run(run_dir / CHECKPOINT_FILE, num_classes, tuple(x.shape[1:]))
    cfg, model = loaded.cfg, loaded.model
    features, labels, domains = [], [], []
    for d, (x, y, _) in enumerate(batches):
        with torch.no_grad():
            features.append(model.features(to_input(x)).numpy())
        labels.append(y.numpy())
        domains.append(np.full(len(y), d))
    points = TSNE(
        n_components=2, init="pca", random_state=seed, perplexity=min(30.0, max(2.0, (sum(map(len, labels)) - 1) / 3))
    ).fit_transform(np.concatenate(features))
    labels_all, domains_all = np.concatenate(labels), np.concatenate(domains)
    fig, ax = plt.subplots(figsize=(7, 7))
    for d, (marker, name) in enumerate((("o", f"source {cfg.source}"), ("x", f"target {cfg.target}"))):
        mask = domains_all == d
        ax.scatter(
            points[mask, 0],
            points[mask, 1],
            c=labels_all[mask],
            cmap="tab10",
            marker=marker,
            s=12,
            alpha=0.7,
            label=name,
            vmin=0,
            vmax=max(9, labels_all.max()),
        )
    ax.legend()
    ax.set_title(f"t-SNE of shared features: {cfg.method}+{cfg.harmonizer}, seed {cfg.seed}")
    ax.set_xticks([])
    ax.set_yticks([])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
