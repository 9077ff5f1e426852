"""Child Python processes of the tests."""

from __future__ import annotations

import os
import subprocess
import sys


def python_env(**extra: str) -> dict[str, str]:
    """This process's environment with torch on one thread (``OMP_NUM_THREADS=1``), plus ``extra``."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def run_python(*args: str, python: str = sys.executable, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``python ARGS`` run to its end, stdout and stderr captured as text (``kwargs``: ``cwd``, ``env``)."""
    return subprocess.run([python, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def hangup_as_default() -> None:
    """A ``preexec_fn``: the child takes SIGHUP's default disposition, whatever this process has (a
    test suite started under ``nohup`` ignores SIGHUP, and its children would inherit that)."""
    import signal

    signal.signal(signal.SIGHUP, signal.SIG_DFL)
