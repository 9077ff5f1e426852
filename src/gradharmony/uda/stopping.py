"""The signals that ask a training run, or a sweep, to stop after the current step and save.

Ctrl-C (SIGINT), a supervisor's or SLURM's SIGTERM, and the SIGHUP of a closed terminal or a dropped
SSH session (POSIX only): the engine finishes the step, saves a checkpoint and stops; a sweep asks
each of its workers to do so once.
"""

from __future__ import annotations

import signal

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
