"""Every public name has a docstring, and every public function or constructor with parameters names each of them
in a Google-style ``Args:`` section (what mkdocstrings renders as the parameter table of the API reference).

Public names: those in ``diffusers_unlearn.__all__`` and in each subpackage's ``__all__``, and the public methods
(and ``__call__``) of the public classes, wherever in the package's own class hierarchy they are defined; names
that a module of the package re-exports from diffusers, transformers or the standard library are not ours to
document. A class's constructor parameters may be named under ``Args:`` or, for a record, ``Attributes:``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re

import pytest

import diffusers_unlearn as du

# Modules whose names are not checked yet (a module being rewritten elsewhere); empty: every public name is checked.
PENDING_MODULES: set[str] = set()

_ARGS_HEADERS = {"Args", "Arguments", "Parameters", "Params"}
_ATTRIBUTE_HEADERS = {"Attributes"}
_SECTION = re.compile(r"^(\s*)([A-Z][A-Za-z ]*):\s*$")
_ENTRY = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:")


def public_packages() -> list[str]:
    """The package and every subpackage that declares ``__all__``, plus ``diffusers_unlearn.testing``."""
    names = ["diffusers_unlearn", "diffusers_unlearn.testing"]
    for info in pkgutil.walk_packages(du.__path__, "diffusers_unlearn."):
        if info.ispkg and hasattr(importlib.import_module(info.name), "__all__"):
            names.append(info.name)
    return names


def documented_names(docstring: str, headers: set[str]) -> set[str] | None:
    """The entry names of the docstring's sections titled one of ``headers`` (None: no such section).

    An entry is a line ``name: ...`` or ``name (type): ...`` at the first indentation under the header; ``*args``
    and ``**kwargs`` are returned without their stars.
    """
    lines = inspect.cleandoc(docstring).splitlines()
    names: set[str] | None = None
    i = 0
    while i < len(lines):
        match = _SECTION.match(lines[i])
        if not match or match.group(2) not in headers:
            i += 1
            continue
        names = names or set()
        header_indent, entry_indent = len(match.group(1)), None
        i += 1
        while i < len(lines):
            line = lines[i]
            if line.strip():
                indent = len(line) - len(line.lstrip())
                if indent <= header_indent:
                    break
                entry_indent = indent if entry_indent is None else entry_indent
                entry = _ENTRY.match(line.strip()) if indent == entry_indent else None
                if entry:
                    names.add(entry.group(1).lstrip("*"))
            i += 1
    return names


def _own_doc(obj: object) -> str | None:
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    if isinstance(obj, type) and dataclasses.is_dataclass(obj) and doc and doc.startswith(f"{obj.__name__}("):
        return None  # the signature dataclasses write when the class has no docstring
    return doc if doc and doc.strip() else None


def _parameters(func: object) -> list[str]:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return []
    return [p.name for p in signature.parameters.values() if p.name not in ("self", "cls")]


def _pending(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in PENDING_MODULES)


def _ours(obj: object) -> str | None:
    """The package module that defines ``obj``; None for anything defined elsewhere."""
    module = getattr(obj, "__module__", None) or ""
    if not module.startswith("diffusers_unlearn"):
        return None
    return module + ".__init__" if hasattr(importlib.import_module(module), "__path__") else module


def function_problems(name: str, func: object, doc: str | None, *, constructor: bool = False) -> list[str]:
    """What is missing from the docstring ``doc`` of function ``func`` (or a class's constructor) called ``name``."""
    if doc is None:
        return [f"{name}: no docstring"]
    wanted = _parameters(func)
    if not wanted:
        return []
    listed = documented_names(doc, _ARGS_HEADERS)
    if constructor:
        attributes = documented_names(doc, _ATTRIBUTE_HEADERS)
        if attributes is not None:
            listed = (listed or set()) | attributes
    if listed is None:
        return [f"{name}: no Args: section for {wanted}"]
    missing = [p for p in wanted if p not in listed]
    return [f"{name}: Args: does not name {missing}"] if missing else []


def class_problems(qualname: str, cls: type) -> list[str]:
    problems = []
    module = _ours(cls)
    doc = _own_doc(cls)
    init = next((k.__dict__["__init__"] for k in cls.__mro__ if "__init__" in k.__dict__), None)
    init_owner = next((k for k in cls.__mro__ if "__init__" in k.__dict__), object)
    if init is not None and (_ours(init_owner) or "").startswith("diffusers_unlearn") and not _pending(
            _ours(init_owner) or ""):
        init_doc = _own_doc(init) if init_owner is cls else None
        merged = "\n".join(d for d in (doc, init_doc) if d) or None
        problems += function_problems(qualname, init, merged, constructor=True)
    elif doc is None and not _pending(module or ""):
        problems.append(f"{qualname}: no docstring")
    for attr in sorted(dir(cls)):
        if attr.startswith("_") and attr != "__call__":
            continue
        owner = next((k for k in cls.__mro__ if attr in k.__dict__), None)
        owner_module = _ours(owner) if owner is not None else None
        if owner_module is None or _pending(owner_module):
            continue
        raw = owner.__dict__[attr]
        where = f"{owner.__module__}.{owner.__qualname__}.{attr}"
        if isinstance(raw, property):
            if _own_doc(raw.fget) is None:
                problems.append(f"{where}: no docstring")
            continue
        func = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
        if inspect.isfunction(func):
            problems += function_problems(where, raw.__get__(None, owner) if isinstance(raw, classmethod) else func,
                                          _own_doc(func))
    return problems


def public_objects() -> list[tuple[str, object]]:
    """``(qualified name, object)`` for every class and function of the public ``__all__`` lists, each once."""
    seen: set[int] = set()
    found = []
    for package in public_packages():
        module = importlib.import_module(package)
        for name in module.__all__:
            obj = getattr(module, name)
            if not (inspect.isclass(obj) or inspect.isfunction(obj)) or id(obj) in seen:
                continue
            seen.add(id(obj))
            found.append((f"{package}.{name}", obj))
    return found


def test_the_walk_reaches_every_public_package_and_checks_names():
    packages = public_packages()
    for expected in ("diffusers_unlearn.regularizers", "diffusers_unlearn.minicanvas", "diffusers_unlearn.testing"):
        assert expected in packages
    checked = [n for n, obj in public_objects() if not _pending(_ours(obj) or "")]
    assert "diffusers_unlearn.Ledger" in checked and "diffusers_unlearn.attach" in checked, checked


def test_pending_modules_exist():
    """A name in PENDING_MODULES that is no module any more is stale: remove it."""
    for module in PENDING_MODULES:
        importlib.import_module(module.removesuffix(".__init__"))


def test_every_public_name_has_a_docstring_naming_its_parameters():
    problems = []
    for qualname, obj in public_objects():
        module = _ours(obj)
        if module is None:
            continue
        if inspect.isclass(obj):
            problems += class_problems(qualname, obj)
        elif not _pending(module):
            problems += function_problems(qualname, obj, _own_doc(obj))
    assert not problems, "public names whose docstrings miss something:\n" + "\n".join(sorted(set(problems)))


def _sample(a, b=1, *rest, c, **options):
    """Sample.

    Args:
        a: first.
        b (int): second, with a
            continued line that says c: not an entry.
        *rest: the rest.
        options: the options.

    Returns:
        x: not an argument.
    """


def test_the_args_check_reads_google_sections_and_finds_a_missing_parameter():
    assert documented_names(_sample.__doc__, _ARGS_HEADERS) == {"a", "b", "rest", "options"}
    assert function_problems("_sample", _sample, _sample.__doc__) == ["_sample: Args: does not name ['c']"]
    assert function_problems("f", lambda x: x, "No section.") == ["f: no Args: section for ['x']"]
    assert function_problems("f", lambda: 0, None) == ["f: no docstring"]


@pytest.mark.parametrize("cls_name", ["Ledger", "ClassifierCheck"])
def test_classes_are_checked_through_their_methods(cls_name):
    """A method of a public class that lost its docstring is reported (the check is not vacuous for classes)."""
    cls = getattr(du, cls_name)
    method = next(a for a in sorted(vars(cls)) if not a.startswith("_") and inspect.isfunction(vars(cls)[a]))
    original = vars(cls)[method].__doc__
    try:
        vars(cls)[method].__doc__ = None
        assert any(p.endswith(f".{method}: no docstring") for p in class_problems(cls_name, cls))
    finally:
        vars(cls)[method].__doc__ = original
