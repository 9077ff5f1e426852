"""The plug-in stands alone: `import gradharmony` loads the core only, old paths still resolve,
the command says what to install without the toolkit, and (marker ``install``) the core installs
into an environment holding another torch without touching it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from processes import run_python

REPO = Path(__file__).resolve().parents[1]
CORE_MODULES = {
    "gradharmony",
    "gradharmony._legacy",
    "gradharmony.distributed",
    "gradharmony.gradients",
    "gradharmony.harmonize",
    "gradharmony.harmonizer",
    "gradharmony.reversal",
    "gradharmony.stats",
}


def _run_python(code: str, python: str = sys.executable, **kwargs) -> subprocess.CompletedProcess:
    return run_python("-c", textwrap.dedent(code), python=python, **kwargs)


def _top_level_modules_after(statement: str) -> tuple[set[str], set[str]]:
    done = _run_python(f"""
        import sys
        {statement}
        print(sorted(m for m in sys.modules if m.split(".")[0] == "gradharmony"))
        print(sorted({{m.split(".")[0] for m in sys.modules}}))
    """)
    assert done.returncode == 0, done.stderr
    ours, top_level = (eval(line) for line in done.stdout.strip().splitlines())
    return set(ours), set(top_level)


def test_import_gradharmony_loads_the_core_and_nothing_of_the_toolkit():
    ours, with_core = _top_level_modules_after("import gradharmony")
    _, with_torch = _top_level_modules_after("import torch")
    assert ours == CORE_MODULES
    # torch itself may import numpy or tqdm when they are installed; the core adds no package of its own
    assert with_core - with_torch == {"gradharmony"}


def test_the_public_api_of_the_core():
    import gradharmony

    assert sorted(gradharmony.__all__) == sorted(
        [
            "MODES",
            "STRATEGIES",
            "GradientReversal",
            "GramianResult",
            "HarmonizeResult",
            "Harmonizer",
            "LossesStats",
            "StepStats",
            "harmonize",
            "harmonize_gramian",
            "harmonize_vectors",
            "harmonize_weights",
            "reverse_gradient",
        ]
    )
    assert (REPO / "src" / "gradharmony" / "py.typed").is_file()
    from gradharmony.reversal import GradientReversal

    assert gradharmony.GradientReversal is GradientReversal


@pytest.mark.parametrize(
    "old, new, name",
    [
        ("gradharmony.engine", "gradharmony.uda.engine", "train"),
        ("gradharmony.methods", "gradharmony.uda.methods", "build_method"),
        ("gradharmony.methods.mcd", "gradharmony.uda.methods.mcd", "MCD"),
        ("gradharmony.models.grl", "gradharmony.reversal", "GradientReversal"),
        ("gradharmony.config", "gradharmony.uda.config", "TrainConfig"),
        ("gradharmony.runlog", "gradharmony.uda.runs", "read_metrics"),
    ],
)
def test_old_import_paths_warn_and_give_the_very_same_objects(old, new, name):
    import importlib

    for module in [m for m in sys.modules if m == old or m.startswith(old + ".")]:
        del sys.modules[module]  # a previous test may have imported it already
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        legacy = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), [
        str(w.message) for w in caught
    ]
    assert getattr(legacy, name) is getattr(importlib.import_module(new), name)


def test_an_old_submodule_is_not_loaded_twice():
    """``gradharmony.methods.mcd`` must be the module object of ``gradharmony.uda.methods.mcd``."""
    done = _run_python("""
        import warnings
        warnings.simplefilter("ignore", DeprecationWarning)
        import gradharmony.methods.mcd as old
        import gradharmony.uda.methods.mcd as new
        print(old is new, old.MCD is new.MCD)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]


def test_the_command_without_the_toolkit_says_what_to_install(monkeypatch, capsys):
    from gradharmony import _entry

    monkeypatch.setattr(_entry, "missing_toolkit_modules", lambda: ["numpy", "yaml"])
    assert _entry.main(["train", "--help"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "pip install 'gradharmony[uda]'" in err and "numpy, yaml" in err


def readme_plugin_example() -> str:
    """The README's plug-in example: the python block after the marker comment."""
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- plug-in example, tested -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its marked plug-in example"
    return match.group(1)


def test_the_readme_plugin_example_runs_here():
    done = _run_python(readme_plugin_example(), cwd=REPO)
    assert done.returncode == 0, done.stderr


@pytest.mark.install
def test_the_core_installs_beside_another_torch_and_leaves_it_alone(tmp_path):
    """A fresh venv with torch 2.13.0 (CPU); `pip install <clone>` keeps it and the README example runs."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python, pip = (
        str(venv / "bin" / "python"),
        [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"],
    )
    subprocess.run([*pip, "install", "--quiet", "torch==2.13.0"], check=True, timeout=1200)
    version = _run_python("import torch; print(torch.__version__)", python).stdout.strip()
    assert version.startswith("2.13.0")

    clone = tmp_path / "clone"  # the tracked files only, as a user's clone has them
    files = subprocess.run(
        ["git", "ls-files", "src", "pyproject.toml", "README.md", "LICENSE"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, clone / name)
    installed = subprocess.run([*pip, "install", str(clone)], capture_output=True, text=True, timeout=1200)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    after = _run_python("import torch, gradharmony; print(torch.__version__, gradharmony.__version__)", python)
    assert after.returncode == 0, after.stderr
    assert after.stdout.split()[0] == version
    listed = subprocess.run([*pip, "list", "--format=freeze"], capture_output=True, text=True).stdout.lower()
    assert not any(f"{name}==" in listed for name in ("numpy", "pyyaml", "torchvision", "matplotlib"))

    example = _run_python(readme_plugin_example(), python, cwd=tmp_path)
    assert example.returncode == 0, example.stderr
    command = subprocess.run([str(venv / "bin" / "gradharmony"), "train"], capture_output=True, text=True)
    assert command.returncode == 2 and "pip install 'gradharmony[uda]'" in command.stderr
    assert "Traceback" not in command.stderr
