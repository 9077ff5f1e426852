"""Plots of the gradient geometry: the angle between the two gradients and the GH weights."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gradharmony.runlog import read_steps  # noqa: E402


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Moving average that ignores NaN (unmeasured steps)."""
    if window <= 1 or len(values) == 0:
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
