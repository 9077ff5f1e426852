"""What the harmonizer measured and applied: per step, and as running means."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class StepStats:
    """What one :meth:`Harmonizer.backward` call measured and applied (plain Python values)."""

    step: int
    mode: str
    strategy: str
    measured: bool  # False on steps that reused cached weights (refresh_every > 1)
    cos: float
    angle: float  # degrees
    norm_align: float  # of the probed (unscaled) alignment gradient over the scope
    norm_cls: float
    w_align: float
    w_cls: float
    conflict: bool
    trade_off: float
    guards: tuple[str, ...] = field(default_factory=tuple)
    unreached_align: int = 0  # scope tensors the alignment loss does not reach (counted as zeros)
    unreached_cls: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["guards"] = list(self.guards)
        return d


class RunningStats:
    """Running means over steps: conflict rate, angle, applied weights, guard counts."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.measured = 0
        self.conflicts = 0
        self.angle_sum = 0.0
        self.angle_count = 0
        self.w_align_sum = 0.0
        self.w_cls_sum = 0.0
        self.guards: Counter[str] = Counter()

    def update(self, s: StepStats) -> None:
        self.steps += 1
        self.w_align_sum += s.w_align
        self.w_cls_sum += s.w_cls
        self.guards.update(s.guards)
        if s.measured:
            self.measured += 1
            self.conflicts += int(s.conflict)
            if math.isfinite(s.angle):
                self.angle_sum += s.angle
                self.angle_count += 1

    def summary(self) -> dict[str, Any]:
        nan = math.nan
        return {
            "steps": self.steps,
            "measured_steps": self.measured,
            "conflict_rate": self.conflicts / self.measured if self.measured else nan,
            "mean_angle": self.angle_sum / self.angle_count if self.angle_count else nan,
            "mean_w_align": self.w_align_sum / self.steps if self.steps else nan,
            "mean_w_cls": self.w_cls_sum / self.steps if self.steps else nan,
            "guards": dict(self.guards),
        }

    def state_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Counter) else v) for k, v in vars(self).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, Counter(v) if k == "guards" else v)
