"""Old import paths of the toolkit, kept for one release with a deprecation warning.

Before 0.2 the toolkit's modules sat next to the plug-in (``gradharmony.engine``,
``gradharmony.methods``, ``gradharmony.models.grl``, ...).  They now live under
:mod:`gradharmony.uda`, and the reversal layer in :mod:`gradharmony.reversal`.  This finder maps an
old name to its new module the first time it is imported, so existing code keeps working and is
told where to look; nothing of the toolkit is imported until an old name is asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_TOOLKIT_MODULES = (
    "batches",
    "cli",
    "config",
    "data",
    "demo",
    "engine",
    "methods",
    "models",
    "plots",
    "report",
    "sampler",
    "sweep",
)
_RENAMED = {"gradharmony.models.grl": "gradharmony.reversal", "gradharmony.runlog": "gradharmony.uda.runs"}


def new_name(old: str) -> str | None:
    """The module that replaced ``old``, or ``None`` if ``old`` is not a deprecated path."""
    if old in _RENAMED:
        return _RENAMED[old]
    parts = old.split(".")
    if len(parts) >= 2 and parts[0] == "gradharmony" and parts[1] in _TOOLKIT_MODULES:
        return "gradharmony.uda." + ".".join(parts[1:])
    return None


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:  # the target module is already executed
        pass


class LegacyFinder(importlib.abc.MetaPathFinder):
    """Resolves ``gradharmony.<old toolkit module>`` to ``gradharmony.uda.<module>``, with a warning."""

    def find_spec(self, fullname, path=None, target=None):
        target_name = new_name(fullname)
        if target_name is None:
            return None
        warnings.warn(
            f"{fullname} is deprecated and will be removed in the next release; import {target_name} instead",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.util.spec_from_loader(fullname, _AliasLoader(target_name))


def install() -> None:
    if not any(isinstance(finder, LegacyFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, LegacyFinder())
