"""The integration examples in docs/examples run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


def run_example(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, name, *args], cwd=EXAMPLES, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_plain_tllib_style_loop():
    out = run_example("plain_loop.py", "--steps", "100", "--mode", "gh++")
    assert "step 100: target accuracy" in out and "conflict rate" in out


def test_lightning_module_with_manual_optimization():
    pytest.importorskip("lightning")
    out = run_example("lightning_module.py", "--steps", "30", "--mode", "gh")
    assert "target accuracy" in out and "w_align" in out
