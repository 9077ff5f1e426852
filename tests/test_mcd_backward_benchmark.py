"""``benchmarks/mcd_backward.py``: the shipped MCD and its full-backward copy end identical, and the
copy really computes the gradients that the shipped one skips."""

from __future__ import annotations

import pytest
import torch

from benchmark_scripts import load_benchmark


@pytest.fixture
def script(monkeypatch):
    return load_benchmark("mcd_backward", monkeypatch)


@pytest.mark.parametrize("mode", [None, "gh++"])
def test_both_copies_end_identical(script, mode):
    pruned_ms, full_ms, same = script.compare(mode, steps=2, batch=4)
    assert same and pruned_ms > 0 and full_ms > 0


def test_the_full_copy_ignores_inputs(script):
    weight = torch.ones(2, requires_grad=True)
    other = torch.ones(2, requires_grad=True)
    script._full_backward((weight * other).sum(), inputs=[weight])
    assert weight.grad is not None and other.grad is not None  # the shipped call would leave other.grad None
