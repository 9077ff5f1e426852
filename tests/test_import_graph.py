"""The package's import graph, read from the source with ``ast``: no cycles, and the core apart.

Every ``import`` and ``from ... import`` statement counts, at module level or inside a function
(a lazy import still makes the two modules depend on each other), and so does
``importlib.import_module("gradharmony...")`` with a literal name.  ``from gradharmony.x import y``
is an edge to ``gradharmony.x.y`` when ``y`` is a submodule, otherwise to ``gradharmony.x`` (its
``__init__``, which re-exports).  The parents a dotted import runs implicitly are not edges, but a
package's ``__init__`` that imports its submodules is: a submodule that imports its own package's
``__init__`` back is a cycle; it should import from the sibling submodule instead.
"""

from __future__ import annotations

import ast
import itertools
import warnings
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "gradharmony"
TOOLKIT = "gradharmony.uda"


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    files = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _resolve_relative(module: str, level: int, target: str | None, files: dict[str, Path]) -> str:
    base = module.split(".")
    if not _is_package(module, files):
        base = base[:-1]  # a plain module's relative imports start from its package
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, files: dict[str, Path]) -> list[tuple[str, int, str]]:
    """``(imported module, line, source line)`` for every import of a package module in ``module``."""
    path = files[module]
    source = path.read_text()
    lines = source.splitlines()
    found = []

    def add(name: str, node: ast.AST) -> None:
        # An import of a module's attribute resolves to the nearest enclosing module.
        while name and name not in files:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.append((name, node.lineno, lines[node.lineno - 1].strip()))

    with warnings.catch_warnings():  # a module's invalid escape sequences are not this test's business
        warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
        tree = ast.parse(source, filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, node.level, node.module, files) if node.level else node.module or ""
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in files else base, node)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and node.args[0].value.startswith(PACKAGE + ".")
        ):
            add(node.args[0].value, node)
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[tuple[str, str], tuple[int, str]]]:
    """Edges module -> imported modules, and where each edge is written (first line)."""
    files = module_files()
    graph: dict[str, set[str]] = {name: set() for name in files}
    where: dict[tuple[str, str], tuple[int, str]] = {}
    for name in files:
        for target, line, text in imports_of(name, files):
            graph[name].add(target)
            where.setdefault((name, target), (line, text))
    return graph, where


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or ``None`` (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph[child])))
    return None


def describe(cycle: list[str], where: dict[tuple[str, str], tuple[int, str]]) -> str:
    files = module_files()
    return "\n".join(
        f"  {a} -> {b}   ({files[a].relative_to(SRC)}:{where[(a, b)][0]}: {where[(a, b)][1]})"
        for a, b in itertools.pairwise(cycle)
    )


def test_the_graph_sees_top_level_and_function_level_imports():
    graph, _ = import_graph()
    assert "gradharmony.uda.runs" in graph["gradharmony.uda.engine.loop"]
    assert "gradharmony.uda.engine" in graph["gradharmony.uda.sweep"]  # imported inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_a_module_that_imports_it_back():
    graph, where = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle:\n" + describe(cycle, where)


# The `gradharmony` command's launcher: it imports the toolkit's CLI inside main(), only when the command
# runs and only after checking that the toolkit's dependencies are installed (else: one line, exit 2).
COMMAND_LAUNCHER = "gradharmony._entry"


def test_the_core_does_not_import_the_toolkit():
    graph, where = import_graph()
    files = module_files()
    offending = [
        f"  {files[a].relative_to(SRC)}:{where[(a, b)][0]}: {where[(a, b)][1]}"
        for a in sorted(graph)
        if a != TOOLKIT and not a.startswith(TOOLKIT + ".") and a != COMMAND_LAUNCHER
        for b in sorted(graph[a])
        if b == TOOLKIT or b.startswith(TOOLKIT + ".")
    ]
    assert not offending, "the core imports the toolkit:\n" + "\n".join(offending)
