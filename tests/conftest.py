"""Test settings.

* In CI, hypothesis draws the same examples every run (no flaky property tests).
* Decoded and generated datasets are cached in a temporary folder of the test session (shared by its
  subprocesses through ``$GRADHARMONY_CACHE_DIR``), never in the user's cache.
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
    if "GRADHARMONY_CACHE_DIR" not in os.environ:
        _SESSION_CACHE = tempfile.mkdtemp(prefix="gradharmony-test-cache-")
        os.environ["GRADHARMONY_CACHE_DIR"] = _SESSION_CACHE


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:
        os.environ.pop("GRADHARMONY_CACHE_DIR", None)
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
