"""The package's imports point one way (DEVELOPERS.md): no cycle between modules or between top-level units, counting
the imports under ``if TYPE_CHECKING:`` and those of the package roots (``from . import x``, ``from .. import
__version__``); the engine below the pipelines does not import the mixins; evaluation is handed a world instead of
importing MiniCanvas; and imports sit at the top of their module, except in ``cli/`` (``--help`` must not load torch)
and for the optional or deferred dependencies listed below with their reasons.

Imports are read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

import diffusers_unlearn

PACKAGE_DIR = Path(diffusers_unlearn.__file__).parent
PACKAGE = PACKAGE_DIR.name
P = f"{PACKAGE}."

# Function-level imports that stay, each with its reason: (importing module, imported module) -> why.
OPTIONAL_IMPORTS = {
    (P + "_atomic", "fcntl"): "POSIX only: the folder lock falls back where it is missing (Windows)",
    (P + "_tokenizer", "transformers"): "only the tiny SD3 / Flux pipelines build a T5 tokenizer",
    (P + "_validation", "huggingface_hub"): "the CLI checks Hub ids before any heavy import; the Hub client only then",
    (P + "analysis", "matplotlib"): "pyplot picks its backend on import: the plot selects Agg first",
    (P + "bench.report", "matplotlib"): "pyplot picks its backend on import: each plot selects Agg first",
    (P + "bench.report", "numpy"): "with matplotlib, for the plot that needs it",
    (P + "publishing.export", "diffusers"): "diffusers' LoRA writers, only when a LoRA is exported",
    (P + "publishing.hub", "huggingface_hub"): "the Hub client, only when a folder is pushed",
    (P + "minicanvas.quality", "PIL"): "the sample grid of the quality script",
    (P + "minicanvas.train", "multiprocessing"): "rendering the training set in worker processes",
    (P + "minicanvas.train", "diffusers"): "the training script builds the model's components",
    (P + "minicanvas.train", "transformers"): "the training script builds the text encoder",
    (P + "minicanvas.checkpoint", "diffusers"): "the components, when the weights load (the vocabulary needs none)",
    (P + "minicanvas.checkpoint", "safetensors"): "reading a weight file's keys, when the weights load",
    (P + "minicanvas.checkpoint", "transformers"): "the text encoder and tokenizer, when the weights load",
    (P + "pipelines", "huggingface_hub"): "downloading an unlearned folder from the Hub, only for a Hub id",
    (P + "publishing.model_card", P + "engine.classifier_check"): "a card names the classifier check only when a "
    "record carries one: writing a card imports no classifier",
}

MIXINS = {P + "mixins.attach", P + "mixins.unlearning", P + "mixins.saving"}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported module: one of the package's, or a third-party / standard top-level name
    where: str  # "top", "function" (inside a def) or "type_checking" (under ``if TYPE_CHECKING:``)
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _places(tree: ast.AST) -> dict[int, str]:
    """id(node) -> "function" / "type_checking" for the nodes inside a def or under ``if TYPE_CHECKING:``."""
    places: dict[int, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            places.update({id(child): "type_checking" for child in ast.walk(node) if id(child) not in places})
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            places.update({id(child): "function" for child in ast.walk(node) if child is not node})
    return places


def all_imports() -> list[Import]:
    """Every import statement of the package, resolved: ``from . import x`` names the submodule ``x`` when there is
    one, else the package itself (its ``__init__``: the names it defines or re-exports)."""
    modules = {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        places = _places(tree)
        for node in ast.walk(tree):
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
                if target == PACKAGE or target.startswith(P):
                    while target not in modules:  # "pkg.module.attr" -> "pkg.module"
                        target = target.rpartition(".")[0]
                else:
                    target = target.partition(".")[0]
                if target != name:
                    found.append(Import(name, target, places.get(id(node), "top"), node.lineno))
    return found


def import_graph(imports: Iterable[Import] | None = None) -> dict[str, set[str]]:
    """module -> the package's modules it imports, at any place (top, function, TYPE_CHECKING). A package's
    ``__init__`` imports its children (its re-exports); a module that imports a name of its own package's
    ``__init__`` therefore closes a cycle, as it does at run time."""
    graph: dict[str, set[str]] = {_module_name(p): set() for p in PACKAGE_DIR.rglob("*.py")}
    for imp in all_imports() if imports is None else imports:
        if imp.target in graph:
            graph[imp.module].add(imp.target)
    return graph


def unit_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def unit_graph(graph: Mapping[str, Iterable[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module == PACKAGE:  # the top-level __init__ re-exports the public names of every unit
            continue
        units.setdefault(unit_of(module), set()).update(
            unit_of(t) for t in targets if unit_of(t) != unit_of(module)
        )
    return units


def reachable(graph: Mapping[str, Iterable[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


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


def test_the_graph_sees_function_local_type_checking_and_package_root_imports():
    imports = all_imports()
    places = {(i.module, i.target): i.where for i in imports}
    # cli modules import their heavy dependencies inside run() to keep --help instant
    assert places[(P + "cli.push", P + "publishing.hub")] == "function"
    assert places[(PACKAGE, P + "engine.request")] == "type_checking"  # the root's re-exports for type checkers
    assert places[(P + "engine.request", P + "families.registry")] == "type_checking"
    assert places[(P + "publishing.export", P + "publishing.model_card")] == "top"  # "from . import model_card": the submodule
    # a name of a package's __init__ is an arrow to the package, which imports its children: a cycle
    root_name = [Import(P + "publishing.export", PACKAGE, "top", 1)]
    assert any({PACKAGE, P + "publishing.export"} <= set(c) for c in cycles(import_graph([*imports, *root_name])))
    hidden = [Import(P + "families.registry", P + "engine.trainer", "type_checking", 1)]  # trainer imports families
    assert any({P + "families.registry", P + "engine.trainer"} <= set(c) for c in cycles(import_graph([*imports, *hidden])))


def test_no_import_cycle_between_modules():
    assert cycles(import_graph()) == []


def test_no_import_cycle_between_top_level_units():
    units = unit_graph(import_graph())
    assert {P + "evaluation", P + "minicanvas", P + "mixins", P + "engine", P + "kv", P + "families"} <= set(units)
    assert cycles(units) == []


def test_nothing_imports_the_package_root():
    # the version lives in _version.py; public names are for users, not for the package's own modules
    assert [(i.module, i.line) for i in all_imports() if i.target == PACKAGE and i.module != PACKAGE] == []


def mixin_imports_below_the_pipelines(graph: Mapping[str, set[str]]) -> dict[str, list[str]]:
    """The modules the ready pipeline classes are built on (all that ``pipelines`` reaches, less the mixins and
    the pipelines themselves) that import a mixin module."""
    below = reachable(graph, P + "pipelines") - MIXINS - {P + "pipelines"}
    return {m: sorted(graph[m] & MIXINS) for m in sorted(below) if graph[m] & MIXINS}


def test_no_module_below_the_pipelines_imports_the_mixins():
    graph = import_graph()
    assert {P + "engine.request", P + "engine.trainer", P + "engine.state", P + "publishing.export"} <= reachable(graph, P + "pipelines")
    assert mixin_imports_below_the_pipelines(graph) == {}
    # the check sees one: the state module reaching up for the mixin
    graph[P + "engine.state"] = graph[P + "engine.state"] | {P + "mixins.attach"}
    assert mixin_imports_below_the_pipelines(graph) == {P + "engine.state": [P + "mixins.attach"]}


def test_nothing_in_evaluation_imports_minicanvas():
    found = sorted({(i.module, i.target) for i in all_imports()
                    if unit_of(i.module) == P + "evaluation" and unit_of(i.target) == P + "minicanvas"})
    assert found == []


def test_imports_sit_at_the_top_except_in_the_cli_and_for_listed_dependencies():
    inside = {(i.module, i.target) for i in all_imports()
              if i.where == "function" and not i.module.startswith(P + "cli.") and i.module != P + "cli"}
    assert sorted(inside - set(OPTIONAL_IMPORTS)) == []


def test_every_listed_exception_still_exists():
    # a stale entry would let a new import of the same pair through unnoticed: remove it when its import goes
    inside = {(i.module, i.target) for i in all_imports() if i.where == "function"}
    assert sorted(set(OPTIONAL_IMPORTS) - inside) == []


# The layers of DEVELOPERS.md's picture, bottom first: a unit imports only units of its own layer or below.
LAYERS = [
    {"_atomic", "_deprecation", "_progress", "_tokenizer", "_validation", "_version", "_warn", "generic_vocabulary",
     "images", "prompts", "vocabulary", "worlds"},
    {"families", "testing"},
    {"embeddings", "kv"},
    {"objectives", "regularizers"},
    {"engine"},
    {"publishing"},
    {"mixins"},
    {"analysis", "evaluation", "pipelines"},
    {"minicanvas"},
    {"bench", "plan", "plan_format"},
    {"cli"},
]


def test_units_import_only_their_own_layer_or_below():
    layer = {P + unit: i for i, units in enumerate(LAYERS) for unit in units}
    graph = unit_graph(import_graph())
    assert sorted(set(graph) - set(layer)) == []  # a new unit takes its place in LAYERS (and in DEVELOPERS.md)
    upward = sorted((unit, target) for unit, targets in graph.items() for target in targets
                    if target in layer and layer[target] > layer[unit])
    assert upward == []
