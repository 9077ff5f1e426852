"""Autograd plumbing of the harmonizer: graph leaves, per-loss probes, the Gramian, accumulation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Grads = list[torch.Tensor | None]


def graph_leaves(*outputs: torch.Tensor, stop_at: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
    """Leaf tensors requiring grad that ``outputs`` depend on, in a deterministic order.

    With ``stop_at``, the walk does not go below those tensors: it returns only the leaves that
    the outputs reach without passing through them (and never the ``stop_at`` tensors themselves).
    """
    leaves: list[torch.Tensor] = []
    stop_ids = {id(t) for t in stop_at}
    seen_nodes: set[Any] = {t.grad_fn for t in stop_at if t.grad_fn is not None}
    seen_leaves: set[int] = set(stop_ids)
    stack = [o.grad_fn for o in reversed(outputs) if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen_nodes:
            continue
        seen_nodes.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold the leaf
        if variable is not None and id(variable) not in seen_leaves:
            seen_leaves.add(id(variable))
            leaves.append(variable)
        stack.extend(nxt for nxt, _ in reversed(node.next_functions) if nxt is not None)
    return leaves


def probe(loss: torch.Tensor, inputs: Sequence[torch.Tensor], retain_graph: bool) -> Grads:
    """Per-input gradients of ``loss``; ``None`` where the loss does not reach an input."""
    if not loss.requires_grad:
        return [None] * len(inputs)
    return list(torch.autograd.grad(loss, inputs, retain_graph=retain_graph, allow_unused=True))


def _flat(t: torch.Tensor) -> torch.Tensor:
    t = t.reshape(-1)
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def gramian(grads: Sequence[Grads]) -> list[list[float]]:
    """:math:`G_{ij}` summed over paired per-tensor gradients of K losses; ``None`` counts as zero.

    Per-tensor dot products run in the gradients' precision (float32 for half types) and are summed
    in float64; the values come back with a single device synchronisation.
    """
    count = len(grads)
    flats = [[None if g is None else _flat(g) for g in per_loss] for per_loss in grads]
    entries = [(i, j) for i in range(count) for j in range(i, count)]
    terms: list[list[torch.Tensor]] = [[] for _ in entries]
    for position in range(len(grads[0])):
        for slot, (i, j) in enumerate(entries):
            a, b = flats[i][position], flats[j][position]
            if a is not None and b is not None:
                terms[slot].append(torch.dot(a, b))
    device = next((t[0].device for t in terms if t), torch.device("cpu"))
    zero = torch.zeros((), dtype=torch.float64, device=device)
    sums = torch.stack([torch.stack(t).double().sum() if t else zero for t in terms]).tolist()
    return symmetric(count, entries, sums)


def symmetric(count: int, entries: Sequence[tuple[int, int]], values: Sequence[float]) -> list[list[float]]:
    """The symmetric ``count x count`` matrix whose entries ``(i, j)`` and ``(j, i)`` are ``values``."""
    gram = [[0.0] * count for _ in range(count)]
    for (i, j), value in zip(entries, values):
        gram[i][j] = gram[j][i] = value
    return gram


def feature_list(features: torch.Tensor | Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    if features is None:
        return []
    feats = [features] if isinstance(features, torch.Tensor) else list(features)
    if not all(f.requires_grad for f in feats):
        raise ValueError("features must be part of the autograd graph (requires_grad=True)")
    return feats


def combine(ga: torch.Tensor | None, coef_a: float, gc: torch.Tensor | None, coef_c: float) -> torch.Tensor | None:
    if ga is None and gc is None:
        return None
    if ga is None:
        return gc * coef_c
    out = ga * coef_a
    return out.add_(gc, alpha=coef_c) if gc is not None else out


def accumulate(
    tensor: torch.Tensor, ga: torch.Tensor | None, coef_a: float, gc: torch.Tensor | None, coef_c: float
) -> None:
    """``tensor.grad += coef_a * ga + coef_c * gc`` (``None`` terms skipped), like AccumulateGrad."""
    if ga is None and gc is None:
        return
    if tensor.grad is None:
        grad = torch.empty_like(tensor)  # keeps the parameter's memory layout
        if ga is not None:
            torch.mul(ga, coef_a, out=grad)
            if gc is not None:
                grad.add_(gc, alpha=coef_c)
        else:
            torch.mul(gc, coef_c, out=grad)
        tensor.grad = grad
    else:
        if ga is not None:
            tensor.grad.add_(ga, alpha=coef_a)
        if gc is not None:
            tensor.grad.add_(gc, alpha=coef_c)
