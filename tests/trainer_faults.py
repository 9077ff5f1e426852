"""Faults injected into a :class:`~gradharmony.uda.engine.Trainer` before it runs."""

from __future__ import annotations

import os
import signal

import torch


def sigint_during_step(trainer, step: int, signum: int = signal.SIGINT) -> None:
    """Press Ctrl-C (a real SIGINT; or send ``signum``) in the middle of the trainer's step ``step``
    (0-based): the signal arrives mid-step, so that step still completes before the run stops."""
    original = trainer.train_step

    def step_then_interrupt():
        if trainer.step == step:
            os.kill(os.getpid(), signum)
        return original()

    trainer.train_step = step_then_interrupt


def nan_cls_loss_from(trainer, first: int) -> None:
    """Make the classification loss NaN at every step from ``first`` on (the other losses stay finite)."""
    original = trainer.model.compute_losses

    def poisoned(xs, ys, xt, step):
        losses = original(xs, ys, xt, step)
        if step >= first:
            losses.cls = losses.cls * torch.tensor(float("nan"))
        return losses

    trainer.model.compute_losses = poisoned
