"""The signals that ask a training run, or a sweep, to stop after the current step and save.

Ctrl-C (SIGINT), a supervisor's or SLURM's SIGTERM, and the SIGHUP of a closed terminal or a dropped
SSH session (POSIX only): the engine finishes the step, saves a checkpoint and stops; a sweep asks
each of its workers to do so once.  Two details of the hang-up:

* a process started under ``nohup`` ignores SIGHUP, and keeps ignoring it here
  (:func:`handled_stop_signals`): what ``nohup`` protects goes on training;
* once the terminal is gone, writing to it fails (``EIO``), and a stopping run still has lines to
  write; :func:`detach_from_terminal` points them at ``/dev/null``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from typing import Any

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
HANGUP = getattr(signal, "SIGHUP", None)


def handled_stop_signals() -> tuple[int, ...]:
    """:data:`STOP_SIGNALS`, less SIGHUP where this process ignores it (started under ``nohup``).

    Example:
        >>> import signal
        >>> previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        >>> signal.SIGHUP in handled_stop_signals()
        False
        >>> _ = signal.signal(signal.SIGHUP, previous)
    """
    with contextlib.suppress(ValueError, TypeError):
        if HANGUP is not None and signal.getsignal(HANGUP) == signal.SIG_IGN:
            return tuple(s for s in STOP_SIGNALS if s != HANGUP)
    return STOP_SIGNALS


def detach_from_terminal() -> None:
    """Point standard output and error at ``/dev/null`` where they are a character device (the hung-up
    terminal, which no longer reports itself as one); files and pipes are left as they are."""
    devnull = None
    try:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                if stat.S_ISCHR(os.fstat(fd).st_mode):
                    if devnull is None:
                        devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, fd)
    finally:
        if devnull is not None:
            os.close(devnull)


def leave_stopping_to_the_main_process(worker_id: int) -> None:
    """A DataLoader's ``worker_init_fn``: its worker ignores Ctrl-C and the hang-up, which a terminal
    sends to the whole process group, so that the training process alone decides how to stop (it
    finishes the step, which needs the workers' batches)."""
    for sig in (signal.SIGINT, HANGUP):
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


class DeferredInterrupt:
    """Turn the first Ctrl-C / SIGTERM / SIGHUP into a request to stop after the current step.

    A step interrupted half-way (optimizer stepped, counter not yet advanced) could not be resumed
    exactly, so the training loop checks :attr:`requested` after each step, saves, then stops.  A
    second signal raises :class:`KeyboardInterrupt` at once.  Outside the main thread the signals
    stay as they are.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if signum == HANGUP:
            detach_from_terminal()
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> DeferredInterrupt:
        for sig in handled_stop_signals():
            with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
