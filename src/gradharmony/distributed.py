"""Gradient averaging across processes for an exact harmonizer under torch.distributed.

With data parallelism the harmonized update must be the one of the *global* batch: the Gramian of
the averaged gradients, not the average of per-process Gramians (which differ, and would give each
process different weights).  So the harmonizer averages the probe gradients it measures (or, for
per-sample feature gradients, sums the three Gramian entries: the global feature gradient is the
concatenation of the processes' blocks) and averages every gradient it writes.  It therefore owns
gradient synchronisation: use it with an unwrapped model, or a DDP model inside ``no_sync()``.

Assumptions, as for DDP itself: every process runs the same graph (same parameters reached by each
loss) on a batch of the same size, with losses that are means over the local batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

MODES = ("auto", "exact", "off")


@dataclass(frozen=True)
class World:
    group: dist.ProcessGroup | None
    size: int


def check_distributed(mode: str) -> None:
    """Raise a clear ``ValueError`` unless ``mode`` is one of :data:`MODES`."""
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {', '.join(MODES)}, got {mode!r}")


def resolve_world(mode: str, group: dist.ProcessGroup | None = None) -> World | None:
    """The process group to synchronise over, or ``None`` when running in a single process."""
    check_distributed(mode)
    if mode == "off":
        return None
    active = dist.is_available() and dist.is_initialized()
    if not active:
        if mode == "exact":
            raise RuntimeError(
                "distributed='exact' needs torch.distributed to be initialised "
                "(e.g. under torchrun, after init_process_group)"
            )
        return None
    size = dist.get_world_size(group)
    return World(group, size) if size > 1 else None


def average_(tensors: Sequence[torch.Tensor], world: World) -> None:
    """Average ``tensors`` in place across processes, with one collective per dtype and device."""
    _all_reduce_(tensors, world, average=True)


def sum_(tensors: Sequence[torch.Tensor], world: World) -> None:
    """Sum ``tensors`` in place across processes (running statistics kept as sums)."""
    _all_reduce_(tensors, world, average=False)


def gather_rows(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """The processes' ``tensor`` (same shape everywhere) concatenated along dim 0, in rank order."""
    parts = [torch.empty_like(tensor) for _ in range(world.size)]
    dist.all_gather(parts, tensor.contiguous(), group=world.group)
    return torch.cat(parts)


def _all_reduce_(tensors: Sequence[torch.Tensor], world: World, average: bool) -> None:
    buckets: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for same in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, group=world.group)
        if average:
            flat.div_(world.size)
        offset = 0
        for t in same:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def sum_scalars(values: Sequence[float], world: World, device: torch.device) -> list[float]:
    """Sum a few Python floats across processes (float64)."""
    buf = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(buf, group=world.group)
    return buf.tolist()


@contextmanager
def averaged_new_gradients(leaves: Sequence[torch.Tensor], world: World | None) -> Iterator[None]:
    """Average across processes whatever the body adds to ``leaf.grad``; keep what was there.

    Gradients already held (local accumulation) are set aside during the body and added back
    after, so only the body's contribution is communicated.
    """
    if world is None:
        yield
        return
    held = [leaf.grad for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    yield  # on an exception nothing is communicated: the other processes may not be here
    fresh = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
    average_(fresh, world)
    for leaf, new, old in zip(leaves, fresh, held):
        leaf.grad = new if old is None else old.add_(new)
