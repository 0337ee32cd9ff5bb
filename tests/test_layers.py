"""The package imports one way: no import circle among its modules (imports inside functions
and under ``TYPE_CHECKING`` count), no module takes another module's ``_private`` name, and
every module says in its docstring what it holds and is short enough to read in a sitting."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pytest_gradcheck"
MODULES = {path.stem: path for path in PACKAGE.glob("*.py") if path.stem != "__init__"}
MAX_LINES = 900


def _imports(name: str) -> tuple[set[str], list[str]]:
    """The package modules ``name`` imports, and the private names it takes from them."""
    tree = ast.parse(MODULES[name].read_text())
    targets: set[str] = set()
    private: list[str] = []
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            inside = node.level > 0 or (node.module or "").startswith("pytest_gradcheck")
            if not inside:
                continue
            base = (node.module or "").rpartition(".")[2]
            if base == "pytest_gradcheck":
                base = ""
            for alias in node.names:
                if base in MODULES:
                    targets.add(base)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{name} <- {base}.{alias.name}")
                elif alias.name in MODULES:  # from . import engine
                    targets.add(alias.name)
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "pytest_gradcheck" and len(parts) > 1 and parts[1] in MODULES:
                    targets.add(parts[1])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            private.append(f"{name} <- {aliases[node.value.id]}.{node.attr}")
    targets.discard(name)
    return targets, private


GRAPH = {name: _imports(name)[0] for name in MODULES}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    assert _circles(GRAPH) == []


def test_the_checker_finds_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_crosses_a_module() -> None:
    assert [p for name in MODULES for p in _imports(name)[1]] == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_documented_and_short(name: str) -> None:
    text = MODULES[name].read_text()
    assert ast.get_docstring(ast.parse(text)), f"{name}.py says nothing of what it holds"
    assert len(text.splitlines()) <= MAX_LINES, f"{name}.py is over {MAX_LINES} lines"


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("results", "settings"),
        ("settings", "policy"),
        ("checks", "verdict"),
        ("hooks", "verdict"),
        ("verdict", "engine"),
        ("measure", "engine"),
        ("facts", "engine"),
        ("facts", "passes"),
        ("tensors", "measure"),
        ("engine", "api"),
        ("distributed", "api"),
        ("passes", "training"),
        ("training", "engine"),
        ("hints", "checks"),
        ("properties", "session"),
        ("session", "plugin"),
        ("suite", "plugin"),
        ("api", "session"),
    ],
)
def test_lower_layers_never_reach_up(low: str, high: str) -> None:
    """A lower module imports nothing of a higher one, directly or through another."""
    reach, todo = set(), [low]
    while todo:
        for target in GRAPH[todo.pop()]:
            if target not in reach:
                reach.add(target)
                todo.append(target)
    assert high not in reach
