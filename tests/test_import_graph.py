"""The package's import graph has no cycles: between modules, and between top-level units (a top-level module, or
a subpackage counted as one unit). Imports are read from the source with ``ast``, function-local ones included
(they are dependencies too); imports under ``if TYPE_CHECKING:`` are left out (they never run)."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import diffusers_unlearn

PACKAGE_DIR = Path(diffusers_unlearn.__file__).parent
PACKAGE = PACKAGE_DIR.name


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    return skipped


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (a package __init__'s imports of its own children left out:
    re-exports make every ``from .sub import x`` inside the package look like a cycle through ``__init__``)."""
    modules = {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        skipped = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                if not target.startswith(PACKAGE):
                    continue
                while target not in modules:  # "pkg.module.attr" -> "pkg.module"
                    target = target.rpartition(".")[0]
                own_child = path.name == "__init__.py" and target.startswith(name + ".")
                if target != name and not own_child:
                    graph[name].add(target)
    return graph


def unit_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def unit_graph(graph: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module == PACKAGE:  # the top-level __init__ re-exports the public names of every unit
            continue
        units.setdefault(unit_of(module), set()).update(
            unit_of(t) for t in targets if unit_of(t) != unit_of(module) and t != PACKAGE
        )
    return units


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle_and_only_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_graph_sees_function_local_imports():
    graph = import_graph()
    # cli modules import their heavy dependencies inside run() to keep --help instant
    assert f"{PACKAGE}.hub" in graph[f"{PACKAGE}.cli.push"]
    assert f"{PACKAGE}.state" in graph[f"{PACKAGE}.mixin"]


def test_no_import_cycle_between_modules():
    assert cycles(import_graph()) == []


def test_no_import_cycle_between_top_level_units():
    units = unit_graph(import_graph())
    assert {f"{PACKAGE}.evaluation", f"{PACKAGE}.minicanvas", f"{PACKAGE}.mixin"} <= set(units)
    assert cycles(units) == []
