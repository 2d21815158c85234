"""The layers point one way and nothing imports in a circle.

Every ``import`` in the package's source is read from its syntax tree (function-local imports
included: a lazy import is still a dependency), and two rules are checked:
- a module imports nothing from a higher layer (``LAYERS``, lowest first);
- no group of modules imports each other in a circle.
Imports under ``if TYPE_CHECKING:`` are left out: they are annotations, never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "plugins", "search", "tracking", "app")  # folder = slimforge.<folder>, lowest first
# The plugin manager (core) reads the *names* of the built-in plugin modules from the plugins
# package, then imports them by name, as it does entry points: data, not a dependency on any plugin.
ALLOWED_UPWARD = {("slimforge.core.manager", "slimforge.plugins")}


def _modules(root: Path = ROOT) -> dict[str, Path]:
    modules = {}
    for folder in LAYERS:
        for path in (root / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(root / folder).with_suffix("").parts if p != "__init__"]
            modules[".".join(["slimforge", folder, *parts])] = path
    return modules


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skipped |= {id(inner) for stmt in node.body for inner in ast.walk(stmt)}
    return skipped


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the package modules it imports."""
    modules = _modules(root)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skipped = _type_checking_only(tree)
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from slimforge.core import embedded` imports the module embedded, not the package.
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                            for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                  if _layer(b) > _layer(a) and (a, b) not in ALLOWED_UPWARD)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected group of modules (Tarjan), each as a closed path."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_layer_folder_is_a_package_of_the_distribution():
    text = (ROOT / "pyproject.toml").read_text()
    for folder in LAYERS:
        assert f'"slimforge.{folder}" = "{folder}"' in text


def test_no_module_imports_from_a_higher_layer():
    assert upward_imports(import_graph()) == []


def test_no_modules_import_each_other_in_a_circle():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("bad, found_by", [
    ("from slimforge.search.engine import run_search\n", upward_imports),  # core reaching up into search
    ("from slimforge.core.embedded import lenet5\n", cycles),  # task <-> embedded, the circle there was
])
def test_the_checks_find_what_they_are_for(tmp_path, bad, found_by):
    """Copy the package, add one bad import to core/task.py, and the check reports it."""
    import shutil

    for folder in LAYERS:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    task = tmp_path / "core" / "task.py"
    task.write_text(task.read_text() + "\n\ndef _bad():\n    " + bad)
    assert found_by(import_graph(tmp_path)) != []
