"""Test settings.

* In CI, hypothesis draws the same examples every run (no flaky property tests).
* Decoded and generated datasets are cached in a temporary folder of the test session (shared by its
  subprocesses and its pytest-xdist workers through ``$GRADHARMONY_CACHE_DIR``; entries are written
  atomically), never in the user's cache.
* Each pytest-xdist worker runs torch on one thread, so ``-n N`` uses N cores, not N x all of them.
"""

import os
import shutil
import tempfile

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

_SESSION_CACHE: str | None = None


def pytest_configure(config):
    global _SESSION_CACHE
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
    if "GRADHARMONY_CACHE_DIR" not in os.environ:
        _SESSION_CACHE = tempfile.mkdtemp(prefix="gradharmony-test-cache-")
        os.environ["GRADHARMONY_CACHE_DIR"] = _SESSION_CACHE


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:
        os.environ.pop("GRADHARMONY_CACHE_DIR", None)
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
