"""Picking a checkpoint, or a variant, without target labels: from the records runs wrote.

A **candidate** is one evaluation of one run: its step, its target test accuracy (what the oracle
sees) and its validators' scores (``validators`` in the record, see
:mod:`gradharmony.uda.validators`).  A **pool** is a list of candidates: the checkpoints of one run,
or those of several runs (the variants {none, gh, gh++} of a task, method and seed, to decide
whether GH should be on).  Selecting by

* a per-model validator (``entropy``, ``snd``, ...) takes the candidate with the highest score (the
  first of equal ones, as ``best_target_acc`` does);
* ``mixval_rank`` ranks the candidates' two MixVal probes (``mixval_intra``, ``mixval_inter``, stored
  with every evaluation that computed ``mixval``) over the pool and takes the best mean rank, as
  the MixVal paper combines them;
* ``ensv`` averages the stored predictions of the whole pool (``predictions/step_<step>.npy``) and
  takes the candidate that agrees most with the average (a pool of one candidate, a run with a
  single evaluation, has nothing to agree with: it is scored NaN, no pick, and the reports say so
  when the user asked for EnsV and no pool has two candidates);
* ``last`` takes the last evaluation of the run, and ``oracle`` the highest target test accuracy:
  the reference every label-free pick is measured against (regret = oracle minus pick).

Everything is read through :mod:`gradharmony.uda.runs`; nothing here trains or writes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradharmony.uda.config import DEFAULT_SELECT_BY, ConfigError, unknown_name_message
from gradharmony.uda.runs import read_predictions, read_target_index
from gradharmony.uda.validators import ORACLE, POOL_VALIDATORS, VALIDATORS, ensv_scores, mixval_rank_scores

LAST = "last"
#: Every name a pool can be picked by: the validators, EnsV, the last evaluation, the oracle.
SELECTORS = (*VALIDATORS, *POOL_VALIDATORS, LAST, ORACLE)


@dataclass
class Candidate:
    """One evaluation of one run."""

    folder: Path
    step: int
    accuracy: float  #: target test accuracy (the record's ``target_acc``), in [0, 1]
    scores: dict[str, float] = field(default_factory=dict)
    predictions: str | None = None  #: the stored target predictions, relative to ``folder``
    harmonizer: str = "none"
    mixval_probes: tuple[float, float] | None = None  #: MixVal's ``(intra, inter)``, where it was computed
    validate_seconds: float | None = None  #: what scoring the validators took (a timing field)
    seconds_per_step: float | None = None  #: training time per step since the previous evaluation


def candidates(folder: str | Path, records: Sequence[Mapping[str, Any]]) -> list[Candidate]:
    """The candidates of one run: one per evaluation record, in order."""
    out = []
    for r in records:
        scores = {k: (math.nan if v is None else float(v)) for k, v in (r.get("validators") or {}).items()}
        details = r.get("validation") or {}
        probes = None
        if "mixval_intra" in details:
            probes = tuple(
                math.nan if details[k] is None else float(details[k]) for k in ("mixval_intra", "mixval_inter")
            )
        out.append(
            Candidate(
                folder=Path(folder),
                step=int(r["step"]),
                accuracy=float(r["target_acc"]),
                scores=scores,
                predictions=details.get("predictions"),
                harmonizer=str((r.get("config") or {}).get("harmonizer", "none")),
                mixval_probes=probes,
                validate_seconds=r.get("validate_seconds"),
                seconds_per_step=r.get("seconds_per_step"),
            )
        )
    return out


def resolve_select_by(config: Mapping[str, Any]) -> str | None:
    """The label-free validator a run's reports show: its ``select_by``, else :data:`DEFAULT_SELECT_BY`
    if it computes it, else the first validator it computes (``None`` if it computes none).

    Example:
        >>> resolve_select_by({"validators": ["entropy", "bnm"]}), resolve_select_by({"validators": ["snd", "im"]})
        ('bnm', 'snd')
        >>> resolve_select_by({"validators": []}) is None
        True
    """
    if config.get("select_by"):
        return str(config["select_by"])
    computed = list(config.get("validators") or [])
    if DEFAULT_SELECT_BY in computed:
        return DEFAULT_SELECT_BY
    return computed[0] if computed else None


def first_best(values: Sequence[float]) -> int | None:
    """The index of the first highest finite value, or ``None`` if none is finite.

    Example:
        >>> first_best([0.2, float("nan"), 0.5, 0.5]), first_best([float("nan")])
        (2, None)
    """
    best, index = -math.inf, None
    for i, value in enumerate(values):
        if value is not None and math.isfinite(value) and value > best:
            best, index = value, i
    return index


def check_selectors(names: Sequence[str]) -> list[str]:
    """``names`` if each is a selector (:data:`SELECTORS`), else a :class:`ConfigError` naming the unknown one."""
    for name in names:
        if name not in SELECTORS:
            raise ConfigError(unknown_name_message("validator", name, SELECTORS))
    return list(names)


def pool_predictions(pool: Sequence[Candidate]) -> list[torch.Tensor]:
    """The stored target predictions of every candidate of ``pool``, as float tensors.

    A candidate without stored predictions, or candidates whose predictions are of different
    target samples, are a :class:`ConfigError`.
    """
    indices: dict[Path, np.ndarray | None] = {}
    out = []
    for c in pool:
        if c.predictions is None:
            raise ConfigError(
                f"{c.folder} stored no target predictions at step {c.step} (it ran without validators): "
                f"EnsV cannot score it"
            )
        if c.folder not in indices:
            indices[c.folder] = read_target_index(c.folder)
        try:
            out.append(torch.from_numpy(read_predictions(c.folder, c.step).astype(np.float32)))
        except FileNotFoundError:
            raise ConfigError(f"{c.folder / c.predictions} is missing: EnsV cannot score step {c.step}") from None
    known = [(folder, index) for folder, index in indices.items() if index is not None]
    for folder, index in known[1:]:
        if not np.array_equal(index, known[0][1]):
            raise ConfigError(
                f"{known[0][0]} and {folder} stored predictions of different target samples: EnsV pools need "
                f"the same target subset (same target, target_limit and target_val_size)"
            )
    return out


def ensv_pool_error(pool: Sequence[Candidate]) -> ConfigError:
    """Why EnsV cannot score ``pool`` of fewer than 2 candidates (for a user who asked for EnsV)."""
    where = f" ({pool[0].folder}, step {pool[0].step})" if pool else ""
    return ConfigError(f"EnsV needs a pool of at least 2 candidates, got {len(pool)}{where}")


def scores_of(pool: Sequence[Candidate], selector: str) -> list[float]:
    """Each candidate's score under ``selector`` (higher is better); NaN where a run did not compute it,
    or could not: a diverged model's, and EnsV's on a pool of one candidate (a run with a single
    evaluation; :func:`ensv_pool_error` says why, where the user asked for EnsV on it).

    Example:
        >>> scores_of([Candidate(Path("run"), 10, 0.5, {"snd": 1.5})], "ensv"), scores_of([], "ensv")
        ([nan], [])
    """
    if selector == ORACLE:
        return [c.accuracy for c in pool]
    if selector == LAST:
        return [float(i) for i in range(len(pool))]
    if selector == "mixval_rank":
        probes = [c.mixval_probes or (math.nan, math.nan) for c in pool]
        return mixval_rank_scores([a for a, _ in probes], [b for _, b in probes])
    if selector in POOL_VALIDATORS:
        if len(pool) < 2:
            return [math.nan] * len(pool)
        return ensv_scores(pool_predictions(pool)).tolist()
    return [c.scores.get(selector, math.nan) for c in pool]


def pick(pool: Sequence[Candidate], selector: str, scores: Sequence[float] | None = None) -> int | None:
    """The index of the candidate ``selector`` picks from ``pool`` (``None``: no candidate has a score);
    ``scores``: its :func:`scores_of`, where the caller has them already."""
    if not pool:
        return None
    if selector == LAST:
        return len(pool) - 1
    return first_best(scores if scores is not None else scores_of(pool, selector))


def label_free_pick(records: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The evaluation a run's label-free validator (:func:`resolve_select_by`) picks among its records:
    ``{"validator", "step", "target_acc"}``, or ``None`` when the run computed none (or it is EnsV,
    which the reports compute from the stored predictions; ``mixval_rank`` ranks the run's own
    evaluations, whose probes the records hold)."""
    validator = resolve_select_by(config)
    if validator is None or validator == "ensv":
        return None
    pool = candidates("", records)
    index = pick(pool, validator)
    if index is None:
        return None
    return {"validator": validator, "step": pool[index].step, "target_acc": pool[index].accuracy}


@dataclass
class Outcome:
    """What a selector did on one pool: the accuracy it picked, the oracle's, and the pool's worst."""

    accuracy: float
    oracle: float
    worst: float
    harmonizer: str = "none"  #: the picked candidate's harmonizer (``none``: GH off)

    @property
    def regret(self) -> float:
        """Oracle minus pick (0 when the pick is the best candidate)."""
        return self.oracle - self.accuracy

    @property
    def picked_worst(self) -> bool:
        """Whether the pick was the pool's worst candidate (and the pool's candidates differ)."""
        return self.accuracy <= self.worst and self.oracle > self.worst


def outcome(pool: Sequence[Candidate], selector: str, scores: Sequence[float] | None = None) -> Outcome | None:
    """How ``selector`` did on ``pool`` (``None``: it scored no candidate); ``scores`` as for :func:`pick`."""
    index = pick(pool, selector, scores)
    if index is None:
        return None
    accuracies = [c.accuracy for c in pool]
    return Outcome(
        accuracy=pool[index].accuracy, oracle=max(accuracies), worst=min(accuracies), harmonizer=pool[index].harmonizer
    )


def rank_correlation(pool: Sequence[Candidate], selector: str) -> float:
    """Spearman's rank correlation between ``selector``'s scores and the target accuracy over ``pool``
    (NaN with fewer than 3 scored candidates, or when either is constant)."""
    from scipy import stats

    pairs = [(s, c.accuracy) for s, c in zip(scores_of(pool, selector), pool) if s is not None and math.isfinite(s)]
    if len(pairs) < 3:
        return math.nan
    scores, accuracies = zip(*pairs)
    if len(set(scores)) < 2 or len(set(accuracies)) < 2:
        return math.nan
    return float(stats.spearmanr(scores, accuracies).statistic)
