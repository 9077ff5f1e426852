"""The ``gradharmony`` command: the toolkit's CLI, or one line saying how to install it.

The command belongs to the toolkit (``pip install 'gradharmony[uda]'``); the plug-in alone installs
torch and nothing else, so without the extra the command says what to install instead of failing
with a traceback.
"""

from __future__ import annotations

import sys

#: Distributions the toolkit needs beyond torch (import names); see the ``uda`` extra.
TOOLKIT_IMPORTS = ("numpy", "yaml", "tqdm", "matplotlib", "scipy", "torchvision")


def missing_toolkit_modules() -> list[str]:
    import importlib.util

    return [name for name in TOOLKIT_IMPORTS if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    missing = missing_toolkit_modules()
    if missing:
        print(
            f"gradharmony: the command line is part of the toolkit, whose dependencies are not installed "
            f"(missing: {', '.join(missing)}); install it with: pip install 'gradharmony[uda]'",
            file=sys.stderr,
        )
        return 2
    from gradharmony.uda.cli import main as toolkit_main

    return toolkit_main(argv)
