"""The integration examples in docs/examples run as documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from processes import run_python

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def run_example(name: str, *args: str) -> str:
    result = run_python(name, *args, cwd=EXAMPLES)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def numbers(line: str) -> dict[str, float]:
    """The printed ``name value`` pairs of a report line, e.g. ``{"target accuracy": 79.3, ...}``."""
    return {name.strip(): float(value) for name, value in re.findall(r"([a-z_ ]+) (-?[0-9.]+)%?", line)}


def test_plain_tllib_style_loop():
    out = run_example("plain_loop.py", "--steps", "100", "--mode", "gh++")
    (line,) = [row for row in out.splitlines() if row.startswith("step 100:")]
    report = numbers(line.split(":", 1)[1])
    assert set(report) == {"target accuracy", "angle", "conflict rate", "w_align", "w_cls"}
    assert report["target accuracy"] > 60.0  # two balanced classes: chance is 50%
    assert 0.0 < report["conflict rate"] <= 1.0 and 0.0 <= report["angle"] <= 180.0  # GH++ had work to do
    # The authors' GH++ at k = 0.5: w_lead = 1 + 2 sin(b), w_other = 1 - 2 sin(b), so every step's
    # weights sum to 2 and the alignment loss (the default lead) is amplified on average.
    assert report["w_align"] + report["w_cls"] == pytest.approx(2.0, abs=2e-3)
    assert report["w_align"] > 1.0 > report["w_cls"]


def test_lightning_module_with_manual_optimization():
    pytest.importorskip("lightning")
    out = run_example("lightning_module.py", "--steps", "30", "--mode", "gh")
    (line,) = [row for row in out.splitlines() if row.startswith("target accuracy")]
    report = numbers(line)
    assert set(report) == {"target accuracy", "conflict rate", "mean angle", "w_align"}
    assert report["target accuracy"] > 60.0
    assert 0.0 < report["conflict rate"] <= 1.0 and 0.0 <= report["mean angle"] <= 180.0
    assert report["w_align"] > 1.0  # GH weights are 1 - d/aa >= 1, and above 1 on conflicting steps
